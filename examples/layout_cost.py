"""What a layout the Rust core cannot take as it is costs: median step time of one 4M-element
float32 parameter, dense, with a gradient laid out otherwise, and as a non-dense view.

    python examples/layout_cost.py
"""

from __future__ import annotations

import time

import torch

from rustadam import Adam


def median_step_ms(param: torch.Tensor, grad: torch.Tensor, steps: int = 20) -> float:
    opt = Adam([param], backend="rust")
    param.grad = grad
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[steps // 2] * 1e3


def main() -> None:
    n = 1 << 22
    side = 1 << 11
    cases = {
        "dense param and gradient": (torch.randn(n), torch.randn(n)),
        "gradient transposed in memory": (
            torch.randn(side, side),
            torch.randn(side, side).t().contiguous().t(),
        ),
        "param a view of every other element": (torch.randn(2 * n)[::2], torch.randn(n)),
    }
    print(f"one float32 parameter of {n:,} elements, {torch.get_num_threads()} threads")
    for name, (param, grad) in cases.items():
        print(f"  {name:38s} {median_step_ms(param, grad):7.2f} ms")


if __name__ == "__main__":
    main()
