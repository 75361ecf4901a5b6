"""The Triton kernel (``rustadam._triton.triton_adam``) against the foreach path, bit for bit.

Without a GPU the kernel runs in triton's interpreter on CPU tensors. ``TRITON_INTERPRET`` is
read when triton is first imported, and other test modules may import it earlier in the same
pytest process, so the cases run in a fresh Python subprocess (this file run as a script) with
the variable set. Sizes are small: the interpreter is slow. Part ``adam`` runs
``rustadam.Adam(backend="triton")`` against ``backend="rust"`` (the optimizer's per-parameter
seeds, uneven step counts, maximize, AMSGrad, every decay, Kahan) bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

try:
    from rustadam import _triton
except ImportError:  # pragma: no cover
    _triton = None  # type: ignore[assignment]

needs_triton = pytest.mark.skipif(
    _triton is None or not _triton.available(), reason="triton is not installed"
)


def test_import_is_cheap_and_does_not_import_triton():
    code = (
        "import sys, rustadam._triton as t; "
        "assert 'triton' not in sys.modules; print(t.available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@needs_triton
@pytest.mark.parametrize("part", ["dtypes", "modes", "layouts", "adam"])
def test_kernel_equals_foreach_bit_for_bit_under_interpreter(part):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, __file__, part], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "ALL OK" in out.stdout


# ---- the subprocess -----------------------------------------------------------------------------


def _cfg(**kw):
    d = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, weight_decouple=True,
             absolute=False, optimized_update=True, maximize=False, amsgrad=False,
             rounding="nearest")  # fmt: skip
    d.update(kw)
    return types.SimpleNamespace(**d)


def _compare(dtype, c, shapes, steps, scale=1.0, layout=None, gs=None, fi=None):
    import torch

    from rustadam._foreach import foreach_adam
    from rustadam._triton import triton_adam

    gen = torch.Generator().manual_seed(len(shapes) + steps[0])

    def rnd(s, k=1.0):
        if dtype.is_complex:
            return torch.randn(s, generator=gen, dtype=dtype) * k
        return (torch.randn(s, generator=gen, dtype=torch.float64) * k).to(dtype)

    def real(t):
        return torch.view_as_real(t) if t.is_complex() else t

    p = [rnd(s, scale) for s in shapes]
    g = [rnd(s, scale) for s in shapes]
    m = [rnd(s, scale) for s in shapes]
    v = [real(rnd(s, scale * scale)).abs() for s in shapes]
    v = [torch.view_as_complex(x) if dtype.is_complex else x for x in v]
    if layout == "transposed_grad":
        g = [x.t().contiguous().t() if x.dim() == 2 else x for x in g]
    if layout == "strided_param":
        p = [torch.cat([x, x], dim=-1)[..., : x.shape[-1]] if x.dim() >= 1 else x for x in p]
    vm = [x.clone() for x in v] if c.amsgrad else None
    comp = [rnd(s, 1e-3 * scale) for s in shapes] if c.rounding == "kahan" else None
    lists = (p, m, v, vm, comp)
    a = [[x.clone() for x in lst] if lst is not None else None for lst in lists]
    b = [[x.clone() for x in lst] if lst is not None else None for lst in lists]
    if layout == "strided_param":
        b[0] = [torch.cat([x, x], dim=-1)[..., : x.shape[-1]] if x.dim() >= 1 else x.clone()
                for x in p]  # fmt: skip
    seeds = [3 * i + 1 for i in range(len(shapes))]
    foreach_adam(a[0], g, a[1], a[2], a[3], a[4], steps, seeds, c, grad_scale=gs, found_inf=fi)
    triton_adam(b[0], g, b[1], b[2], b[3], b[4], steps, seeds, c, grad_scale=gs, found_inf=fi)
    bad = []
    for name, la, lb in zip("p m v vmax comp".split(), a, b):
        if la is None:
            continue
        for i, (x, y) in enumerate(zip(la, lb)):
            x, y = real(x), real(y)
            same = (x == y) | (x.isnan() & y.isnan())
            if x.shape != y.shape or not same.all() or not torch.equal(x.signbit(), y.signbit()):
                bad.append(f"{name}[{i}]")
    return bad


def _adam_vs_core(dtype, opts, steps=3, seed=0):
    """``Adam(backend="triton")`` against ``Adam(backend="rust")``: the optimizer's own
    per-parameter seeds, step counts and state, two groups, bit for bit."""
    import torch

    from rustadam import Adam, WeightDecay

    gen = torch.Generator().manual_seed(11)
    shapes = [(9, 7), (5,), (), (1500,)]

    def rnd(s):
        if dtype.is_complex:
            return torch.randn(s, generator=gen, dtype=dtype)
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)

    def real(t):
        return torch.view_as_real(t) if t.is_complex() else t

    p0 = [rnd(s) for s in shapes]
    grads = [[rnd(s) for s in shapes] for _ in range(steps)]
    opts = dict(opts)
    wd = opts.pop("wd", WeightDecay())
    runs = {}
    for backend in ("rust", "triton"):
        ps = [x.clone() for x in p0]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]
        opt = Adam(groups, lr=0.5, eps=1e-8, weight_decay=wd, seed=seed, backend=backend, **opts)
        for k, gs in enumerate(grads):
            for j, (x, g) in enumerate(zip(ps, gs)):
                x.grad = None if (k == 1 and j == 1) else g.clone()  # uneven step counts
            opt.step()
        runs[backend] = (ps, opt)
    bad = []
    (pa, oa), (pb, ob) = runs["rust"], runs["triton"]
    for i, (x, y) in enumerate(zip(pa, pb)):
        pairs = [("param", x, y)]
        sa, sb = oa.state[x], ob.state[y]
        assert sa["step"] == sb["step"]
        pairs += [(k, sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor)]
        for name, u, w in pairs:
            if not torch.equal(real(u), real(w)):
                bad.append(f"{name}[{i}]")
    return bad


def _main(part):
    import torch

    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
    shapes = [(9, 7), (5,), (), (0,), (1500,)]
    steps = [1, 3, 7, 2, 1000]
    failures = []

    def run(tag, *args, **kw):
        bad = _compare(*args, **kw)
        if bad:
            failures.append(f"{tag}: {bad}")

    if part == "dtypes":
        decays = [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, weight_decouple=False),
                  dict(weight_decay=0.01, absolute=True)]  # fmt: skip
        for dt in dtypes:
            for d in decays:
                for opt in (True, False):
                    run(f"{dt} {d} opt={opt}", dt, _cfg(optimized_update=opt, **d), shapes, steps)
        # float16 subnormals and overflow, bfloat16 tiny values: the kernel's own narrowing
        run("f16 tiny", torch.float16, _cfg(eps=0.0), shapes, steps, scale=1e-6)
        run("f16 huge", torch.float16, _cfg(lr=100.0), shapes, steps, scale=3e4)
        run("bf16 tiny", torch.bfloat16, _cfg(eps=0.0), shapes, steps, scale=1e-30)
    elif part == "modes":
        modes = [
            dict(maximize=True), dict(amsgrad=True), dict(amsgrad=True, optimized_update=False),
            dict(rounding="stochastic"), dict(rounding="kahan"),
            dict(rounding="stochastic", weight_decay=0.1),
            dict(rounding="kahan", amsgrad=True, maximize=True),
            dict(rounding="kahan", amsgrad=True, weight_decay=0.1, weight_decouple=False),
        ]  # fmt: skip
        for dt in dtypes:
            for mo in modes:
                run(f"{dt} {mo}", dt, _cfg(**mo), shapes, steps)
        run("f16 stochastic tiny", torch.float16, _cfg(rounding="stochastic"), shapes, steps,
            scale=1e-6)  # fmt: skip
        for dt in (torch.float32, torch.bfloat16):
            run(f"{dt} grad_scale", dt, _cfg(), shapes, steps, gs=torch.tensor([4.0]),
                fi=torch.tensor([0.0]))  # fmt: skip
            run(f"{dt} found_inf", dt, _cfg(amsgrad=True), shapes, steps,
                gs=torch.tensor([4.0]), fi=torch.tensor([1.0]))  # fmt: skip
    elif part == "adam":
        from rustadam import WeightDecay

        for dt in dtypes:
            for opts in (
                dict(rounding="stochastic", wd=WeightDecay(0.1)),
                dict(maximize=True, amsgrad=True, wd=WeightDecay(0.1, weight_decouple=False)),
                dict(amsgrad=True, optimized_update=False, wd=WeightDecay(0.1, absolute=True)),
                dict(rounding="kahan", maximize=True),
            ):
                bad = _adam_vs_core(dt, opts)
                if bad:
                    failures.append(f"adam {dt} {opts}: {bad}")
        bad = _adam_vs_core(torch.bfloat16, dict(rounding="stochastic"), seed=2**64 - 3)
        if bad:
            failures.append(f"adam seed 2**64-3: {bad}")
    else:
        for dt in (torch.float32, torch.bfloat16):
            for lay in ("transposed_grad", "strided_param"):
                run(f"{dt} {lay}", dt, _cfg(rounding="stochastic"), shapes, steps, layout=lay)
        # many tensors, different step counts, one launch
        many = [(i % 5 + 1, 3) for i in range(40)]
        run("many", torch.bfloat16, _cfg(amsgrad=True), many, list(range(1, 41)))
    for f in failures:
        print("FAIL", f)
    print("ALL OK" if not failures else f"{len(failures)} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
