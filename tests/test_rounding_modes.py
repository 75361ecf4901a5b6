"""``rounding="stochastic"`` and ``"kahan"`` for 16-bit parameters.

- the fit: 8,192 bfloat16 weights from 1.0 to targets in [1.0, 1.1] at lr 1e-4 never
  move with round-to-nearest; both modes reach at most a third of its error, on every backend;
- bit-identical results for every thread count of the Rust core and on every backend;
- a checkpoint resumes bit for bit (the compensation buffer is saved; stochastic rounding is
  keyed by (seed, position, step, element), none of which a checkpoint loses);
- float32 and float64 parameters ignore the mode.
"""

import functools
import io

import pytest
import torch

from rustadam import Adam, WeightDecay

HALF = (torch.bfloat16, torch.float16)
MODES = ("stochastic", "kahan")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The torch paths step small tensors: with several OpenMP threads on a busy machine every
    # op waits on the others (10x slower). The Rust core's threads are set by num_threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality is bit for bit (-0.0 != 0.0, NaN == NaN)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = (_bits(a) != _bits(b)).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ"


def _assert_same_state(opt_a: Adam, params_a, opt_b: Adam, params_b, what: str) -> None:
    for k, (pa, pb) in enumerate(zip(params_a, params_b)):
        _assert_same_bits(pa, pb, f"{what}: param {k}")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys(), what
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                _assert_same_bits(sa[key], sb[key], f"{what}: param {k} state[{key!r}]")
            else:
                assert sa[key] == sb[key], (what, k, key)


# ---- (a) the fit ---------------------------------------------------------------------

N_FIT = 8192
FIT_LR = 1e-4
# Enough for float32 to come within 2.3e-4 of the targets (from a mean distance of 0.05).
FIT_STEPS = 2000


@functools.cache
def _fit(dtype: torch.dtype, rounding: str, backend: str) -> tuple[float, torch.Tensor]:
    """Fits the weights; returns (mean |w − target|, the final weights)."""
    gen = torch.Generator().manual_seed(14)
    target = 1.0 + 0.1 * torch.rand(N_FIT, generator=gen)
    w = torch.nn.Parameter(torch.ones(N_FIT, dtype=dtype))
    opt = Adam([w], lr=FIT_LR, rounding=rounding, backend=backend, seed=3)
    for _ in range(FIT_STEPS):
        # The gradient of mean((w − target)²), computed in float32 and stored in w's dtype as
        # autograd would. float16 gets it times a loss scale of 2^22 (Adam's step does not
        # depend on the scale but through ε): unscaled, g ≈ 1e-5 and (1 − β2)·g² underflows
        # float16, so v = 0 and m / ε̂ overflows; scaled, |g| ≤ 103 and g² stays finite.
        scale = 2.0**10 if dtype == torch.float16 else 2.0 / N_FIT
        w.grad = ((w.detach().float() - target) * scale).to(dtype)
        opt.step()
    return (w.detach().float() - target).abs().mean().item(), w.detach().clone()


def _check_fit(dtype: torch.dtype, backend: str, modes=MODES) -> None:
    reference = _fit(torch.float32, "nearest", "auto")[0]
    nearest_err, nearest_w = _fit(dtype, "nearest", backend)
    errors = {mode: _fit(dtype, mode, backend)[0] for mode in modes}
    report = f"{dtype} {backend}: float32 {reference:.2e}, nearest {nearest_err:.2e}, {errors}"
    print(f"mean |w - target| after the fit: {report}")  # shown with pytest -s
    assert reference < 5e-4, report
    # Every update (≈ lr = 1e-4) is below half an ulp of 1.0 (2^-9 in bfloat16, 2^-11 in
    # float16): round-to-nearest never moves a weight, the error stays the initial ≈ 0.05.
    assert torch.equal(nearest_w, torch.ones_like(nearest_w)), report
    assert 0.045 < nearest_err < 0.055, report
    for mode, err in errors.items():
        assert err <= nearest_err / 3, (mode, report)


@pytest.mark.parametrize("backend", ["auto", "torch", "foreach"])
def test_fit_bfloat16_reaches_a_third_of_nearest_error(backend):
    _check_fit(torch.bfloat16, backend)


def test_fit_float16_reaches_a_third_of_nearest_error():
    _check_fit(torch.float16, "auto")
    _check_fit(torch.float16, "torch", modes=("kahan",))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_fit_is_the_same_on_every_backend(dtype, mode):
    # 2000 steps of the fit: the backends agree bit for bit over the whole trajectory.
    backends = ("torch", "foreach") if dtype == torch.bfloat16 else ("torch",)
    if dtype == torch.float16 and mode == "stochastic":
        backends = ()  # covered by the short runs below; the long fit costs seconds per backend
    auto = _fit(dtype, mode, "auto")[1]
    for backend in backends:
        _assert_same_bits(_fit(dtype, mode, backend)[1], auto, f"{dtype} {mode} {backend}")


# ---- (b) one answer: every thread count, every backend -----------------------------------------

# A non-multiple of 16 (the SIMD width), odd 3-d, and more than 65,536 elements so that the core
# splits the tensor into chunks across threads.
SHAPES = [(7, 13), (3, 5, 17), (65536 + 37,)]
DECAYS = {
    "none": WeightDecay(),
    "decoupled": WeightDecay(0.1),
    "l2": WeightDecay(0.01, weight_decouple=False),
    "absolute": WeightDecay(1e-3, absolute=True),
}
STEPS = 4


