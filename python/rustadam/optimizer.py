"""``rustadam.Adam``: a ``torch.optim`` optimizer whose arithmetic runs in the Rust core."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
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
        backend: ``"auto"`` (default) sends every CPU tensor the Rust core takes (float32,
            float64, bfloat16, float16, complex64, complex128; any dense layout, other layouts as
            dense copies written back) to it in one call per group and steps the rest (other
            devices, DTensors placed unlike their parameter) with torch ops; ``"rust"`` raises for
            a tensor the core cannot take; ``"torch"`` uses torch ops only.
        num_threads: threads of the Rust core; default ``RUSTADAM_NUM_THREADS`` if set, else
            ``torch.get_num_threads()`` at each step. They are torch's OpenMP threads
            (``RUSTADAM_THREAD_POOL=rayon``: the core's own pool). Results do not depend on it.

    Subclasses may override :meth:`init_state`, :meth:`get_mv`, :meth:`get_lr`,
    :meth:`adam_update` and :meth:`step_param`; ``step()`` then calls them per parameter, so the
    override's behaviour is exactly what runs.

    ``torch.compile``: a compiled model trains with this optimizer like with any other. TorchDynamo
    cannot trace into the Rust extension, so in ``torch.compile(opt.step)`` the call to the Rust
    core (with the bookkeeping around it) runs eagerly behind a graph break
    (``torch.compiler.disable``) and gives exactly the results of the uncompiled step;
    ``fullgraph=True`` is therefore refused. Parameters that take the torch path
    (``backend="torch"``, CUDA tensors, overridden methods) are traced as torch ops and agree with
    the eager step to rounding; ``step`` counts are Python ints, so Dynamo recompiles once when
    they first change.

    ``torch.distributed``: DDP (also with ``gradient_as_bucket_view=True``) and
    ``ZeroRedundancyOptimizer(params, optimizer_class=Adam, ...)`` need nothing special. Under
    FSDP2 (``fully_shard``) parameters and gradients are DTensors; the state is created with
    ``zeros_like`` and so is a DTensor sharded like its parameter, and the Rust core steps each
    rank's local shards (``to_local()``), uneven or empty ones included. A DTensor whose gradient
    or state is placed differently is stepped with torch's ops on the DTensors (``backend="rust"``
    raises instead).

    ``torch.distributed.checkpoint``: ``get_state_dict`` / ``set_state_dict`` initialise an
    optimizer without state by one ``step()`` with zero gradients and lr = 0, as for every torch
    optimizer. Afterwards t = 1 for every parameter (a later step uses t = 2, as
    ``torch.optim.Adam`` does), and the parameters are unchanged without weight decay, with L2
    (its gradient λ·θ only fills the moments: m = (1−β1)·λθ, v = (1−β2)·(λθ)²) and with decoupled
    decay (factor 1 − 0·λ = 1). Absolute decay does not involve α, so that step multiplies every
    parameter by (1 − λ) once. Loading a checkpoint that holds the model too is unaffected: the
    model's saved values overwrite the parameters after that step. Only ``get_state_dict`` on an
    optimizer that has never stepped (to save before training, say) leaves them decayed; call it
    after the first ``step()`` there, since an optimizer with state is not stepped again.

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
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
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
        if not (callable(weight_decay) and callable(getattr(weight_decay, "defaults", None))):
            raise TypeError(
                f"weight_decay must be a WeightDecay (or an object with __call__(param, grad, "
                f"group) and defaults()), got {weight_decay!r}; for a coefficient write "
                f"WeightDecay({weight_decay!r}) (decoupled) or "
                f"WeightDecay({weight_decay!r}, weight_decouple=False) (L2)"
            )
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
        16-bit tensors are computed in float32 and rounded once when stored; the float32 moments
        are returned for the update.
        """
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        mr, vr, g = _real(m), _real(v), _real(grad.resolve_conj())
        m32, v32, g32 = _f32(mr), _f32(vr), _f32(g)
        m32.mul_(beta1).add_(g32, alpha=1 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        _store(mr, m32)
        _store(vr, v32)
        if m32 is mr:
            return m, v
        # 16-bit moments: the update uses the float32 values, as the Rust core does; the stored
        # copies were rounded once (a v that underflows float16 must not divide a non-zero m).
        return m32, v32

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
        p = _real(param.data)
        p32, mr, vr = _f32(p), _f32(_real(m)), _f32(_real(v))
        if self.optimized_update:
            denominator = vr.sqrt().add_(group["eps"])
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        else:
            denominator = (vr.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            step_size = lr / bias_correction1
        p32.addcdiv_(mr, denominator, value=-step_size)
        _store(p, p32)

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
            _check_writable(gi, group, i, param)
            if grad.dtype != param.dtype and not self._per_param_methods():
                # The base math would cast it silently; an override may mean to handle it.
                raise RuntimeError(
                    f"{_name(gi, group, i, param)}: its gradient has dtype {grad.dtype}, "
                    f"the parameter {param.dtype}"
                )
            state = self.state[param]
            if len(state) == 0:
                self.init_state(state, group, param)
            self.step_param(state, group, grad, param)

    # Dynamo cannot trace into the extension; run this part eagerly (one graph break) instead of
    # letting it trace the bookkeeping around the call. See "torch.compile" in the class docstring.
    @torch.compiler.disable
    def _step_group_fast(self, gi: int, group: dict[str, Any]) -> None:
        positions: list[int] = []
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        states: list[dict[str, Any]] = []
        # What the core sees: the tensors themselves, or a DTensor's local shards.
        core_p: list[torch.Tensor] = []
        core_g: list[torch.Tensor] = []
        core_m: list[torch.Tensor] = []
        core_v: list[torch.Tensor] = []
        torch_path: list[tuple[int, dict[str, Any], torch.Tensor, torch.Tensor]] = []
        dtensor = _dtensor_type()
        strided = torch.strided
        all_state = self.state
        # One pass over the group; this loop is most of the per-parameter cost, so it stays flat.
        for i, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if grad.layout is not strided:
                self._grad(gi, group, i, param)  # raises the sparse-gradient error
            state = all_state[param]
            if not state:
                self.init_state(state, group, param)
            bufs = (param, grad, state["exp_avg"], state["exp_avg_sq"])
            if dtensor is not None and (isinstance(param, dtensor) or isinstance(grad, dtensor)):
                local = _local_shards(dtensor, bufs)
                if local is None:
                    if self.backend == "rust":
                        raise RuntimeError(
                            f"rustadam.Adam cannot step {_name(gi, group, i, param)} on the Rust "
                            "core: its gradient and state are not all DTensors sharded like it"
                        )
                    # torch's ops on the DTensors redistribute where needed; stepped after the
                    # core's call, so an error the core raises leaves the whole group unchanged.
                    torch_path.append((i, state, grad, param))
                    continue
                bufs = local
            positions.append(i)
            params.append(param)
            grads.append(grad)
            states.append(state)
            core_p.append(bufs[0])
            core_g.append(bufs[1])
            core_m.append(bufs[2])
            core_v.append(bufs[3])
        if params:
            core_bufs = (core_p, core_g, core_m, core_v)
            self._step_on_core(gi, group, positions, params, grads, states, core_bufs)
        for i, state, grad, param in torch_path:
            _check_writable(gi, group, i, param)
            self.step_param(state, group, grad, param)

    def _step_on_core(
        self,
        gi: int,
        group: dict[str, Any],
        positions: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        core_bufs: tuple[list[torch.Tensor], ...],
    ) -> None:
        """One call of the core for the collected parameters; the torch path for what it left."""
        core_p, core_g, core_m, core_v = core_bufs
        steps = [s["step"] + 1 for s in states]
        beta1, beta2 = group["betas"]
        wd = self.weight_decay
        hyper = {
            "lr": float(group["lr"]),
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "weight_decouple": wd.weight_decouple,
            "absolute": wd.absolute,
            "optimized_update": self.optimized_update,
            "num_threads": self._threads(),
            # torch's OpenMP threads by default; RUSTADAM_THREAD_POOL=rayon for the core's own.
            "pool": os.environ.get("RUSTADAM_THREAD_POOL") or None,
        }
        strict = self.backend == "rust"
        ran, rejected = _core.adam_step(
            core_p, core_g, core_m, core_v, steps, strict=strict, cache=self._cache(gi), **hyper
        )
        if not ran:
            self._refuse(gi, group, positions, params, rejected[0])
        done = set(range(len(states))) - {k for k, _, _ in rejected}
        gather = [k for k, _, kind in rejected if kind == "layout"]
        if gather:
            # Not dense as they are: step dense copies, then write them back into the user's
            # tensors, so nothing the user holds changes what it aliases.
            bufs = [(core_p[k], core_g[k], core_m[k], core_v[k]) for k in gather]
            dense = [tuple(t.contiguous() for t in b) for b in bufs]
            ran, again = _core.adam_step(
                *(list(c) for c in zip(*dense)), [steps[k] for k in gather], strict=True, **hyper
            )
            if not ran:
                k, reason, kind = again[0]
                self._refuse(gi, group, positions, params, (gather[k], reason, kind))
            for b, d in zip(bufs, dense):
                for i in (0, 2, 3):
                    if d[i] is not b[i]:
                        b[i].copy_(d[i])
            done.update(gather)
        for k in done:
            states[k]["step"] = steps[k]
        for k in sorted(set(range(len(states))) - done):
            _check_writable(gi, group, positions[k], params[k])
            self.step_param(states[k], group, grads[k], params[k])

    def _cache(self, gi: int) -> _core.TensorCache:
        """The group's remembered tensor metadata (private: not copied, pickled or saved)."""
        caches = self.__dict__.setdefault("_core_caches", {})
        cache = caches.get(gi)
        if cache is None:
            cache = caches[gi] = _core.TensorCache()
        return cache

    def _refuse(
        self,
        gi: int,
        group: dict[str, Any],
        positions: list[int],
        params: list[torch.Tensor],
        rejection: tuple[int, str, str],
    ) -> None:
        k, reason, _ = rejection
        raise RuntimeError(
            f"rustadam.Adam cannot step {_name(gi, group, positions[k], params[k])} "
            f"on the Rust core: {reason}"
        )

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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group, as torch does.

        A weight-decay object given as a group's ``weight_decay`` stands for the values of its
        ``defaults()``: ZeroRedundancyOptimizer builds its shards' groups from defaults that hold
        the object passed to it as ``weight_decay=``.
        """
        wd = param_group.get("weight_decay") if isinstance(param_group, dict) else None
        if wd is not None and callable(getattr(wd, "defaults", None)):
            del param_group["weight_decay"]
            for key, value in wd.defaults().items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)

    # ---- torch.optim plumbing --------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this optimizer or of ``torch.optim.Adam`` / ``AdamW``.

        As for every torch optimizer, floating-point state is cast to each parameter's dtype and
        device, and ``step`` is kept (``torch.optim.Adam``'s tensor ``step`` becomes an int).
        Beyond torch's checks (the number of groups and of parameters in each), a state_dict
        that does not fit raises ValueError and leaves the optimizer unchanged: a group without
        ``lr``, ``betas``, ``eps`` or the weight decay's keys; a group that asks for what this
        optimizer does not do (``amsgrad``, ``maximize``, the other kind of weight decay); a
        parameter's state with a missing entry, a moment shaped unlike the parameter or a
        ``step`` that is not a count.
        """
        # Registered last, the check sees the dict the user's pre-hooks produced, and runs
        # before torch changes anything.
        handle = self.register_load_state_dict_pre_hook(_check_state_dict)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups; a copy must keep the weight decay,
        # optimized_update, backend, num_threads and every other public attribute. Hooks and
        # private bookkeeping are dropped, as torch does, and so are functions patched over
        # methods (an LR scheduler's `step` wrapper calls the original optimizer), except the
        # per-parameter methods, whose overrides are the math.
        state = super().__getstate__()
        for name, value in self.__dict__.items():
            if name.startswith("_") or name in state:
                continue
            if callable(value) and hasattr(type(self), name) and name not in _HOOKS:
                continue
            state[name] = value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim.Adam keeps `step` as a float tensor; the reference design counts with an int.
        for s in self.state.values():
            step = s.get("step") if isinstance(s, dict) else None
            if isinstance(step, torch.Tensor):
                s["step"] = int(step.item())
            elif isinstance(step, float):
                s["step"] = int(step)

    def __repr__(self) -> str:
        head = f"{type(self).__name__} ("
        settings = "".join(
            f"\n{name}: {getattr(self, name, None)!r}"
            for name in ("weight_decay", "optimized_update", "backend", "num_threads")
        )
        return head + settings + super().__repr__()[len(head) :]


def _check_state_dict(opt: Adam, state_dict: Any) -> None:
    """Raises ValueError if ``opt`` cannot take ``state_dict``; changes nothing."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"an optimizer state_dict is a dict, got {type(state_dict).__name__}")
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(f"the loaded state dict has no {' or '.join(map(repr, missing))} entry")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            "loaded state dict has a different number of parameter groups: "
            f"{len(saved_groups)}, the optimizer has {len(opt.param_groups)}"
        )
    hyper = ("lr", "betas", "eps", *opt.weight_decay.defaults())
    where: dict[Any, tuple[int, dict[str, Any], int, torch.Tensor]] = {}
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if ids is None:
            raise ValueError(f"param_groups[{gi}] of the loaded state dict has no 'params' list")
        if len(ids) != len(group["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group: param_groups[{gi}] has {len(ids)} parameters, the "
                f"optimizer's has {len(group['params'])}"
            )
        lacking = [k for k in hyper if k not in saved]
        if lacking:
            raise ValueError(f"param_groups[{gi}] of the loaded state dict has no {lacking}")
        for key in ("amsgrad", "maximize"):
            if saved.get(key) and key not in opt.defaults:
                raise ValueError(
                    f"param_groups[{gi}] of the loaded state dict sets {key}=True, "
                    f"which {type(opt).__name__} does not implement"
                )
        _check_decay_kind(opt, gi, saved)
        for i, (pid, param) in enumerate(zip(ids, group["params"])):
            where[pid] = (gi, group, i, param)
    for pid, entry in saved_state.items():
        if pid not in where:
            continue  # torch keeps state of no listed parameter as it is
        gi, group, i, param = where[pid]
        _check_param_state(opt, entry, _name(gi, group, i, param), group, param)


def _check_decay_kind(opt: Adam, gi: int, saved: Mapping[str, Any]) -> None:
    """torch.optim.Adam/AdamW record which decay their ``weight_decay`` means; refuse the other."""
    wd = opt.weight_decay
    if (
        "decoupled_weight_decay" not in saved
        or "decoupled_weight_decay" in opt.defaults
        or not saved.get("weight_decay")
        or not isinstance(wd, WeightDecay)
    ):
        return
    decoupled = bool(saved["decoupled_weight_decay"])
    if decoupled == wd.weight_decouple and not wd.absolute:
        return
    kind = "decoupled (AdamW)" if decoupled else "L2"
    raise ValueError(
        f"param_groups[{gi}] of the loaded state dict comes from a torch optimizer with {kind} "
        f"weight decay {saved['weight_decay']}, but this optimizer has {wd!r}; construct it with "
        f"WeightDecay({saved['weight_decay']}, weight_decouple={decoupled}) to continue"
    )


def _check_param_state(
    opt: Adam, entry: Any, name: str, group: dict[str, Any], param: torch.Tensor
) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"the loaded state of {name} is a {type(entry).__name__}, not a dict")
    if len(entry) == 0:
        return
    expected = _expected_state(opt, group, param)
    if expected is None:
        return
    lacking = [k for k in expected if k not in entry]
    if lacking:
        raise ValueError(f"the loaded state of {name} has no {lacking}")
    for key, shape in expected.items():
        value = entry[key]
        if key == "step":
            if not _is_count(value):
                raise ValueError(f"the loaded state of {name} has step={value!r}, not a count")
        elif shape is not None:
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"the loaded state of {name} has a {type(value).__name__} as {key!r}, "
                    "not a tensor"
                )
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"the loaded state of {name} has {key!r} of shape {tuple(value.shape)}, "
                    f"expected {shape}"
                )


def _expected_state(
    opt: Adam, group: dict[str, Any], param: torch.Tensor
) -> Optional[dict[str, Optional[tuple[int, ...]]]]:
    """The entries ``init_state`` creates for ``param``: name -> shape (None: not a tensor)."""
    if type(opt).init_state is Adam.init_state and "init_state" not in opt.__dict__:
        shape = tuple(param.shape)
        return {"step": None, "exp_avg": shape, "exp_avg_sq": shape}
    probe: dict[str, Any] = {}
    try:
        opt.init_state(probe, group, torch.empty_like(param, device="meta"))
    except Exception:  # an override that needs real data; torch's own checks remain
        return None
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in probe.items()}


def _is_count(step: Any) -> bool:
    """An int, or torch.optim.Adam's float tensor, holding a whole number >= 0."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex():
            return False
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return False
    return step >= 0 and float(step).is_integer()


def _dtensor_type() -> Optional[type]:
    """``DTensor`` once torch.distributed.tensor is loaded (before, none exists), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local_shards(
    dtensor: type, buffers: tuple[torch.Tensor, ...]
) -> Optional[tuple[torch.Tensor, ...]]:
    """This rank's shards of (param, grad, exp_avg, exp_avg_sq), or None if they do not match.

    The update is elementwise, so DTensors that all have the parameter's mesh, placements and
    shape are stepped shard by shard: ``to_local()`` shares their memory, and FSDP2's uneven
    or empty shards are just shorter or empty local tensors. A mix (a Partial gradient, a plain
    tensor as state) is None: only torch's ops on the DTensors can step it.
    """
    param = buffers[0]
    for t in buffers:
        if not (
            isinstance(t, dtensor)
            and t.device_mesh == param.device_mesh
            and t.placements == param.placements
            and t.shape == param.shape
        ):
            return None
    return tuple(t.to_local() for t in buffers)


_HALF = (torch.float16, torch.bfloat16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats are computed in float32 (SPEC: rounded once when stored); others in place.

    float16 cannot even hold the default eps (1e-16 rounds to 0), so a zero gradient would give
    0/0 in float16 arithmetic.
    """
    return t.float() if t.dtype in _HALF else t


def _store(t: torch.Tensor, computed: torch.Tensor) -> None:
    """Writes a float32 result back into its 16-bit tensor (one rounding); no-op otherwise."""
    if computed is not t:
        t.copy_(computed)


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
    dtensor = _dtensor_type()
    if dtensor is not None and (isinstance(param, dtensor) or isinstance(grad, dtensor)):
        # A DTensor has no storage of its own; its local shard has.
        if not (isinstance(param, dtensor) and isinstance(grad, dtensor)):
            return
        param, grad = param.to_local(), grad.to_local()
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


def _check_writable(gi: int, group: dict[str, Any], i: int, param: torch.Tensor) -> None:
    """A conjugate view stores the conjugate: stepping it in place cannot be right."""
    if param.is_complex() and param.is_conj():
        raise RuntimeError(
            f"{_name(gi, group, i, param)}: it is a conjugate view (is_conj() is set); "
            "step a resolved tensor (param.resolve_conj()) instead"
        )


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last element of a view."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
