r"""``rustadam.numpy``: Adam over numpy arrays, in place, through the Rust core (no torch needed).

For a parameter θ with gradient g at update t (t counts this parameter's updates from 1):

.. math::

    m_t = β_1 m_{t-1} + (1-β_1) g_t, \quad v_t = β_2 v_{t-1} + (1-β_2) g_t^2

and with :math:`bc_1 = 1-β_1^t`, :math:`bc_2 = 1-β_2^t` (float64):

- ``optimized_update=True`` (default): θ ← θ − (α·√bc2 / bc1) · m / (√v + ε̂), where the given
  ``eps`` is ε̂ = ε·√bc2;
- ``optimized_update=False``: θ ← θ − (α / bc1) · m / (√v / √bc2 + ε).

Weight decay runs first: with ``weight_decouple=True`` θ ← θ·(1 − α·λ) (θ ← θ·(1 − λ) when
``absolute``); with ``weight_decouple=False`` (L2) the moments see g + λ·θ (the gradient array
itself is not changed).

Arrays are float32 or float64, C-contiguous, any shape; a parameter's four arrays share one
dtype and shape. float32 arrays are computed in float32 with the hyper-parameter arithmetic in
float64. Bad input raises TypeError or ValueError naming the argument, before anything is
written. The kernel runs with the GIL released.

>>> import numpy as np
>>> from rustadam.numpy import Adam
>>> w = np.zeros(3)
>>> opt = Adam([w], lr=0.1)
>>> for _ in range(100):
...     opt.step([2 * (w - 1.0)])  # the gradient of ‖w − 1‖²
>>> bool(np.allclose(w, 1.0, atol=0.05))
True
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from rustadam import _core
from rustadam._alone import run_alone
from rustadam._numbers import as_float, is_real

__all__ = ["Adam", "adam_step"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# The configuration's arguments, in _config's order (also the keys of a state_dict's hyperparams).
_HYPERPARAMS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "weight_decouple",
    "absolute",
    "optimized_update",
)
# The largest step count the core takes: t counts updates and fits in 63 bits.
_MAX_STEP = 2**63 - 1


def _config(
    lr: float,
    betas: Sequence[float],
    eps: float,
    weight_decay: float,
    weight_decouple: bool = True,
    absolute: bool = False,
    optimized_update: bool = True,
) -> Any:
    """The core's validated config; ValueError with the torch API's messages when out of range."""
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (β1, β2), got {betas!r}")
    return _core.Config(
        lr=_number("lr", lr),
        betas=(_number("betas[0]", betas[0]), _number("betas[1]", betas[1])),
        eps=_number("eps", eps),
        weight_decay=_number("weight_decay", weight_decay),
        weight_decouple=_flag("weight_decouple", weight_decouple),
        absolute=_flag("absolute", absolute),
        optimized_update=_flag("optimized_update", optimized_update),
    )


def _flag(name: str, value: Any) -> bool:
    """A switch: a bool (numpy's included) or the int 0 or 1, never a truthy stand-in such as
    the string 'False'."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (int, np.integer)) and value in (0, 1)
    ):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_num_threads(num_threads: Optional[int]) -> None:
    if num_threads is not None and (
        not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1
    ):
        raise ValueError(f"Invalid num_threads: {num_threads!r}; expected an int >= 1")


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    step: int,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    weight_decouple: bool = True,
    absolute: bool = False,
    optimized_update: bool = True,
    num_threads: Optional[int] = None,
) -> None:
    """One Adam update of ``param`` in place (see the module docs for the math).

    Args:
        param: θ, updated in place.
        grad: g, only read.
        exp_avg: m, updated in place (zeros before the first update).
        exp_avg_sq: v, updated in place (zeros before the first update).
        step: t, the count of updates *including this one*: 1 on the first call, then 2, …
            The bias corrections use it, so pass the same sequence a torch optimizer's
            ``state['step']`` takes after its increment.
        lr: α (≥ 0).
        betas: (β1, β2), each in [0, 1).
        eps: ε̂ (``optimized_update=True``) or ε (≥ 0).
        weight_decay: λ (≥ 0).
        weight_decouple: decoupled decay (AdamW) when true, L2 when false.
        absolute: with decoupled decay, θ ← θ·(1 − λ) instead of θ·(1 − α·λ).
        optimized_update: which form of the bias correction to use.
        num_threads: threads of the Rust core (default: all cores); results do not depend on it.

    Raises:
        TypeError: an argument is not an ndarray, or not float32/float64, or its dtype
            differs from ``param``'s.
        ValueError: a hyper-parameter is out of range, ``step < 1``, shapes differ, an array
            is not C-contiguous, an updated array is read-only, or arrays share memory (one
            array passed twice).

    >>> import numpy as np
    >>> p, g = np.ones(2), np.array([0.5, -0.5])
    >>> m, v = np.zeros(2), np.zeros(2)
    >>> adam_step(p, g, m, v, 1, lr=0.01)
    >>> p  # the first update moves each element by α·sign(g)
    array([0.99, 1.01])
    """
    config = _config(lr, betas, eps, weight_decay, weight_decouple, absolute, optimized_update)
    _check_num_threads(num_threads)
    _core.numpy_adam_step(param, grad, exp_avg, exp_avg_sq, step, config, num_threads=num_threads)


