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
@pytest.mark.parametrize("part", ["dtypes", "modes", "layouts", "adam", "checks"])
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
    if layout == "neg_grad":  # the same values, as negative views (memory holding −x)
        g = [torch._neg_view(-x) for x in g]
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
    if layout == "neg_state":  # written through negative views
        for lists_ in (a, b):
            lists_[0] = [torch._neg_view(-x) for x in lists_[0]]
            lists_[1] = [torch._neg_view(-x) for x in lists_[1]]
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


def _state_snapshot(opt, params):
    import torch

    snap = [p.detach().clone() for p in params]
    for p in params:
        for k, x in opt.state.get(p, {}).items():
            snap += [k, x.clone() if isinstance(x, torch.Tensor) else x]
    return snap


def _same(a, b):
    import torch

    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _checks():
    """The Triton route refuses what the foreach route refuses (same message, nothing written
    in any group) and steps overlapping parameters one at a time in index order."""
    import torch

    from rustadam import Adam, functional
    from rustadam._foreach import foreach_adam
    from rustadam._triton import triton_adam

    failures = []
    gen = torch.Generator().manual_seed(5)

    def overlapping():
        g = torch.Generator().manual_seed(2)
        base = torch.randn(12, generator=g)
        return base, [base[0:7], base[4:12], torch.randn(3, 4, generator=g)]

    # Overlapping parameters through the optimizer: stepped in order, as the foreach route.
    results = {}
    for backend in ("foreach", "triton"):
        base, ps = overlapping()
        opt = Adam([{"params": ps}], lr=0.1, backend=backend)
        for k in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, float(i + k + 1))
            opt.step()
        results[backend] = (base.clone(), ps[2].detach().clone())
    if not all(torch.equal(x, y) for x, y in zip(results["foreach"], results["triton"])):
        failures.append(f"overlap via Adam: {results}")

    # The same, calling the kernels directly.
    out = {}
    for name, fn in (("foreach", foreach_adam), ("triton", triton_adam)):
        base = torch.arange(12.0) / 7
        ps = [base[0:7], base[4:12]]
        gs = [torch.ones(7), torch.full((8,), -2.0)]
        ms = [torch.zeros(7), torch.zeros(8)]
        vs = [torch.zeros(7), torch.zeros(8)]
        fn(ps, gs, ms, vs, None, None, [1, 1], [0, 0], _cfg(lr=0.5))
        out[name] = base
    if not torch.equal(out["foreach"], out["triton"]):
        failures.append(f"overlap direct: {out}")

    # Refusals: the message of the foreach route, and nothing changed in any group.
    def bad_cases():
        def grad_dtype(ps, opt):
            ps[1].grad_dtype = None  # torch refuses a gradient of another dtype by default
            ps[1].grad = ps[1].grad.double()

        def shared_moments(ps, opt):
            st = opt.state[ps[1]]
            st["exp_avg_sq"] = st["exp_avg"]

        def moment_shape(ps, opt):
            opt.state[ps[1]]["exp_avg"] = torch.zeros(7)

        def grad_is_param(ps, opt):
            ps[1].grad = ps[1].detach()

        def conj_moment(ps, opt):
            st = opt.state[ps[2]]
            st["exp_avg"] = st["exp_avg"].conj()

        def unsupported(ps, opt):
            p = torch.zeros(3, dtype=torch.float8_e4m3fn)
            p.grad = torch.zeros(3).to(p.dtype)
            opt.param_groups[1]["params"].append(p)

        return [grad_dtype, shared_moments, moment_shape, grad_is_param, conj_moment,
                unsupported]  # fmt: skip

    for case in bad_cases():
        msgs = {}
        for backend in ("foreach", "triton"):
            ps = [
                torch.randn(4, 3, generator=gen).requires_grad_(),
                torch.randn(5, generator=gen).requires_grad_(),
                torch.randn(2, dtype=torch.complex64, generator=gen).requires_grad_(),
            ]
            opt = Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, backend=backend)
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
            case(ps, opt)
            before = _state_snapshot(opt, ps)
            try:
                opt.step()
                msgs[backend] = "no error"
                continue
            except RuntimeError as e:
                msgs[backend] = str(e)
            if not _same(before, _state_snapshot(opt, ps)):
                failures.append(f"{case.__name__} on {backend}: a refused step changed state")
        if msgs["foreach"] == "no error" or msgs["foreach"] != msgs["triton"]:
            failures.append(f"{case.__name__}: foreach {msgs['foreach']!r} / "
                            f"triton {msgs['triton']!r}")  # fmt: skip

    # A group whose parameters the two routes share: one check over both finds the overlap.
    class Sub(torch.Tensor):
        pass

    real_ok = functional._triton_ok
    functional._triton_ok = lambda p: p.dtype == torch.float32
    try:
        res = []
        for route in ("mixed", "foreach"):
            base = torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            a = base[0:8].as_subclass(Sub)
            b = base.view(torch.float32)[8:24].as_subclass(Sub)  # the bytes of base[4:12]
            opt = Adam([a, b], lr=0.1, backend="auto" if route == "mixed" else "foreach")
            a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
            opt.step()
            res.append(base.clone())
        if not torch.equal(res[0], res[1]):
            failures.append(f"triton/foreach overlap: {res}")
    finally:
        functional._triton_ok = real_ok
    return failures


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
        # bfloat16 subnormals (below 1.18e-38): widened by their bits, which the interpreter's
        # own conversion does not do
        run("bf16 subnormal", torch.bfloat16, _cfg(eps=0.0), shapes, steps, scale=1e-39)
        run("bf16 subnormal kahan", torch.bfloat16, _cfg(rounding="kahan"), shapes, steps,
            scale=1e-39)  # fmt: skip
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
    elif part == "checks":
        failures += _checks()
    else:
        for dt in (torch.float32, torch.bfloat16):
            for lay in ("transposed_grad", "strided_param", "neg_grad", "neg_state"):
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