def _params(seed: int = 1) -> list[torch.nn.Parameter]:
    """Every shape in bfloat16 and in float16, in one group."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        for dtype in HALF
        for shape in SHAPES
    ]


def _grads(params, step: int) -> list[torch.Tensor]:
    """Gradients of step ``step``: mixed magnitudes, a few exact zeros."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * torch.exp(2 * torch.randn(p.shape, generator=gen))
        g[torch.rand(p.shape, generator=gen) < 0.05] = 0
        out.append(g.to(p.dtype))
    return out


def _train(params, steps: range, **kwargs) -> Adam:
    opt = Adam(params, lr=1e-3, seed=1234, **kwargs)
    _continue(opt, params, steps)
    return opt


def _continue(opt: Adam, params, steps: range) -> None:
    for step in steps:
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("mode", MODES)
def test_same_bits_for_every_thread_count_and_backend(mode, decay):
    runs = {}
    for name, kwargs in [
        ("auto, 1 thread", dict(backend="auto", num_threads=1)),
        ("auto, 2 threads", dict(backend="auto", num_threads=2)),
        ("auto, 3 threads", dict(backend="auto", num_threads=3)),
        ("torch", dict(backend="torch")),
        ("foreach", dict(backend="foreach")),
    ]:
        params = _params()
        opt = _train(params, range(STEPS), rounding=mode, weight_decay=DECAYS[decay], **kwargs)
        runs[name] = (opt, params)
    opt0, params0 = runs["auto, 1 thread"]
    for p in params0:
        assert opt0.state[p]["step"] == STEPS
        assert ("compensation" in opt0.state[p]) == (mode == "kahan")
    for name, (opt, params) in runs.items():
        _assert_same_state(opt0, params0, opt, params, f"{mode}, {decay}: {name}")


def test_stochastic_rounding_is_unbiased_and_keyed_by_the_seed():
    # At t = 1 the update is lr·g/|g| = lr: 1.0 − 2^-10 lies a quarter of the way from 1.0 to
    # the next bfloat16 below it (1 − 2^-8), so a quarter of the weights must round down.
    def one_step(seed: int, backend: str) -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(1 << 16, dtype=torch.bfloat16))
        w.grad = torch.ones_like(w)
        Adam([w], lr=2.0**-10, rounding="stochastic", seed=seed, backend=backend).step()
        return w.detach()

    w = one_step(5, "auto")
    down = w == 1 - 2.0**-8
    assert torch.all(down | (w == 1))
    # Binomial(65536, 1/4): the standard deviation of the fraction is 0.0017.
    assert 0.24 < down.float().mean().item() < 0.26
    _assert_same_bits(one_step(5, "torch"), w, "torch vs auto, same seed")
    _assert_same_bits(one_step(5, "auto"), w, "the same seed again")
    assert not torch.equal(one_step(6, "auto"), w), "another seed rounds other elements"


def test_stochastic_rounding_depends_on_the_step_and_the_parameter():
    # Two identical parameters at two positions, stepped twice: neither the two positions nor
    # the two steps may draw the same rounding pattern.
    ws = [torch.nn.Parameter(torch.ones(1 << 12, dtype=torch.bfloat16)) for _ in range(2)]
    opt = Adam(ws, lr=2.0**-10, rounding="stochastic", seed=5)
    patterns = []
    for _ in range(2):
        before = [w.detach().clone() for w in ws]
        for w in ws:
            w.grad = torch.ones_like(w)
        opt.step()
        patterns += [w.detach() != b for w, b in zip(ws, before)]
    for a in range(len(patterns)):
        for b in range(a):
            assert not torch.equal(patterns[a], patterns[b]), (a, b)


# ---- (c) a checkpoint resumes bit for bit -------------------------------------------------------


@pytest.mark.parametrize(
    "backends", [("auto", "auto"), ("torch", "torch"), ("auto", "torch"), ("foreach", "auto")]
)
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_resumes_bit_for_bit(mode, backends):
    first, second = backends
    whole_params = _params()
    whole = _train(whole_params, range(2 * STEPS), rounding=mode, backend=first)

    params = _params()
    opt = _train(params, range(STEPS), rounding=mode, backend=first)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    del opt, params

    for i, state in saved["opt"]["state"].items():
        assert ("compensation" in state) == (mode == "kahan"), i
        if mode == "kahan":
            comp = state["compensation"]
            assert comp.dtype == saved["params"][i].dtype and comp.shape == saved["params"][i].shape
    if mode == "kahan":
        assert any(s["compensation"].count_nonzero() > 0 for s in saved["opt"]["state"].values())

    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed = Adam(resumed_params, lr=1e-3, seed=1234, rounding=mode, backend=second)
    resumed.load_state_dict(saved["opt"])
    _continue(resumed, resumed_params, range(STEPS, 2 * STEPS))
    _assert_same_state(whole, whole_params, resumed, resumed_params, f"{mode} {backends}")


# ---- (d) float32 and float64 ignore the mode ----------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_ignores_the_rounding_mode(dtype, backend):
    def run(mode: str) -> tuple[Adam, list[torch.nn.Parameter]]:
        params = [p.detach().to(dtype).requires_grad_() for p in _params()[:3]]
        return _train(params, range(STEPS), rounding=mode, backend=backend), params

    nearest = run("nearest")
    for mode in MODES:
        opt, params = run(mode)
        for p in params:
            assert "compensation" not in opt.state[p]
        _assert_same_state(*nearest, opt, params, f"{dtype} {backend} {mode}")


def test_unknown_rounding_mode_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        Adam([torch.nn.Parameter(torch.ones(2))], rounding="up")