class Adam:
    """Adam over a list of numpy arrays, updated in place; one Rust call per :meth:`step`.

    State per parameter, created on its first update: ``step`` (t, the count of updates done),
    ``exp_avg`` (m) and ``exp_avg_sq`` (v), zero arrays like the parameter. The
    hyper-parameters are attributes read at every step, so a schedule may change ``opt.lr``.

    Args:
        params: the arrays to optimise: float32 or float64, C-contiguous, writeable.
        lr, betas, eps, weight_decay, weight_decouple, absolute, optimized_update: as for
            :func:`adam_step`.
        num_threads: threads of the Rust core (default: all cores).

    >>> import numpy as np
    >>> w, b = np.zeros((2, 3), dtype=np.float32), np.zeros(2, dtype=np.float32)
    >>> opt = Adam([w, b], lr=1e-2, weight_decay=0.01)
    >>> opt.step([np.ones_like(w), None])  # None skips a parameter, as torch does
    >>> opt.state_dict()["state"][0]["step"], 1 in opt.state_dict()["state"]
    (1, False)
    """

    def __init__(
        self,
        params: Iterable[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        absolute: bool = False,
        optimized_update: bool = True,
        *,
        num_threads: Optional[int] = None,
    ) -> None:
        self.params: list[np.ndarray] = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list")
        for i, p in enumerate(self.params):
            _check_param(p, f"params[{i}]")
        _config(lr, betas, eps, weight_decay, weight_decouple, absolute, optimized_update)
        _check_num_threads(num_threads)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.weight_decouple = weight_decouple
        self.absolute = absolute
        self.optimized_update = optimized_update
        self.num_threads = num_threads
        # Parameter index -> {"step": int, "exp_avg": ndarray, "exp_avg_sq": ndarray}.
        self.state: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"Adam({len(self.params)} arrays, lr={self.lr}, betas={self.betas}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, weight_decouple={self.weight_decouple}, "
            f"absolute={self.absolute}, optimized_update={self.optimized_update})"
        )

    def step(self, grads: Sequence[Optional[np.ndarray]]) -> None:
        """One update of every parameter whose gradient is not None.

        ``grads[i]`` is the gradient of ``params[i]`` (same shape and dtype, C-contiguous).
        Every array is checked before anything is written: on an error no parameter, moment or
        step count changes.
        """
        run_alone(self, "rustadam.numpy.Adam", self._step, list(grads))

    def _step(self, grads: list[Optional[np.ndarray]]) -> None:
        if len(grads) != len(self.params):
            raise ValueError(f"step() got {len(grads)} gradients for {len(self.params)} parameters")
        config = _config(
            self.lr,
            self.betas,
            self.eps,
            self.weight_decay,
            self.weight_decouple,
            self.absolute,
            self.optimized_update,
        )
        _check_num_threads(self.num_threads)
        idx = [i for i, g in enumerate(grads) if g is not None]
        for i in idx:
            if i in self.state:
                _check_state(self.state[i], i)
        # New states are kept only once the step has succeeded.
        new = {i: _fresh_state(self.params[i]) for i in idx if i not in self.state}
        states = [self.state.get(i) or new[i] for i in idx]
        try:
            self.state.update(new)
            # The call advances the step counts itself, together with the arrays.
            _core.numpy_adam_step_many(
                [self.params[i] for i in idx],
                [grads[i] for i in idx],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [int(s["step"]) + 1 for s in states],  # a numpy int would wrap
                config,
                num_threads=self.num_threads,
                states=states,
                indices=idx,
            )
        except BaseException:
            # A new state the call did not advance (it raised, or an interrupt came first).
            for i, s in new.items():
                if s["step"] == 0:
                    self.state.pop(i, None)
            raise

    def __getstate__(self) -> dict[str, Any]:
        # The step lock belongs to this object in this process, not to its state: a copy (or
        # an unpickled one) makes its own.
        return {k: v for k, v in self.__dict__.items() if k != "_step_lock"}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: ``{"state": {i: {"step", "exp_avg", "exp_avg_sq"}},
        "hyperparams": {...}}``, with copies of the moment arrays."""
        return {
            "state": {
                i: {
                    "step": s["step"],
                    "exp_avg": s["exp_avg"].copy(),
                    "exp_avg_sq": s["exp_avg_sq"].copy(),
                }
                for i, s in self.state.items()
            },
            "hyperparams": {
                "lr": self.lr,
                "betas": tuple(self.betas),
                "eps": self.eps,
                "weight_decay": self.weight_decay,
                "weight_decouple": self.weight_decouple,
                "absolute": self.absolute,
                "optimized_update": self.optimized_update,
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` (copied, and cast to each parameter's dtype).

        Everything is checked before anything changes; ValueError names what does not fit.
        """
        if not isinstance(state_dict, Mapping) or not {"state", "hyperparams"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'hyperparams' entries")
        hyper = dict(state_dict["hyperparams"])
        known = set(_HYPERPARAMS)
        if set(hyper) != known:
            raise ValueError(
                f"state_dict['hyperparams'] must have the keys {sorted(known)}, got {sorted(hyper)}"
            )
        _config(*(hyper[k] for k in _HYPERPARAMS))
        state: dict[int, dict[str, Any]] = {}
        for key, s in dict(state_dict["state"]).items():
            i = _index(key, len(self.params))
            if i in state:
                raise ValueError(f"state_dict['state'] has two states for parameter {i}")
            p = self.params[i]
            _check_state(s, i)
            loaded = {"step": int(s["step"])}
            for name in ("exp_avg", "exp_avg_sq"):
                a = np.asarray(s[name])
                if a.shape != p.shape:
                    raise ValueError(
                        f"state of parameter {i}: {name} has shape {a.shape} but the parameter "
                        f"has shape {p.shape}"
                    )
                if a.dtype.kind not in "fiu":  # a complex moment would lose its imaginary part
                    raise ValueError(
                        f"state of parameter {i}: {name} has dtype {a.dtype}; it is cast to the "
                        f"parameter's {p.dtype}, which holds real numbers"
                    )
                loaded[name] = np.array(a, dtype=p.dtype, order="C", copy=True)
            state[i] = loaded
        self.lr = hyper["lr"]
        self.betas = tuple(hyper["betas"])
        self.eps = hyper["eps"]
        self.weight_decay = hyper["weight_decay"]
        self.weight_decouple = hyper["weight_decouple"]
        self.absolute = hyper["absolute"]
        self.optimized_update = hyper["optimized_update"]
        self.state = state


def _check_param(p: Any, name: str) -> None:
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(p).__name__}")
    if type(p) is not np.ndarray and isinstance(p, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray: the step would ignore its mask (update masked "
            "entries); pass its .data to update every entry"
        )
    if p.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {p.dtype}; rustadam.numpy takes float32 and float64")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; it is updated in place")
    if not p.flags.writeable:
        raise ValueError(f"{name} is read-only (its WRITEABLE flag is off)")


