"""``rustadam.Adam``: a ``torch.optim`` optimizer whose arithmetic runs in the Rust core."""

from __future__ import annotations

import copy
import functools
import math
import sys
import weakref
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.optim.optimizer import (
    Optimizer,
    _global_optimizer_post_hooks,
    _global_optimizer_pre_hooks,
)

from rustadam import _core, _foreach, _rounding, functional
from rustadam._alone import run_alone
from rustadam._numbers import as_float, is_real
from rustadam._state_dict import (
    GROUP_DECAY_KIND,
    MAX_STEP,
    OPTIMIZER_DECAY_KIND,
    check_state_dict,
    decay_kind,
    group_decay,
)
from rustadam.functional import param_label
from rustadam.weight_decay import WeightDecay

__all__ = ["Adam"]

_BACKENDS = ("auto", "rust", "triton", "foreach", "torch")
_ROUNDINGS = ("nearest", "stochastic", "kahan")
# Group keys of other optimizers that would change the math; refused rather than ignored.
_REFUSED_KEYS = (
    "differentiable", "nesterov", "amsbound", "decoupled", "rectify", "momentum",
    # NAdam's, whose checkpoints have Adam's keys too (other torch optimizers' lack betas and
    # are refused for that). Not generic names: wrappers such as SAM keep keys of their own
    # (rho, adaptive, lambd) in the groups they hand to the base optimizer.
    "momentum_decay",
)  # fmt: skip
# The per-parameter methods a subclass may override; any override sends the whole step through
# them, one parameter at a time.
_HOOKS = ("init_state", "get_mv", "get_lr", "adam_update", "step_param")
# The keys every group has (the constructor's defaults); one deleted is refused, not defaulted.
_GROUP_KEYS = ("lr", "betas", "eps", "maximize", "amsgrad")
_DECAY_GROUP_KEYS = frozenset((*_GROUP_KEYS, "weight_decay"))

Params = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


