"""``rustadam.Adam``: a ``torch.optim`` optimizer whose arithmetic runs in the Rust core."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
from torch.optim.optimizer import Optimizer

from rustadam import _core
from rustadam.weight_decay import WeightDecay

__all__ = ["Adam"]

_BACKENDS = ("auto", "rust", "torch")
# The per-parameter methods a subclass may override; any override sends the whole step through
# them, one parameter at a time.
_HOOKS = ("init_state", "get_mv", "get_lr", "adam_update", "step_param")

Params = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


class Adam(Optimizer):
    r"""Adam, exactly as specified, with a fused Rust kernel for CPU tensors.

    For a parameter θ with gradient g at update t (t counts this parameter's updates from 1):

    .. math::

        m_t = β_1 m_{t-1} + (1-β_1) g_t, \quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2

    and with :math:`bc_1 = 1-β_1^t`, :math:`bc_2 = 1-β_2^t` (float64):

    - ``optimized_update=True`` (default): θ ← θ − (α·√bc2 / bc1) · m / (√v + ε̂), where the
      given ``eps`` is ε̂ = ε·√bc2;
    - ``optimized_update=False``: θ ← θ − (α / bc1) · m / (√v / √bc2 + ε).

    Per parameter, in this order: ``grad = weight_decay(param, grad, group)``; update m and v with
    that grad; t ← t + 1; apply the update. ``lr``, ``betas``, ``eps`` and ``weight_decay`` are
    read from each parameter group at every step.

    Args:
        params: tensors or parameter-group dicts, as for every torch optimizer.
        lr: α (≥ 0).
        betas: (β1, β2), each in [0, 1).
        eps: ε̂ (``optimized_update=True``) or ε (≥ 0).
        weight_decay: a :class:`WeightDecay` (or any object with its interface).
        optimized_update: which form of the bias correction to use (above).
        defaults: default group values for subclasses; extended with
            ``weight_decay.defaults()`` and ``lr``, ``betas``, ``eps``.
        backend: ``"auto"`` (default) sends every CPU float32/float64 tensor the Rust core takes
            to it in one call per group and steps the rest with torch ops; ``"rust"`` raises for a
            tensor the core cannot take; ``"torch"`` uses torch ops only.
        num_threads: threads of the Rust core; default ``RUSTADAM_NUM_THREADS`` if set, else
            ``torch.get_num_threads()`` at each step. Results do not depend on it.

    Subclasses may override :meth:`init_state`, :meth:`get_mv`, :meth:`get_lr`,
    :meth:`adam_update` and :meth:`step_param`; ``step()`` then calls them per parameter, so the
    override's behaviour is exactly what runs.

    Example:
        >>> import torch
        >>> from rustadam import Adam, WeightDecay
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = Adam(model.parameters(), lr=1e-2, weight_decay=WeightDecay(0.01))
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay = WeightDecay(),  # noqa: B008 (immutable, as in the spec)
        optimized_update: bool = True,
        defaults: Optional[dict[str, Any]] = None,
        *,
        backend: str = "auto",
        num_threads: Optional[int] = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {_BACKENDS}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"Invalid num_threads: {num_threads!r}; expected an int >= 1")
        defaults = {} if defaults is None else dict(defaults)
        defaults.update(weight_decay.defaults())
        defaults.update(lr=lr, betas=betas, eps=eps)
        super().__init__(params, defaults)
        self.weight_decay = weight_decay
        self.optimized_update = optimized_update
        self.backend = backend
        self.num_threads = num_threads

    # ---- the overridable per-parameter methods (the reference design) -------------------------

    def init_state(self, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor) -> None:
        """Creates a parameter's state on its first update: ``step`` = 0 and zero moments."""
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def get_mv(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates the moments in place: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²; returns them.

        Complex tensors count as pairs of reals, so v holds squared real and imaginary parts.
        """
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        mr, vr, g = _real(m), _real(v), _real(grad)
        mr.mul_(beta1).add_(g, alpha=1 - beta1)
        vr.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return m, v

    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        """The learning rate α of this update; the base returns ``group['lr']``."""
        return group["lr"]

    def adam_update(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        param: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Applies θ ← θ − step_size · m / denominator, in the form ``optimized_update`` picks."""
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        lr = float(self.get_lr(state, group))
        p, mr, vr = _real(param.data), _real(m), _real(v)
        if self.optimized_update:
            denominator = vr.sqrt().add_(group["eps"])
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        else:
            denominator = (vr.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            step_size = lr / bias_correction1
        p.addcdiv_(mr, denominator, value=-step_size)

    def step_param(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor, param: torch.Tensor
    ) -> None:
        """One parameter's update: weight decay, moments, t ← t + 1, then :meth:`adam_update`."""
        grad = self.weight_decay(param, grad, group)
        m, v = self.get_mv(state, group, grad)
        state["step"] += 1
        self.adam_update(state, group, param, m, v)

    # ---- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs one update of every parameter that has a gradient.

        If ``closure`` is given it is called first, with autograd enabled, and its return value
        (the loss) is returned; otherwise None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_param = self.backend == "torch" or self._per_param_methods()
        for gi, group in enumerate(self.param_groups):
            if per_param:
                self._step_group_per_param(gi, group)
            else:
                self._step_group_fast(gi, group)
        return loss

    def _per_param_methods(self) -> bool:
        """Whether a subclass, an instance attribute or a foreign weight decay changes the math."""
        cls = type(self)
        if any(getattr(cls, h) is not getattr(Adam, h) for h in _HOOKS):
            return True
        if any(h in self.__dict__ for h in _HOOKS):
            return True
        return type(self.weight_decay) is not WeightDecay

    def _grad(self, gi: int, group: dict[str, Any], i: int, param: torch.Tensor) -> Any:
        grad = param.grad
        if grad is not None and grad.layout is not torch.strided:
            raise RuntimeError(
                f"rustadam.Adam does not support sparse gradients ({_name(gi, group, i, param)} "
                f"has a {grad.layout} gradient); consider torch.optim.SparseAdam"
            )
        return grad

    def _step_group_per_param(self, gi: int, group: dict[str, Any]) -> None:
        for i, param in enumerate(group["params"]):
            grad = self._grad(gi, group, i, param)
            if grad is None:
                continue
            _check_not_aliased(gi, group, i, param, grad)
            state = self.state[param]
            if len(state) == 0:
                self.init_state(state, group, param)
            self.step_param(state, group, grad, param)

    def _step_group_fast(self, gi: int, group: dict[str, Any]) -> None:
        positions: list[int] = []
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        states: list[dict[str, Any]] = []
        for i, param in enumerate(group["params"]):
            grad = self._grad(gi, group, i, param)
            if grad is None:
                continue
            state = self.state[param]
            if len(state) == 0:
                self.init_state(state, group, param)
            positions.append(i)
            params.append(param)
            grads.append(grad)
            states.append(state)
        if not params:
            return
        steps = [s["step"] + 1 for s in states]
        beta1, beta2 = group["betas"]
        wd = self.weight_decay
        ran, rejected = _core.adam_step(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            steps,
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            weight_decouple=wd.weight_decouple,
            absolute=wd.absolute,
            optimized_update=self.optimized_update,
            num_threads=self._threads(),
            strict=self.backend == "rust",
        )
        if not ran:
            k, reason, _ = rejected[0]
            raise RuntimeError(
                f"rustadam.Adam cannot step {_name(gi, group, positions[k], params[k])} "
                f"on the Rust core: {reason}"
            )
        skipped = {k for k, _, _ in rejected}
        for k, state in enumerate(states):
            if k not in skipped:
                state["step"] = steps[k]
        for k in sorted(skipped):
            self.step_param(states[k], group, grads[k], params[k])

    def _threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        env = os.environ.get("RUSTADAM_NUM_THREADS")
        if env:
            try:
                n = int(env)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"RUSTADAM_NUM_THREADS must be an int >= 1, got {env!r}")
            return n
        return torch.get_num_threads()

    # ---- torch.optim plumbing --------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim.Adam keeps `step` as a tensor; the reference design counts with an int.
        for s in self.state.values():
            step = s.get("step") if isinstance(s, dict) else None
            if isinstance(step, torch.Tensor):
                s["step"] = int(step.item())


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as pairs of reals (as torch.optim.Adam treats them); others unchanged."""
    return torch.view_as_real(t) if t.is_complex() else t


def _name(gi: int, group: dict[str, Any], i: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    label = f"param_groups[{gi}]['params'][{i}]"
    if names is not None and i < len(names):
        label = f"parameter {names[i]!r} ({label})"
    return f"{label} (shape {tuple(param.shape)}, {param.dtype}, {param.device})"


def _check_not_aliased(
    gi: int, group: dict[str, Any], i: int, param: torch.Tensor, grad: torch.Tensor
) -> None:
    """A gradient sharing memory with its parameter makes every result meaningless."""
    if param.device != grad.device or param.numel() == 0 or grad.numel() == 0:
        return
    ps, gs = param.untyped_storage(), grad.untyped_storage()
    if ps.data_ptr() != gs.data_ptr():
        return
    p0, g0 = param.data_ptr(), grad.data_ptr()
    p1 = p0 + _extent(param) * param.element_size()
    g1 = g0 + _extent(grad) * grad.element_size()
    if p0 < g1 and g0 < p1:
        raise RuntimeError(
            f"{_name(gi, group, i, param)}: its gradient shares memory with the parameter"
        )


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last element of a view."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
