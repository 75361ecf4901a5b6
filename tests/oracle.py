"""A float64 numpy oracle of the Adam update (docs/NUMERICS.md), written from the update rule alone.

Per parameter with a gradient, in this order (t counts that parameter's own updates):

    g       = weight_decay(θ, g)          # L2: g + λ·θ (θ unchanged); decoupled: θ ← θ·(1 − α·λ)
                                          # or θ ← θ·(1 − λ) when absolute; g unchanged
    m       = β1·m + (1 − β1)·g
    v       = β2·v + (1 − β2)·g²
    t       = t + 1
    bc1, bc2 = 1 − β1^t, 1 − β2^t
    θ       = θ − (α·√bc2 / bc1) · m / (√v + ε̂)          optimized_update=True
    θ       = θ − (α / bc1) · m / (√v / √bc2 + ε)         optimized_update=False

A parameter whose gradient is None on a step is skipped: its θ, m, v and t do not change.

The hooks ``init_state``, ``get_mv``, ``get_lr`` and ``step_param`` mirror the overridable methods
the spec names, and ``weight_decay`` the weight-decay object, so a test builds the oracle of a
subclass (warm-up, AMSGrad) or of another decay by overriding the same hook here.

>>> import numpy as np
>>> o = AdamOracle([{"params": [np.ones(2)], "lr": 0.1, "betas": (0.9, 0.999), "eps": 0.0,
...                  "weight_decay": 0.0}])
>>> o.step([[np.array([1.0, -1.0])]])
>>> o.params[0][0].round(6).tolist()
[0.9, 1.1]
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

Group = dict[str, Any]


def decay(
    param: np.ndarray,
    grad: np.ndarray,
    group: Group,
    weight_decouple: bool,
    absolute: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``WeightDecay.__call__`` (docs/NUMERICS.md); returns new (param, grad) arrays, inputs
    untouched."""
    wd = group["weight_decay"]
    if weight_decouple:
        factor = 1.0 - wd if absolute else 1.0 - group["lr"] * wd
        return param * factor, grad
    if wd != 0:
        return param, grad + wd * param
    return param, grad


def update(
    param: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    optimized_update: bool,
) -> np.ndarray:
    """The parameter after update t, from the moments m, v of that update."""
    beta1, beta2 = betas
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    with np.errstate(divide="ignore", invalid="ignore"):
        if optimized_update:
            return param - (lr * math.sqrt(bc2) / bc1) * m / (np.sqrt(v) + eps)
        return param - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)


class AdamOracle:
    """Adam over groups of float64 arrays, exactly as docs/NUMERICS.md writes it.

    ``groups``: dicts with ``params`` (arrays, copied to float64) and fully resolved ``lr``,
    ``betas``, ``eps``, ``weight_decay`` (and anything a subclass's hooks read).
    ``state[g][i]`` is a dict with ``step``, ``exp_avg``, ``exp_avg_sq`` once parameter i of
    group g has had its first update, else empty.
    """

    def __init__(
        self,
        groups: list[Group],
        *,
        optimized_update: bool = True,
        weight_decouple: bool = True,
        absolute: bool = False,
    ) -> None:
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self.params = [[np.array(p, dtype=np.float64) for p in g["params"]] for g in groups]
        self.state: list[list[dict[str, Any]]] = [[{} for _ in g["params"]] for g in groups]
        self.optimized_update = optimized_update
        self.weight_decouple = weight_decouple
        self.absolute = absolute

    # The spec's overridable pieces, for subclass oracles.

    def weight_decay(
        self, param: np.ndarray, grad: np.ndarray, group: Group
    ) -> tuple[np.ndarray, np.ndarray]:
        """The weight-decay object's call, as new (param, grad) arrays."""
        return decay(param, grad, group, self.weight_decouple, self.absolute)

    def init_state(self, state: dict[str, Any], group: Group, param: np.ndarray) -> None:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(param)
        state["exp_avg_sq"] = np.zeros_like(param)

    def get_mv(
        self, state: dict[str, Any], group: Group, grad: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        beta1, beta2 = group["betas"]
        state["exp_avg"] = beta1 * state["exp_avg"] + (1.0 - beta1) * grad
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * grad * grad
        return state["exp_avg"], state["exp_avg_sq"]

    def get_lr(self, state: dict[str, Any], group: Group) -> float:
        return group["lr"]

    def step_param(
        self, state: dict[str, Any], group: Group, grad: np.ndarray, param: np.ndarray
    ) -> np.ndarray:
        """One parameter's update; returns the new parameter."""
        param, grad = self.weight_decay(param, grad, group)
        m, v = self.get_mv(state, group, grad)
        state["step"] += 1
        lr = self.get_lr(state, group)
        return update(
            param, m, v, state["step"], lr, group["betas"], group["eps"], self.optimized_update
        )

    def step(self, grads: list[list[Optional[np.ndarray]]]) -> None:
        """One optimizer step; ``grads[g][i]`` is parameter i of group g's gradient or None."""
        for gi, group in enumerate(self.groups):
            for i, grad in enumerate(grads[gi]):
                if grad is None:
                    continue
                state = self.state[gi][i]
                param = self.params[gi][i]
                if not state:
                    self.init_state(state, group, param)
                grad = np.asarray(grad, dtype=np.float64)
                self.params[gi][i] = self.step_param(state, group, grad, param)
