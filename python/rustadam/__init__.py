"""rustadam: the Adam optimizer for PyTorch, with its arithmetic in a fused Rust kernel.

>>> import torch
>>> from rustadam import Adam, WeightDecay
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = Adam([w], lr=1e-2, weight_decay=WeightDecay(0.01))
>>> (w ** 2).sum().backward()
>>> opt.step()

``Adam`` and ``WeightDecay`` import torch when first used, so the rest of the package (the
extension ``rustadam._core``) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rustadam._core import __version__

if TYPE_CHECKING:
    from rustadam.optimizer import Adam
    from rustadam.weight_decay import WeightDecay

__all__ = ["Adam", "WeightDecay", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Adam":
        from rustadam.optimizer import Adam

        return Adam
    if name == "WeightDecay":
        from rustadam.weight_decay import WeightDecay

        return WeightDecay
    raise AttributeError(f"module 'rustadam' has no attribute {name!r}")