def _step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``Optimizer.step`` wrapper (step pre/post hooks, global and per optimizer, and
    the profiler's record), with the record made only while a profiler runs: it costs a few µs
    on every step otherwise. Marked ``hooked`` so that torch does not wrap it again; a subclass
    that overrides ``step`` gets torch's wrapper, and its hooks are not run twice."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if type(self).step is not wrapper and _torch_runs_hooks(type(self).step, wrapper):
            return step(*args, **kwargs)  # the subclass's own (torch-made) wrapper runs them
        if torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled():
            name = f"Optimizer.step#{type(self).__name__}.step"
            with torch.autograd.profiler.record_function(name):
                return _run_step_hooks(step, self, args, kwargs)
        return _run_step_hooks(step, self, args, kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


# The code of the wrapper torch puts around a ``step`` not marked ``hooked``.
_TORCH_HOOK_CODE = getattr(Optimizer.profile_hook_step(lambda *a, **k: None), "__code__", None)


def _torch_runs_hooks(outer: Any, ours: Callable[..., Any]) -> bool:
    """Whether the ``step`` a call starts from is (or wraps, through ``__wrapped__``) torch's
    hook wrapper before it reaches ours. A function that copied our ``hooked`` mark with
    ``functools.wraps`` (a subclass's ``@functools.wraps(Adam.step)``, a patched class) is not
    wrapped by torch, so our wrapper must run the hooks then."""
    f = outer
    for _ in range(64):  # a __wrapped__ chain is short; a cycle must not hang the step
        if f is None or f is ours:
            return False
        if getattr(f, "__code__", None) is _TORCH_HOOK_CODE:
            return True
        f = getattr(f, "__wrapped__", None)
    return False


def _run_step_hooks(step: Callable[..., Any], self: Any, args: Any, kwargs: Any) -> Any:
    """What torch's wrapper does around ``step``, in its order."""
    pre = self._optimizer_step_pre_hooks
    if _global_optimizer_pre_hooks or pre:
        for hook in (*_global_optimizer_pre_hooks.values(), *pre.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(
                        f"{step} must return None or a tuple of (new_args, new_kwargs), but got "
                        f"{result}."
                    )
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    post = self._optimizer_step_post_hooks
    if post or _global_optimizer_post_hooks:
        for hook in (*post.values(), *_global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
    return out


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
        lr: α (≥ 0); a float or a 1-element tensor.
        betas: (β1, β2), each in [0, 1).
        eps: ε̂ (``optimized_update=True``) or ε (≥ 0).
        weight_decay: a :class:`WeightDecay` (or any object with its interface), or a number λ,
            which means ``WeightDecay(λ)``: decoupled decay as in AdamW. For L2 decay (as in
            ``torch.optim.Adam``) pass ``WeightDecay(λ, weight_decouple=False)``. A group may set
            its own ``weight_decay``: a number (λ for the optimizer's kind of decay) or a
            ``WeightDecay`` (its kind and λ).
        optimized_update: which form of the bias correction to use (above); a group may set it.
        defaults: default group values for subclasses; extended with
            ``weight_decay.defaults()`` and ``lr``, ``betas``, ``eps``, ``maximize``, ``amsgrad``.
        maximize: ascend: the gradient's sign is flipped before the decay and the moments, as in
            ``torch.optim.Adam``; also a group key.
        amsgrad: keep the running maximum of v (state ``max_exp_avg_sq``) and divide by its
            square root instead, as in ``torch.optim.Adam``; also a group key.
        rounding: how a bfloat16 or float16 parameter's float32 result is stored: ``"nearest"``
            (the spec), ``"stochastic"`` (up or down with probability proportional to the
            distance, from a counter-based generator keyed by (``seed``, step, element), so the
            result depends on nothing else) or ``"kahan"`` (state ``compensation`` in the
            parameter's dtype carries each step's rounding error into the next). Updates smaller
            than half an ulp are lost to ``"nearest"`` and kept, on average, by the others.
            Other dtypes are not affected. Also a group key.
        seed: the stochastic rounding's seed (an int in [0, 2**64)).
        gradient_release: step each parameter inside ``backward()`` as soon as its gradient is
            accumulated, then free that gradient (the peak memory falls by about the gradients'
            size). ``step(closure)`` then runs the closure and steps only a parameter that
            still has a gradient (one the hooks did not reach); ``zero_grad()`` is harmless;
            schedulers, state dicts and ``add_param_group`` keep working. It does not combine
            with accumulating gradients over several backward passes, clipping by the global norm
            (each parameter steps before the others' gradients exist), DDP's gradient reducer
            or ``torch.amp.GradScaler`` (refused at ``step``).
        backend: ``"auto"`` (default) sends every CPU tensor the Rust core takes (float32,
            float64, bfloat16, float16, complex64, complex128; any layout, non-dense ones as dense
            copies written back) to it in one call for all groups, CUDA tensors to one Triton
            launch per device and dtype when triton imports, and everything else to
            ``torch._foreach_*`` ops. ``"rust"`` raises for a tensor the core cannot take;
            ``"triton"`` and ``"foreach"`` force those paths; ``"torch"`` steps one parameter at a
            time with torch ops (the spec's per-parameter methods). Every path gives the same
            numbers (see the README's numerics section).
        num_threads: threads of the Rust core (1 to 1024); default ``RUSTADAM_NUM_THREADS`` if
            set, else ``torch.get_num_threads()`` at each step. They are torch's OpenMP threads
            (``RUSTADAM_THREAD_POOL=rayon``: the core's own pool). Results do not depend on it.

    A step is all or nothing: every parameter, gradient, state and group value of every group is
    checked first, and an error names the group and parameter (``param_names`` when the group
    has them) and changes nothing. Any other group key that would change the math (``nesterov``,
    ``differentiable``, …) is refused. Two threads stepping one optimizer get a ``RuntimeError``.

    ``torch.amp.GradScaler``: the optimizer takes the fused route (``_step_supports_amp_scaling``):
    the gradients are unscaled inside the step, and a step with inf/NaN gradients changes nothing,
    step counts included.

    Subclasses may override :meth:`init_state`, :meth:`get_mv`, :meth:`get_lr`,
    :meth:`adam_update` and :meth:`step_param`; ``step()`` then calls them per parameter, so the
    override's behaviour is exactly what runs.

    ``torch.compile``: a compiled model trains with this optimizer like with any other. TorchDynamo
    cannot trace into the Rust extension, so in ``torch.compile(opt.step)`` the whole step runs
    eagerly behind one graph break (at ``_rustadam_step_runs_eagerly``, which names the reason)
    and gives exactly the results of the uncompiled step; ``fullgraph=True`` is therefore
    refused. Importing rustadam does not import ``torch._dynamo``.

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

    # GradScaler hands the scale and the found-inf flag to step() (no separate unscale); a
    # class attribute, so that copies and unpickled optimizers keep it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Params,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: Union[WeightDecay, float] = WeightDecay(),  # noqa: B008 (immutable)
        optimized_update: bool = True,
        defaults: Optional[dict[str, Any]] = None,
        *,
        maximize: bool = False,
        amsgrad: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
        gradient_release: bool = False,
        backend: str = "auto",
        num_threads: Optional[int] = None,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if _is_number(weight_decay):
            weight_decay = WeightDecay(weight_decay)  # decoupled, as AdamW
        # The core's rules (and messages, with the values as given) validate every
        # hyper-parameter.
        _core.Config(
            lr=_given("lr", lr),
            betas=_given_pair(betas),
            eps=_given("eps", eps),
            rounding=rounding,
        )
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {_BACKENDS}")
        _check_threads(num_threads)
        if not (callable(weight_decay) and callable(getattr(weight_decay, "defaults", None))):
            raise TypeError(
                f"weight_decay must be a number, a WeightDecay or an object with "
                f"__call__(param, grad, group) and defaults(), got {weight_decay!r}"
            )
        _check_seed(seed)
        defaults = {} if defaults is None else dict(defaults)
        defaults.update(weight_decay.defaults())
        defaults.update(lr=lr, betas=betas, eps=eps, maximize=maximize, amsgrad=amsgrad)
        self.weight_decay = weight_decay
        self.optimized_update = optimized_update
        self.rounding = rounding
        self.seed = seed
        self.backend = backend
        self.num_threads = num_threads
        self.gradient_release = bool(gradient_release)
        super().__init__(params, defaults)
        if self.gradient_release:
            self._hook_params()

    # ---- the overridable per-parameter methods (the reference design) -------------------------

    def init_state(self, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor) -> None:
        """Creates a parameter's state on its first update: ``step`` = 0 and zero moments.

        With ``amsgrad`` also ``max_exp_avg_sq``; with ``rounding="kahan"`` a 16-bit parameter
        also gets its ``compensation`` buffer.
        """
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if self._rounding(group) == "kahan" and param.dtype in _rounding.SIXTEEN_BIT:
            state["compensation"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def get_mv(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates the moments in place: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²; returns them.

        With ``amsgrad`` the returned v is v_max ← max(v_max, v). Complex tensors count as pairs
        of reals. 16-bit tensors are computed in float32 and rounded once when stored; the
        float32 values are returned for the update.
        """
        beta1, beta2 = _pair(group["betas"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        mr, vr, g = _real(m), _real(v), _real(grad.resolve_conj())
        m32, v32, g32 = _f32(mr), _f32(vr), _f32(g)
        c = g32.dtype
        b1, omb1 = _k(beta1, c), _k(1 - beta1, c)
        b2, omb2 = _k(beta2, c), _k(1 - beta2, c)
        m_new = _rounding.fma_scalar(g32, omb1, m32 * b1)
        v_new = _rounding.fma_square(g32, omb2, v32 * b2)
        _write(mr, m_new)
        _write(vr, v_new)
        if group.get("amsgrad"):
            vmax = _real(state["max_exp_avg_sq"])
            v_new = torch.maximum(_f32(vmax), v_new)
            _write(vmax, v_new)
        return m_new, v_new

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
        beta1, beta2 = _pair(group["betas"])
        t = state["step"]
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        lr = as_float("lr", self.get_lr(state, group))
        p = _real(param.data)
        p32, mr, vr = _f32(p), _f32(_real(m)), _f32(_real(v))
        c = p32.dtype
        # In place on the temporaries: large tensors allocate (and fault in) less.
        denominator = _rounding.sqrt_rn(vr)
        if group.get("optimized_update", self.optimized_update):
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        else:
            # A tensor divisor (expanded, not allocated): a scalar one may be applied as a
            # product with its reciprocal (CUDA does), which rounds differently.
            sqrt_bc2 = _k(math.sqrt(bias_correction2), c)
            ones = (1,) * vr.dim()
            denominator.div_(torch.full(ones, sqrt_bc2, dtype=c, device=vr.device).expand_as(vr))
            step_size = lr / bias_correction1
        denominator.add_(_k(group["eps"], c))
        u = (mr * _k(step_size, c)).div_(denominator)
        rounding = self._rounding(group)
        if p.dtype in _HALF and rounding == "kahan":
            if state.get("compensation") is None:
                raise RuntimeError(
                    "rounding='kahan' needs a compensation buffer for a 16-bit parameter"
                )
            compensation = _real(state["compensation"])  # complex32: pairs, as p
            new, comp = _rounding.kahan_update(p32, u, compensation, p.dtype)
            p.copy_(new)
            compensation.copy_(comp)
        elif p.dtype in _HALF and rounding == "stochastic":
            index = _rounding.element_index(p)
            p.copy_(_rounding.stochastic_round(p32 - u, p.dtype, self._seed(param), t, index))
        else:
            _write(p, p32 - u)

    def step_param(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor, param: torch.Tensor
    ) -> None:
        """One parameter's update: weight decay, moments, t ← t + 1, then :meth:`adam_update`."""
        if group.get("maximize"):
            grad = -grad
        grad = self._decay(group)(param, grad, group)
        m, v = self.get_mv(state, group, grad)
        state["step"] += 1
        self.adam_update(state, group, param, m, v)

    # ---- step ----------------------------------------------------------------------------------

    @_step_hooks
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs one update of every parameter that has a gradient.

        If ``closure`` is given it is called first, with autograd enabled, and its return value
        (the loss) is returned; otherwise None. All or nothing: an error leaves every parameter,
        moment and step count of every group as it was.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.gradient_release:
            # GradScaler.step sets both; after its unscale_ (to clip, say) only found_inf.
            scaler = (getattr(self, k, None) is not None for k in ("grad_scale", "found_inf"))
            if any(scaler):
                raise RuntimeError(
                    "rustadam.Adam(gradient_release=True) steps each parameter inside "
                    "backward, before GradScaler can unscale or skip: it does not combine "
                    "with torch.amp.GradScaler"
                )
            # The backward pass stepped every hooked parameter and freed its gradient. One
            # with a gradient now was not stepped (appended to a group's list, given
            # requires_grad or a gradient by hand since the hooks were placed): it is stepped
            # here, as torch.optim.Adam would, and hooked for the next backward.
            self._hook_params()
            self._refuse_twice()  # listed twice by a change the hooks could not see
            pending = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if pending:
                self._locked(self._step_all)
                for p in pending:
                    p.grad = None
            return loss
        if torch.compiler.is_compiling():
            _rustadam_step_runs_eagerly(self._locked, self._step_all)
        else:
            self._locked(self._step_all)
        return loss

    def _locked(self, fn: Callable[..., None], *args: Any) -> None:
        """Runs ``fn`` as this optimizer's only step in progress; RuntimeError if one runs."""
        run_alone(self, "rustadam.Adam", fn, *args)

    # ---- gradient release ----------------------------------------------------------------------

    def _hook_params(self) -> None:
        """Steps each parameter as soon as its gradient is accumulated (gradient_release)."""
        handles = self.__dict__.get("_release_handles")
        if handles is None:
            handles = self.__dict__["_release_handles"] = {}
            # The hooks hold the optimizer weakly and go with it: a dropped optimizer (or one
            # replaced by another that loaded its state dict) stops stepping the parameters.
            weakref.finalize(self, _remove_hooks, handles)
        before = self.__dict__.get("_release_where", {})
        where = self.__dict__["_release_where"] = {}
        twice = self.__dict__["_release_twice"] = {}
        self.__dict__["_release_sizes"] = _sizes(self.param_groups)
        me = weakref.ref(self)
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) in where:
                    twice[id(p)] = (where[id(p)], (gi, i))
                    continue
                where[id(p)] = (gi, i)
                held = handles.get(id(p))
                # By identity: a parameter freed since may have left its id to this one.
                if not p.requires_grad:
                    continue
                if held is None or held[0]() is not p:
                    hook = p.register_post_accumulate_grad_hook(functools.partial(_released, me))
                    handles[id(p)] = (weakref.ref(p), hook)
                elif id(p) in before:
                    continue  # held and hooked since before: whoever steps it goes on
                # Hooked or taken into the groups just now: this optimizer steps it.
                _RELEASE_OWNER[id(p)] = (weakref.ref(p), me)

    def _refuse_twice(self, key: Optional[int] = None) -> None:
        """RuntimeError naming a parameter the groups list twice (the one of id ``key``, or
        any), as the usual step refuses it."""
        twice = self.__dict__.get("_release_twice", {})
        for k, ((g1, i1), (g2, i2)) in twice.items():
            if key is None or k == key:
                groups = self.param_groups
                p = groups[g2]["params"][i2]
                raise RuntimeError(
                    f"{param_label(g2, groups[g2], i2, p)}: it is the same tensor as "
                    f"{param_label(g1, groups[g1], i1, p)}; list each parameter once"
                )

    def _release(self, param: torch.Tensor) -> None:
        """Steps ``param`` with its fresh gradient, then frees the gradient."""
        owner = _RELEASE_OWNER.get(id(param))
        if owner is not None and owner[0]() is param and owner[1]() not in (None, self):
            return  # another optimizer hooked it since, and steps it
        at = self.__dict__.get("_release_where", {}).get(id(param))
        groups = self.param_groups
        if not _placed(groups, at, param) or self.__dict__.get("_release_sizes") != _sizes(groups):
            self._hook_params()  # the groups changed since the hooks were placed
            at = self.__dict__["_release_where"].get(id(param))
            if at is None:
                # No longer optimized here: an optimizer it was taken over from steps it again.
                if owner is not None and owner[1]() is self:
                    del _RELEASE_OWNER[id(param)]
                return
        self._refuse_twice(id(param))
        with torch.no_grad():
            self._locked(self._step_all, at)
        param.grad = None

    def _step_all(self, only: Optional[tuple[int, int]] = None) -> None:
        """Steps every parameter with a gradient, or just parameter ``only`` = (group, index)."""
        if self._skip_for_inf():
            return
        # Public attributes that may have been set after construction.
        if self.num_threads is not None:
            _check_threads(self.num_threads)
        _check_seed(self.seed)
        groups = list(enumerate(self.param_groups))
        if only is not None:
            groups = [groups[only[0]]]
        configs = {gi: self._config(gi, g) for gi, g in groups}
        per_param = self.backend == "torch" or self._per_param_methods()
        if (
            not per_param
            and only is None
            and self.backend in ("auto", "rust")
            and getattr(self, "grad_scale", None) is None
        ):
            # The usual step in one call; None (nothing changed) where anything is unusual.
            written = _core.step_plain(
                [(configs[gi], g["params"]) for gi, g in groups],
                self.state,
                seed=self.seed,
                num_threads=functional.threads(self.num_threads),
            )
            if written is not None:
                return
        # A wrapper subclass that does not say what it wraps may alias anything: the loop's
        # order, one parameter at a time, is the one that is right whatever it aliases.
        per_param = per_param or self._any_opaque(groups)
        created: list[torch.Tensor] = []
        try:
            if not per_param:
                try:
                    self._step_fast(groups, configs, created, only)
                except _LoopOnly:
                    per_param = True
            if per_param:
                self._step_per_param(groups, created, only)
        except BaseException:
            # A state created for this step goes unless the step advanced it (an interrupt
            # can land after the step was written).
            for p in created:
                if self.state.get(p, {}).get("step", 0) == 0:
                    self.state.pop(p, None)
            raise

    def _config(self, gi: int, group: dict[str, Any]) -> Any:
        """The group's hyper-parameters, checked by the core's rules (ValueError naming it)."""
        for key in _REFUSED_KEYS:
            if group.get(key):
                raise ValueError(
                    f"param_groups[{gi}] sets {key}={group[key]!r}, which rustadam.Adam does "
                    "not implement"
                )
        names = group.get("param_names")
        if names is not None and not isinstance(names, (list, tuple)):
            raise ValueError(
                f"param_groups[{gi}]['param_names'] is {names!r}; expected a list of the "
                "parameters' names"
            )
        decay = self._decay(group)
        flags = (
            (decay.weight_decouple, decay.absolute)
            if isinstance(decay, (WeightDecay, _GroupDecay))
            else (True, False)
        )
        if "decoupled_weight_decay" in group and "decoupled_weight_decay" not in self.defaults:
            _check_decoupled_key(gi, group, decay)
        # (A WeightDecay's one key, weight_decay, without calling it at every step.)
        keys = _DECAY_GROUP_KEYS if type(self.weight_decay) is WeightDecay else None
        if keys is None:
            keys = frozenset((*_GROUP_KEYS, *self.weight_decay.defaults()))
        if not group.keys() >= keys:
            missing = sorted(keys - group.keys())
            raise ValueError(
                f"param_groups[{gi}] has no {', '.join(map(repr, missing))} (every group "
                "carries lr, betas, eps, maximize, amsgrad and the weight decay's keys, as "
                "torch.optim.Adam's)"
            )
        try:
            wd = group.get("weight_decay", 0.0)
            return _core.Config(
                lr=_given("lr", group["lr"]),
                betas=_given_pair(group["betas"]),
                eps=_given("eps", group["eps"]),
                weight_decay=_given(
                    "weight_decay", wd.weight_decay if isinstance(wd, WeightDecay) else wd
                ),
                weight_decouple=flags[0],
                absolute=flags[1],
                optimized_update=bool(group.get("optimized_update", self.optimized_update)),
                maximize=bool(group["maximize"]),
                amsgrad=bool(group["amsgrad"]),
                rounding=self._rounding(group),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"param_groups[{gi}]: {e}") from None

    def _decay(self, group: dict[str, Any]) -> Any:
        """The group's weight decay: a WeightDecay given as its value, else the optimizer's."""
        wd = group.get("weight_decay")
        if isinstance(wd, WeightDecay):
            return _GroupDecay(wd)
        return self.weight_decay

    def _rounding(self, group: dict[str, Any]) -> str:
        return group.get("rounding", self.rounding)

    def _seed(self, param: torch.Tensor) -> int:
        """A parameter's stochastic-rounding seed: the optimizer's seed and its position."""
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    return _param_seed(self.seed, gi, i)
        return self.seed

    def _per_param_methods(self) -> bool:
        """Whether a subclass, an instance attribute or a foreign weight decay changes the math."""
        cls = type(self)
        if [getattr(cls, h) for h in _HOOKS] != _BASE_HOOKS:
            return True
        if not self.__dict__.keys().isdisjoint(_HOOKS):
            return True
        if type(self.weight_decay) is not WeightDecay:
            return True
        # A group's own WeightDecay subclass has its own math too.
        return any(
            isinstance(wd, WeightDecay) and type(wd) is not WeightDecay
            for wd in (g.get("weight_decay") for g in self.param_groups)
        )

    def _grads(
        self, gi: int, group: dict[str, Any], only: Optional[tuple[int, int]] = None
    ) -> list[tuple[int, torch.Tensor, Any]]:
        """(position, param, grad) of the group's parameters that have a gradient."""
        out = []
        params: Iterable[tuple[int, torch.Tensor]] = enumerate(group["params"])
        if only is not None:
            params = [(only[1], group["params"][only[1]])]
        for i, param in params:
            grad = param.grad
            if grad is None:
                continue
            if grad.layout is not torch.strided:
                sparse = grad.layout in _SPARSE_LAYOUTS
                raise RuntimeError(
                    f"rustadam.Adam does not support "
                    f"{'sparse' if sparse else 'non-strided'} gradients "
                    f"({param_label(gi, group, i, param)} has a {grad.layout} gradient)"
                    + ("; consider torch.optim.SparseAdam" if sparse else "")
                )
            out.append((i, param, grad))
        return out

    def _state(
        self, gi: int, group: dict[str, Any], i: int, param: torch.Tensor, created: list
    ) -> dict[str, Any]:
        state = self.state[param]
        if not isinstance(state, dict):
            raise RuntimeError(
                f"{param_label(gi, group, i, param)}: its state is a {type(state).__name__}, "
                "not a dict"
            )
        if not state:
            created.append(param)
            self.init_state(state, group, param)
        return state

    def _step_per_param(
        self,
        groups: list[tuple[int, dict[str, Any]]],
        created: list[torch.Tensor],
        only: Optional[tuple[int, int]],
    ) -> None:
        todo = []
        base = self._base_methods()
        for gi, group in groups:
            for i, param, grad in self._grads(gi, group, only):
                state = self._state(gi, group, i, param, created)
                t = self._check_per_param(base, gi, group, i, param, grad, state)
                todo.append((group, state, grad, param, t))
        self._run_per_param(todo)

    def _base_methods(self) -> frozenset[str]:
        """The per-parameter methods that are the base class's (not overridden)."""
        cls, own = type(self), self.__dict__
        return frozenset(h for h in _HOOKS if getattr(cls, h) is Adam.__dict__[h] and h not in own)

    def _check_per_param(
        self,
        base: frozenset[str],
        gi: int,
        group: dict[str, Any],
        i: int,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
    ) -> Optional[int]:
        """Refuses (naming the parameter) what the per-parameter methods would fail on part way,
        before any parameter is written; returns t before this update, or None where an
        overriding ``step_param`` keeps no step count."""
        label = param_label(gi, group, i, param)
        base_step = "step_param" in base
        why = _foreach.dtype_refusal(param.dtype) if base_step else None
        if why is not None:
            raise RuntimeError(f"{label}: {why}")
        t = _next_step(state, gi, group, i, param) - 1 if base_step or "step" in state else None
        # The buffers the base methods write; an overriding init_state may keep them in another
        # dtype (the base methods cast on store), so only the base state must match exactly.
        same_dtype = "init_state" in base
        entry: list[Optional[torch.Tensor]] = [param, grad, None, None, None, None]
        if base_step and "get_mv" in base:
            entry[2] = _state_tensor(state, "exp_avg", label, param, same_dtype)
            entry[3] = _state_tensor(state, "exp_avg_sq", label, param, same_dtype)
            if group.get("amsgrad"):
                entry[4] = _state_tensor(state, "max_exp_avg_sq", label, param, same_dtype)
        if (
            base_step
            and "adam_update" in base
            and param.dtype in _rounding.SIXTEEN_BIT
            and self._rounding(group) == "kahan"
        ):
            if state.get("compensation") is None:
                raise RuntimeError(
                    f"{label}: rounding='kahan' needs a compensation buffer for a 16-bit parameter"
                )
            entry[5] = _state_tensor(state, "compensation", label, param, True)
        if grad.device != param.device:
            raise RuntimeError(
                f"{label}: its gradient is on {grad.device}, the parameter on {param.device}"
            )
        _written_in_place(param, "parameter", label)
        functional.check_entry(label, tuple(entry))
        return t

    def _run_per_param(
        self, todo: list[tuple[dict[str, Any], dict[str, Any], torch.Tensor, torch.Tensor, Any]]
    ) -> None:
        """Steps checked parameters one at a time with the per-parameter methods (dividing the
        gradients by GradScaler's scale first), all or nothing: what a step wrote before an
        error (an overriding method's own, say) is put back as it was, in reverse order."""
        written = [x for e in todo for x in (e[3], *e[1].values()) if isinstance(x, torch.Tensor)]
        grads = [e[2] for e in todo]
        undo: list[Callable[[], None]] = []
        try:
            with _foreach.writable(written, grads):
                if getattr(self, "grad_scale", None) is not None:
                    undo += [_saved(g) for g in grads]
                    self._unscale(grads)
                for group, state, grad, param, t in todo:
                    undo.append(_saved(param, state))
                    if t is not None and type(state["step"]) is not int:
                        state["step"] = t  # a tensor count counts as an int, as on the core
                    self.step_param(state, group, grad, param)
        except BaseException:
            with torch.no_grad(), _foreach.writable(written, grads):
                for restore in reversed(undo):
                    restore()
            raise
        # The methods write through .data, which autograd does not see: bump the version of
        # every tensor they may have written, as the core's path does.
        written = []
        for _group, state, _grad, param, _t in todo:
            written.append(param)
            written.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        if written:
            torch._C._increment_version(written)

    def _any_opaque(self, groups: list[tuple[int, dict[str, Any]]]) -> bool:
        """Whether a parameter with a gradient, its gradient or a state tensor has memory
        nothing can see (``functional.opaque``)."""
        for _gi, group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                held = state.values() if isinstance(state, dict) else ()
                if any(functional.opaque(t) for t in (p, p.grad, *held)):
                    return True
        return False

    def _skip_for_inf(self) -> bool:
        """GradScaler found inf/NaN gradients: the step changes nothing (step counts included)."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

    def _unscale(self, grads: list[torch.Tensor]) -> None:
        """Divides gradients by GradScaler's scale in place (its fused route leaves it to us)."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return
        with _foreach.writable(grads):
            for g in grads:
                g.div_(scale.to(g.device))

    def _step_fast(
        self,
        groups: list[tuple[int, dict[str, Any]]],
        configs: dict[int, Any],
        created: list[torch.Tensor],
        only: Optional[tuple[int, int]],
    ) -> None:
        works = []
        seen: dict[int, torch.Tensor] = {}  # state dicts by id, with their parameter
        dtensor_steps = []  # (group, state, grad, param) stepped with torch ops on DTensors
        states_of: list[list[dict[str, Any]]] = []
        dtensor = _dtensor_type()
        for gi, group in groups:
            cfg = configs[gi]
            amsgrad, kahan = cfg.amsgrad, cfg.rounding == "kahan"
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[int] = []
            maxs: Optional[list[torch.Tensor]] = [] if amsgrad else None
            comps: Optional[list[Optional[torch.Tensor]]] = [] if kahan else None
            positions: list[int] = []
            states: list[dict[str, Any]] = []
            for i, param, grad in self._grads(gi, group, only):
                state = self._state(gi, group, i, param, created)
                if (
                    seen.setdefault(id(state), param) is not param
                    or type(state) is not dict
                    or not all(type(k) is str for k in state)
                ):
                    # One state dict for two parameters counts twice, as torch's loop does;
                    # a dict subclass's own __setitem__, or a key that is not a str, may run
                    # Python code when "step" is set, after the writes: all for the loop, one
                    # parameter at a time, undone on error.
                    # (A parameter listed twice is refused by name below.)
                    raise _LoopOnly
                # The buffers the core steps (a DTensor's local shards where it has them).
                m, v = state.get("exp_avg"), state.get("exp_avg_sq")
                if not (isinstance(m, torch.Tensor) and isinstance(v, torch.Tensor)):
                    _state_entry(state, "exp_avg", gi, group, i, param)
                    _state_entry(state, "exp_avg_sq", gi, group, i, param)
                bp, bg = param, grad
                sharded = dtensor is not None and (
                    isinstance(param, dtensor) or isinstance(grad, dtensor)
                )
                if amsgrad or kahan or sharded:
                    bufs = [param, grad, m, v]
                    if amsgrad:
                        bufs.append(_state_entry(state, "max_exp_avg_sq", gi, group, i, param))
                    if kahan:
                        bufs.append(state.get("compensation"))
                    if sharded:
                        local = _local_shards(dtensor, bufs)
                        if local is None:
                            if self.backend == "rust":
                                raise RuntimeError(
                                    f"rustadam.Adam cannot step "
                                    f"{param_label(gi, group, i, param)} on the Rust core: its "
                                    "gradient and state are not all DTensors sharded like it"
                                )
                            t = _next_step(state, gi, group, i, param) - 1
                            dtensor_steps.append((gi, group, i, state, grad, param, t))
                            continue
                        bufs = list(local)
                    bp, bg, m, v = bufs[:4]
                    if maxs is not None:
                        maxs.append(bufs[4])
                    if comps is not None:
                        comps.append(bufs[-1])
                params.append(bp)
                grads.append(bg)
                exp_avgs.append(m)
                exp_avg_sqs.append(v)
                positions.append(i)
                states.append(state)
                t = state.get("step")
                # The common case inline; anything else is checked (and named) by _next_step.
                if type(t) is not int or not 0 <= t < MAX_STEP:
                    t = _next_step(state, gi, group, i, param) - 1
                steps.append(t + 1)
            # Seeds matter only to stochastic rounding (each parameter's own stream).
            seeds = (
                [_param_seed(self.seed, gi, i) for i in positions]
                if cfg.rounding == "stochastic"
                else [0] * len(positions)
            )
            works.append(
                functional.GroupWork(
                    cfg,
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    steps,
                    seeds,
                    maxs,
                    comps,
                    label=_labeler(gi, group, positions),
                )
            )
            states_of.append(states)
        for gi, group, i, _state, grad, param, _t in dtensor_steps:
            functional.check_entry(param_label(gi, group, i, param), (param, grad))
        # The step counts advance, and autograd sees the in-place writes, with the step.
        functional.run_groups(
            works,
            backend=self.backend,
            num_threads=self.num_threads,
            grad_scale=getattr(self, "grad_scale", None),
            commit=(
                [s for states in states_of for s in states],
                [t for w in works for t in w.steps],
            ),
        )
        self._run_per_param([(g, st, gr, p, t) for _gi, g, _i, st, gr, p, t in dtensor_steps])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group, as torch does.

        A number given as the group's ``weight_decay`` is its λ for the optimizer's kind of
        decay; a :class:`WeightDecay` given there decides the group's decay (its kind and λ).
        """
        wd = param_group.get("weight_decay") if isinstance(param_group, dict) else None
        if wd is not None and not (_is_number(wd) or isinstance(wd, WeightDecay)):
            raise TypeError(f"a group's weight_decay must be a number or a WeightDecay, got {wd!r}")
        super().add_param_group(param_group)
        if getattr(self, "gradient_release", False):
            self._hook_params()

    # ---- torch.optim plumbing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with plain data only, so that ``torch.load(weights_only=True)``
        reads it: a group's own :class:`WeightDecay` is saved as its λ (``weight_decay``) and
        its kind (``weight_decay_kind``: ``"decoupled"``, ``"absolute"`` or ``"l2"``), which
        :meth:`load_state_dict` turns back into the object."""
        state_dict = super().state_dict()
        for group in state_dict.get("param_groups", ()):
            if not isinstance(group, dict):
                continue
            wd = group.get("weight_decay")
            if type(wd) is WeightDecay:
                group["weight_decay"] = wd.weight_decay
                group[GROUP_DECAY_KIND] = decay_kind(wd)
            elif type(self.weight_decay) is WeightDecay and _is_number(wd):
                # The optimizer's decay, saved with every group it applies to: a checkpoint
                # carries its math, as torch's carry decoupled_weight_decay.
                group[OPTIMIZER_DECAY_KIND] = decay_kind(self.weight_decay)
            kind = group.get(GROUP_DECAY_KIND, group.get(OPTIMIZER_DECAY_KIND))
            if kind in ("decoupled", "l2"):  # what torch.optim.Adam reads (it has no absolute)
                group["decoupled_weight_decay"] = kind == "decoupled"
            group.setdefault("optimized_update", bool(self.optimized_update))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this optimizer or of ``torch.optim.Adam`` / ``AdamW``.

        As for every torch optimizer, floating-point state is cast to each parameter's dtype and
        device, and ``step`` is kept (``torch.optim.Adam``'s tensor ``step`` becomes an int).
        Beyond torch's checks (the number of groups and of parameters in each), a state_dict
        that does not fit raises ValueError and leaves the optimizer unchanged: a group without
        ``lr``, ``betas``, ``eps`` or the weight decay's keys; the other kind of weight decay;
        a parameter's state with a missing entry, a moment shaped unlike the parameter, an
        expanded moment or a ``step`` that is not a count.
        """
        # Registered last, the check sees the dict the user's pre-hooks produced, and runs
        # before torch changes anything.
        handle = self.register_load_state_dict_pre_hook(check_state_dict)
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
        for group in self.param_groups:  # a group's own WeightDecay, as state_dict() saved it
            if GROUP_DECAY_KIND in group:
                kind = group.pop(GROUP_DECAY_KIND)
                group["weight_decay"] = group_decay(group["weight_decay"], kind)
            elif OPTIMIZER_DECAY_KIND in group:
                # The saved optimizer's decay: where this one's differs, the group keeps the
                # saved math as a WeightDecay of its own.
                kind = group.pop(OPTIMIZER_DECAY_KIND)
                ours = self.weight_decay
                if type(ours) is not WeightDecay or decay_kind(ours) != kind:
                    group["weight_decay"] = group_decay(group["weight_decay"], kind)
            # As torch.optim.Adam loads a checkpoint older than these options.
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
        # torch.optim.Adam keeps `step` as a float tensor; the reference design counts with an int.
        # The parameters' steps were checked; an entry no group lists is kept as torch keeps it
        # (this runs after the load replaced the state: it must not raise).
        for s in self.state.values():
            step = s.get("step") if isinstance(s, dict) else None
            if isinstance(step, (torch.Tensor, float)):
                s["step"] = _count_or_same(step)
        if getattr(self, "gradient_release", False):
            self._hook_params()

    def __repr__(self) -> str:
        head = f"{type(self).__name__} ("
        settings = "".join(
            f"\n{name}: {getattr(self, name, None)!r}"
            for name in ("weight_decay", "optimized_update", "rounding", "backend", "num_threads")
        )
        return head + settings + super().__repr__()[len(head) :]


_MAX_THREADS = 1024
# A subclass whose per-parameter methods are these runs the fused step.
_BASE_HOOKS = [Adam.__dict__[h] for h in _HOOKS]
_HALF = (torch.float16, torch.bfloat16)
_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr,
                   torch.sparse_bsc)  # fmt: skip


class _LoopOnly(Exception):
    """Raised before anything is written: this step takes the per-parameter loop."""


class _GroupDecay:
    """A group's own WeightDecay, called with the group's λ as its coefficient."""

    def __init__(self, decay: WeightDecay) -> None:
        self.decay = decay

    def __call__(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> Any:
        return self.decay(param, grad, {**group, "weight_decay": self.decay.weight_decay})

    @property
    def weight_decouple(self) -> bool:
        return self.decay.weight_decouple

    @property
    def absolute(self) -> bool:
        return self.decay.absolute


@torch._disable_dynamo
def _rustadam_step_runs_eagerly(f: Callable[..., None], *args: Any) -> None:
    """``f(*args)`` behind a graph break under torch.compile: rustadam.Adam.step's checks and
    the Rust core cannot be traced (torch imports its compiler only when this first runs)."""
    f(*args)


def _released(opt: Callable[[], Optional[Adam]], param: torch.Tensor) -> None:
    """The gradient-release hook: steps ``param`` if its optimizer still exists (eagerly, as
    ``step()``, where a compiled function's backward runs it)."""
    live = opt()
    if live is None:
        return
    if torch.compiler.is_compiling():
        _rustadam_step_runs_eagerly(live._release, param)
    else:
        live._release(param)


# The gradient-release optimizer that steps a parameter (by its id, with the parameter and the
# optimizer held weakly): the one that hooked it last. A second optimizer over the same
# parameters takes them over from the first, as one made to resume training would, instead of
# finding their gradients consumed by the first's hooks.
_RELEASE_OWNER: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _remove_hooks(handles: dict[int, Any]) -> None:
    """Removes the gradient-release hooks of an optimizer that is gone."""
    for key, (_param, hook) in handles.items():
        hook.remove()
        owner = _RELEASE_OWNER.get(key)
        if owner is not None and owner[1]() is None:
            del _RELEASE_OWNER[key]
    handles.clear()


def _saved(t: torch.Tensor, state: Optional[dict[str, Any]] = None) -> Callable[[], None]:
    """What puts ``t`` (and ``state``: its entries and their tensors' values) back as they are
    now."""
    value = t.detach().clone()
    entries = dict(state) if state is not None else {}
    values = {k: v.detach().clone() for k, v in entries.items() if isinstance(v, torch.Tensor)}
    # Other entries as they are now too (an override may change a list of its own in place).
    others = {k: copy.deepcopy(v) for k, v in entries.items() if k not in values}

    def restore() -> None:
        t.detach().copy_(value)
        if state is not None:
            state.clear()
            state.update(entries)
            state.update(copy.deepcopy(others))
            for k, v in values.items():
                entries[k].detach().copy_(v)

    return restore


def _sizes(groups: list[dict[str, Any]]) -> list[int]:
    """How many parameters each group lists (a change means the hooks' record is stale)."""
    return [len(g["params"]) for g in groups]


def _placed(groups: list[dict[str, Any]], at: Optional[tuple[int, int]], param: Any) -> bool:
    """Whether ``param`` is still parameter ``at`` = (group, index) of ``groups``."""
    if at is None or at[0] >= len(groups):
        return False
    params = groups[at[0]]["params"]
    return at[1] < len(params) and params[at[1]] is param


def _count_or_same(step: Any) -> Any:
    """A float or 1-element tensor step count (torch's form) as an int; itself where it is not
    a whole number that fits one."""
    try:
        value = float(step.item() if isinstance(step, torch.Tensor) else step)
    except (RuntimeError, ValueError, TypeError):
        return step
    return int(value) if math.isfinite(value) and value == int(value) else step


def _is_number(x: Any) -> bool:
    """A real number as torch.optim.AdamW takes one for weight_decay: Python and numpy scalars
    (``numbers.Real``), 1-element real numpy arrays and tensors with a value (not on "meta");
    not a bool."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex() and x.device.type != "meta"
    return is_real(x)


def _real_number(name: str, x: Any) -> float:
    """``x`` as a float if it is a real number (see ``_is_number``); TypeError otherwise (a
    string "0.1" is not converted, as torch.optim.Adam does not take one)."""
    # The usual case, read at every step, skips the ABC checks.
    if type(x) is not float and type(x) is not int and not _is_number(x):
        raise TypeError(f"{name} must be a real number or a 1-element real tensor, got {x!r}")
    return as_float(name, x)


def _check_decoupled_key(gi: int, group: dict[str, Any], decay: Any) -> None:
    """torch.optim.Adam's ``decoupled_weight_decay`` picks the kind of decay; here the
    WeightDecay does. The key is taken where it agrees (or λ = 0) and refused where it does
    not, so it never changes the math unseen."""
    wanted = group["decoupled_weight_decay"]
    wd = group.get("weight_decay", 0.0)
    lam = wd.weight_decay if isinstance(wd, WeightDecay) else wd
    try:
        if float(lam) == 0.0:
            return
    except (TypeError, ValueError):
        return  # not a number: _config names that
    if isinstance(decay, (WeightDecay, _GroupDecay)):
        if bool(wanted) == decay.weight_decouple and not (wanted and decay.absolute):
            return
        have = repr(decay.decay if isinstance(decay, _GroupDecay) else decay)
    else:
        have = f"{type(decay).__name__} (its kind is its own)"
    kind = "decoupled (AdamW)" if wanted else "L2"
    raise ValueError(
        f"param_groups[{gi}] sets decoupled_weight_decay={wanted!r} (torch.optim.Adam's {kind} "
        f"weight decay), but its weight decay is {have}; rustadam.Adam takes the kind from the "
        f"WeightDecay: give WeightDecay({lam}, weight_decouple={bool(wanted)}) as the optimizer's "
        "or the group's weight_decay, or remove the key"
    )


def _check_seed(seed: Any) -> None:
    """``seed``: an int in [0, 2**64) (ValueError naming it otherwise)."""
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed!r}; expected an int in [0, 2**64)")


def _check_threads(num_threads: Any) -> None:
    """``num_threads``: None or an int from 1 to 1024 (ValueError naming it otherwise)."""
    if num_threads is not None and (
        isinstance(num_threads, bool)
        or not isinstance(num_threads, int)
        or not 1 <= num_threads <= _MAX_THREADS
    ):
        raise ValueError(
            f"Invalid num_threads: {num_threads!r}; expected an int from 1 to {_MAX_THREADS}"
        )


def _given(name: str, x: Any) -> Any:
    """``x`` once ``_real_number`` has checked it, for the core, which converts it to a float
    and names it as given in its messages (``Invalid learning rate: -1``, as torch): itself,
    save a numpy array or a 0-dim tensor, given as its item (as torch shows the latter)."""
    _real_number(name, x)
    if isinstance(x, np.ndarray) or (isinstance(x, torch.Tensor) and x.dim() == 0):
        return x.item()
    return x


def _pair(betas: Any) -> tuple[float, float]:
    b1, b2 = betas
    return _real_number("betas[0]", b1), _real_number("betas[1]", b2)


def _given_pair(betas: Any) -> tuple[Any, Any]:
    """``betas`` checked, for the core's messages (see ``_given``)."""
    b1, b2 = betas
    return _given("betas[0]", b1), _given("betas[1]", b2)


def _k(x: float, dtype: torch.dtype) -> float:
    """A float64 hyper-parameter rounded once to the compute type, as the core rounds it."""
    # A 1-element tensor or array too (torch.tensor(tensor) would warn and keep its dtype).
    x = as_float("a hyper-parameter", x)
    if dtype == torch.float64:
        return x
    return float(torch.tensor(x, dtype=torch.float64).to(dtype).item())


def _param_seed(seed: int, gi: int, i: int) -> int:
    """A parameter's stochastic-rounding seed, from the optimizer's seed and its position."""
    return _core.param_seed(seed, gi, i)


def _next_step(state: dict[str, Any], gi: int, group: dict[str, Any], i: int, p: Any) -> int:
    """t after this update, checked: a count from 0 that fits in 63 bits (torch.optim.Adam's
    one-element tensor holding a whole number counts as one)."""
    if "step" not in state:
        raise RuntimeError(
            f"{param_label(gi, group, i, p)}: its state has no 'step' (the count of its updates)"
        )
    step = state["step"]
    if (
        isinstance(step, torch.Tensor)
        and step.numel() == 1
        and step.device.type != "meta"
        and not step.is_complex()
    ):
        value = step.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            step = value
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
        raise RuntimeError(
            f"{param_label(gi, group, i, p)}: its state has step={step!r}; "
            "expected a count from 0 below 2**63 - 1"
        )
    return step + 1


def _state_entry(
    state: dict[str, Any], key: str, gi: int, group: dict[str, Any], i: int, p: Any
) -> torch.Tensor:
    return _state_tensor_only(state, key, param_label(gi, group, i, p))


def _state_tensor_only(state: dict[str, Any], key: str, label: str) -> torch.Tensor:
    """``state[key]`` if it is a tensor, else a RuntimeError that names the parameter."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        hint = (
            " (was amsgrad turned on after it first stepped? its state then lacks the running "
            "maximum)"
            if key == "max_exp_avg_sq"
            else ""
        )
        got = "" if value is None else f" (it holds a {type(value).__name__})"
        raise RuntimeError(f"{label}: its state has no {key!r} tensor{got}{hint}")
    return value


def _state_tensor(
    state: dict[str, Any], key: str, label: str, param: torch.Tensor, same_dtype: bool
) -> torch.Tensor:
    """``state[key]``, checked as a buffer the per-parameter methods write in place."""
    value = _state_tensor_only(state, key, label)
    if value.layout is not torch.strided:
        raise RuntimeError(
            f"{label}: its {key} is a {value.layout} tensor; it is written in place, so it must "
            "be a dense (strided) tensor"
        )
    if value.device != param.device:
        raise RuntimeError(
            f"{label}: its {key} is on {value.device}, the parameter on {param.device}"
        )
    if same_dtype and value.dtype != param.dtype:
        raise RuntimeError(
            f"{label}: its {key} has dtype {value.dtype}, the parameter {param.dtype}"
        )
    if value.shape != param.shape:
        raise RuntimeError(
            f"{label}: its {key} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}"
        )
    _written_in_place(value, key, label)
    return value


def _written_in_place(t: torch.Tensor, what: str, label: str) -> None:
    """Refuses a written buffer whose elements may share memory (an expanded view, windows
    over one row), as the core does."""
    if _foreach.self_overlaps(t):
        raise RuntimeError(
            f"{label}: its {what} has elements that share memory (an expanded view?); it is "
            "written in place"
        )


def _labeler(gi: int, group: dict[str, Any], positions: list[int]) -> Callable[[int], str]:
    params = group["params"]
    return lambda k: param_label(gi, group, positions[k], params[positions[k]])


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


def _f32(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats are computed in float32 and rounded once when stored (docs/NUMERICS.md).

    float16 cannot even hold the default eps (1e-16 rounds to 0), so a zero gradient would give
    0/0 in float16 arithmetic.
    """
    return t.float() if t.dtype in _HALF else t


def _write(t: torch.Tensor, computed: torch.Tensor) -> None:
    """Stores a computed value into its tensor (one rounding to nearest for 16-bit)."""
    t.copy_(computed)


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as pairs of reals (as torch.optim.Adam treats them); others unchanged."""
    return torch.view_as_real(t) if t.is_complex() else t
