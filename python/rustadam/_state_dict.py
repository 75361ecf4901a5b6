"""Checks that a state dict fits an optimizer before torch loads it (nothing is changed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch

from rustadam._foreach import self_overlaps, span
from rustadam._rounding import SIXTEEN_BIT
from rustadam.functional import param_label
from rustadam.weight_decay import WeightDecay

# The most updates a state may count: step counts are int64 (torch's, and the core's).
MAX_STEP = 2**63 - 1

if TYPE_CHECKING:
    from rustadam.optimizer import Adam


# The group key that records a group's own WeightDecay's kind in a state_dict (see
# Adam.state_dict); its λ is the group's weight_decay.
GROUP_DECAY_KIND = "weight_decay_kind"
# The kind of the optimizer's own WeightDecay, saved with each group whose weight_decay is a
# number (the optimizer's decay then applies): a load into an optimizer of another kind keeps it.
OPTIMIZER_DECAY_KIND = "optimizer_weight_decay_kind"
_KINDS = {
    "decoupled": {"weight_decouple": True, "absolute": False},
    "absolute": {"weight_decouple": True, "absolute": True},
    "l2": {"weight_decouple": False, "absolute": False},
}


def decay_kind(wd: WeightDecay) -> str:
    """The name a WeightDecay's kind is saved under."""
    if not wd.weight_decouple:
        return "l2"
    return "absolute" if wd.absolute else "decoupled"


def group_decay(weight_decay: Any, kind: str) -> WeightDecay:
    """The WeightDecay a saved group's ``weight_decay`` and ``weight_decay_kind`` describe."""
    return WeightDecay(weight_decay, **_KINDS[kind])


def check_state_dict(opt: Adam, state_dict: Any) -> None:
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
        _check_group_decay(gi, saved)
        merged = {**group, **_hyper(saved)}
        saved_names = saved.get("param_names")
        for i, (pid, param) in enumerate(zip(ids, group["params"])):
            # Named as this optimizer names the tensor (the shape shown is its own); a different
            # saved name is added.
            label = param_label(gi, group, i, param)
            if isinstance(saved_names, (list, tuple)) and i < len(saved_names):
                names = group.get("param_names")
                if names is None or i >= len(names) or names[i] != saved_names[i]:
                    label += f" (saved as {saved_names[i]!r})"
            where[pid] = (label, merged, param)
    for pid, entry in saved_state.items():
        if pid not in where:
            continue  # torch keeps state of no listed parameter as it is
        label, group, param = where[pid]
        _check_param_state(opt, entry, label, group, param)


def _check_group_decay(gi: int, saved: Mapping[str, Any]) -> None:
    """A group's own WeightDecay, as Adam.state_dict saves it: a known kind and a valid λ."""
    key = next((k for k in (GROUP_DECAY_KIND, OPTIMIZER_DECAY_KIND) if k in saved), None)
    if key is None:
        return
    kind = saved[key]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(
            f"param_groups[{gi}] of the loaded state dict has {key}={kind!r}; "
            f"expected one of {sorted(_KINDS)}"
        )
    try:
        group_decay(saved.get("weight_decay"), kind)
    except (TypeError, ValueError) as e:
        raise ValueError(f"param_groups[{gi}] of the loaded state dict: {e}") from None


def _hyper(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved group's values: they replace the optimizer's on load, so the state must fit them."""
    return {k: v for k, v in saved.items() if k != "params"}


def _check_decay_kind(opt: Adam, gi: int, saved: Mapping[str, Any]) -> None:
    """torch.optim.Adam/AdamW record which decay their ``weight_decay`` means; refuse the other."""
    wd = opt.weight_decay
    if (
        GROUP_DECAY_KIND in saved  # the kind saved by rustadam wins (see Adam.__setstate__)
        or OPTIMIZER_DECAY_KIND in saved
        or "decoupled_weight_decay" not in saved
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
                raise ValueError(
                    f"the loaded state of {name} has step={value!r}; expected a count from 0 "
                    "below 2**63 - 1 (the next update's count must fit in 63 bits)"
                )
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
            if value.layout != torch.strided:
                raise ValueError(
                    f"the loaded state of {name} has {key!r} of layout {value.layout}; it is "
                    "updated in place as a dense (torch.strided) tensor"
                )
            # The proof a step makes before writing it (an empty tensor has no elements to
            # share: channels_last gives it a stride of 0).
            if self_overlaps(value):
                raise ValueError(
                    f"the loaded state of {name} has {key!r} with elements that share memory "
                    f"(strides {tuple(value.stride())} for shape {tuple(value.shape)}: an "
                    "expanded or windowed view); it is updated in place, so every element "
                    "needs memory of its own"
                )
    _check_own_memory(entry, name, expected, param)


def _check_own_memory(
    entry: Mapping[str, Any], name: str, expected: Mapping[str, Any], param: torch.Tensor
) -> None:
    """The loaded moments that stay themselves after the load (torch casts only those of
    another dtype or device) each need memory of their own, apart from the parameter's: a
    step writes them all in place, and refuses one that shares memory with another."""
    held = [("the parameter", param)] + [
        (repr(k), entry[k])
        for k, shape in expected.items()
        if shape is not None and entry[k].dtype == param.dtype and entry[k].device == param.device
    ]
    spans = [(what, span(t)) for what, t in held]
    for i, (a, sa) in enumerate(spans):
        for b, sb in spans[i + 1 :]:
            if sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]:
                raise ValueError(
                    f"the loaded state of {name} has {b} sharing memory with {a}; each is "
                    "updated in place, so each needs memory of its own"
                )


def _expected_state(
    opt: Adam, group: dict[str, Any], param: torch.Tensor
) -> Optional[dict[str, Optional[tuple[int, ...]]]]:
    """The entries ``init_state`` creates for ``param``: name -> shape (None: not a tensor)."""
    from rustadam.optimizer import Adam

    if type(opt).init_state is Adam.init_state and "init_state" not in opt.__dict__:
        shape = tuple(param.shape)
        expected: dict[str, Optional[tuple[int, ...]]] = {
            "step": None,
            "exp_avg": shape,
            "exp_avg_sq": shape,
        }
        if group.get("amsgrad"):
            expected["max_exp_avg_sq"] = shape
        if group.get("rounding", opt.rounding) == "kahan" and param.dtype in SIXTEEN_BIT:
            expected["compensation"] = shape
        return expected
    probe: dict[str, Any] = {}
    try:
        opt.init_state(probe, group, torch.empty_like(param, device="meta"))
    except Exception:  # an override that needs real data; torch's own checks remain
        return None
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in probe.items()}


def _is_count(step: Any) -> bool:
    """An int, or torch.optim.Adam's float tensor, holding a whole number from 0 below
    ``MAX_STEP`` (the next update's count must fit in 63 bits)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.device.type == "meta":
            return False
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return False
    return 0 <= step < MAX_STEP and float(step).is_integer()