def _check_state(s: Any, i: int) -> None:
    """Parameter ``i``'s state: the three entries, ``step`` an int the next update can count
    past (ValueError naming the parameter and the entry)."""
    # Exact str keys: the step sets the count after the arrays are written, and a key of
    # another type would run its own __eq__ there.
    if (
        not isinstance(s, dict)
        or any(type(k) is not str for k in s)
        or set(s) != {"step", "exp_avg", "exp_avg_sq"}
    ):
        raise ValueError(
            f"state of parameter {i} must be a dict with the keys 'step', 'exp_avg' and "
            "'exp_avg_sq' (str)"
        )
    step = s["step"]
    if (
        isinstance(step, (bool, np.bool_))
        or not isinstance(step, (int, np.integer))
        or not 0 <= int(step) <= _MAX_STEP - 1
    ):
        raise ValueError(
            f"state of parameter {i}: step must be an int from 0 to {_MAX_STEP - 1} (the "
            f"count after the next update must fit in 63 bits), got {step!r}"
        )


def _number(name: str, x: Any) -> float:
    """A hyper-parameter as a float: a real number (numpy's too, or a 1-element real array),
    never a bool or a string such as "0.1"."""
    # The usual case skips the ABC checks.
    if type(x) is not float and type(x) is not int and not is_real(x):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    return as_float(name, x)


def _fresh_state(p: np.ndarray) -> dict[str, Any]:
    return {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}


def _index(key: Any, n: int) -> int:
    """A state key (an int, or its decimal string after a JSON round trip) as a parameter index."""
    try:
        if isinstance(key, (bool, np.bool_)):
            raise TypeError("a bool is not an index")
        i = int(key) if isinstance(key, str) else operator.index(key)
    except (TypeError, ValueError):
        raise ValueError(f"state_dict['state'] key {key!r} is not a parameter index") from None
    if not 0 <= i < n:
        raise ValueError(f"state_dict has state for parameter {i} but the optimizer has {n}")
    return i
