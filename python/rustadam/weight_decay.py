"""Weight decay as its own composable piece, applied before the moments are updated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rustadam import _core
from rustadam._numbers import as_float, is_real

if TYPE_CHECKING:
    import torch


class WeightDecay:
    r"""Weight decay for :class:`rustadam.Adam`, called on each parameter before its moments.

    With λ = ``group['weight_decay']`` and α = ``group['lr']``:

    - ``weight_decouple=True`` (default, AdamW): θ ← θ·(1 − α·λ) in place, or θ ← θ·(1 − λ)
      when ``absolute``; the gradient is returned unchanged.
    - ``weight_decouple=False`` (L2): returns a new tensor g + λ·θ when λ ≠ 0, else g itself;
      ``param.grad`` is never changed.

    ``defaults()`` gives ``{'weight_decay': weight_decay}``, the parameter groups' default λ.
    Any object with the same ``__call__(param, grad, group)`` and ``defaults()`` may be passed to
    :class:`rustadam.Adam` instead (it then runs on the torch path).

    >>> from rustadam import Adam, WeightDecay
    >>> import torch
    >>> opt = Adam([torch.nn.Parameter(torch.ones(2))], weight_decay=WeightDecay(0.01))
    >>> opt.param_groups[0]["weight_decay"]
    0.01
    """

    def __init__(
        self, weight_decay: float = 0.0, weight_decouple: bool = True, absolute: bool = False
    ) -> None:
        try:
            value = weight_decay
            if not isinstance(value, (int, float)) and callable(getattr(value, "item", None)):
                value = value.item()  # a 1-element array or tensor of any shape
            if not is_real(value):
                raise TypeError("not a real number")  # a string "0.01" is not converted
            _core.Config(weight_decay=float(value))  # the core's rule
        except (TypeError, ValueError, RuntimeError):
            # torch's message, with the value as given (an int stays an int).
            raise ValueError(f"Invalid weight_decay value: {weight_decay}") from None
        if not isinstance(weight_decay, (int, float)) and callable(
            getattr(weight_decay, "item", None)
        ):
            # A numpy scalar or a 1-element tensor as a plain number: the groups' default then
            # pickles as data (torch.load(weights_only=True) refuses numpy scalars).
            weight_decay = weight_decay.item()
        self.weight_decay = weight_decay
        self.weight_decouple = weight_decouple
        self.absolute = absolute

    def defaults(self) -> dict[str, Any]:
        """The group default this object contributes: ``{'weight_decay': λ}``."""
        return {"weight_decay": self.weight_decay}

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        """Applies the decay; returns the gradient the moments are to use."""
        # float(): a tensor or numpy lr or λ must give the float64 factor a float gives.
        wd = as_float("weight_decay", group["weight_decay"])
        if self.weight_decouple:
            if self.absolute:
                param.data.mul_(1.0 - wd)
            else:
                param.data.mul_(1.0 - as_float("lr", group["lr"]) * wd)
            return grad
        if wd != 0:
            return _l2(param.data, grad, wd)
        return grad

    def _key(self) -> tuple[float, bool, bool]:
        return (self.weight_decay, self.weight_decouple, self.absolute)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightDecay) or type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight_decay={self.weight_decay}, "
            f"weight_decouple={self.weight_decouple}, absolute={self.absolute})"
        )


def _l2(param: torch.Tensor, grad: torch.Tensor, wd: float) -> torch.Tensor:
    """g + λ·θ with one rounding to the gradient's dtype (16-bit: computed in float32).

    The fused multiply-add makes every path (torch ops, the Rust core, the Triton kernel) agree
    bit for bit; complex tensors are pairs of reals.
    """
    import torch

    from rustadam import _rounding

    g, p = grad, param
    if g.is_complex():
        g, p = torch.view_as_real(g.resolve_conj()), torch.view_as_real(p.resolve_conj())
    compute = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    lam = float(torch.tensor(wd, dtype=torch.float64).to(compute).item())
    out = _rounding.fma_scalar(p.to(compute), lam, g.to(compute))
    out = out.to(g.dtype)
    return torch.view_as_complex(out) if grad.is_complex() else out
