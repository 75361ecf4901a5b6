"""Both backends against the float64 oracle of docs/NUMERICS.md, and against each other."""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch", "auto")
# name -> (weight_decouple, absolute); None: no weight decay at all.
DECAYS: dict[str, Optional[tuple[bool, bool]]] = {
    "none": None,
    "l2": (False, False),
    "decoupled": (True, False),
    "absolute": (True, True),
}
DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
STEPS = 100

# Given to the constructor; group 0 sets nothing itself, so it runs on these and on the
# constructor's own defaults for betas (0.9, 0.999) and eps (1e-16).
CTOR_LR = 2e-2
DEFAULT_WD = 0.05


def problem() -> list[dict[str, Any]]:
    """Groups with distinct hyper-parameters; each param carries how its gradients are drawn.

    - group 0 (constructor lr, default betas and eps=1e-16, WeightDecay's default λ):
      ``a`` has one column whose gradient is always exactly zero; ``b`` has no gradient for
      its first 10 steps, an all-zero gradient on its first update (the eps guard) and no
      gradient on every third step after that, so its t lags the optimizer's step count.
    - group 1: ε comparable to the gradients (scale 1e-2), so the two ``optimized_update``
      forms differ by far more than any tolerance; λ = 0 (L2 then returns ``grad`` itself).
    - group 2: β1 = 0, a one-element tensor, exact zeros scattered in the gradients.
    """
    return [
        {
            "hyper": {},
            "params": [
                {"shape": (4, 5), "scale": 1.0, "zero_col": True},
                {"shape": (7,), "scale": 0.1, "start": 11, "skip_every": 3},
            ],
        },
        {
            "hyper": {"lr": 3e-3, "betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.0},
            "params": [{"shape": (3, 2, 2), "scale": 1e-2, "skip_every": 5}],
        },
        {
            "hyper": {"lr": 5e-2, "betas": (0.0, 0.99), "eps": 1e-8, "weight_decay": 0.02},
            "params": [
                {"shape": (6,), "scale": 3.0, "zero_frac": 0.25},
                {"shape": (1,), "scale": 1.0, "skip_every": 7},
            ],
        },
    ]


def draw(groups: list[dict[str, Any]], np_dtype: type, seed: int = 0) -> tuple[list, list]:
    """Initial params and the gradients of every step, as float64 arrays holding np_dtype values."""
    rng = np.random.default_rng(seed)

    def cast(x: np.ndarray) -> np.ndarray:
        return x.astype(np_dtype).astype(np.float64)

    init = [[cast(rng.normal(size=p["shape"])) for p in g["params"]] for g in groups]
    grads = []
    for s in range(1, STEPS + 1):
        step = []
        for g in groups:
            row: list[Optional[np.ndarray]] = []
            for p in g["params"]:
                start = p.get("start", 1)
                every = p.get("skip_every")
                if s < start or (every and s > start and (s - start) % every == 0):
                    row.append(None)
                    continue
                x = rng.normal(size=p["shape"]) * p["scale"]
                if p.get("zero_col"):
                    x[:, 0] = 0.0
                if "zero_frac" in p:
                    x[rng.random(p["shape"]) < p["zero_frac"]] = 0.0
                if s == start and "start" in p:
                    x[...] = 0.0
                row.append(cast(x))
            step.append(row)
        grads.append(step)
    return init, grads


def resolved(groups: list[dict[str, Any]], decay: Optional[tuple[bool, bool]]) -> list[dict]:
    """Each group's hyper-parameters as the spec says they resolve (group value, else default)."""
    defaults = {"lr": CTOR_LR, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0}
    if decay is not None:
        defaults["weight_decay"] = DEFAULT_WD
    out = []
    for g in groups:
        hyper = dict(g["hyper"])
        if decay is None:
            hyper.pop("weight_decay", None)
        out.append({**defaults, **hyper})
    return out


def make_optimizer(
    groups: list[dict[str, Any]],
    tensors: list[list[torch.Tensor]],
    decay: Optional[tuple[bool, bool]],
    optimized_update: bool,
    backend: str,
) -> Adam:
    param_groups = []
    for g, ts in zip(groups, tensors):
        hyper = dict(g["hyper"])
        if decay is None:
            hyper.pop("weight_decay", None)
        param_groups.append({"params": ts, **hyper})
    wd = WeightDecay() if decay is None else WeightDecay(DEFAULT_WD, *decay)
    # lr is the only constructor value given: betas and eps come from the defaults.
    return Adam(
        param_groups,
        lr=CTOR_LR,
        weight_decay=wd,
        optimized_update=optimized_update,
        backend=backend,
    )


def tolerance(dtype: torch.dtype, n: int, scale: float, lr: float, betas: tuple) -> float:
    """Worst-case absolute error of θ after n steps, for |θ| ≤ scale.

    float64: each step both sides round a handful of operations (~1e-16 relative); linear
    accumulation over n steps of ~16 ulp of |θ| and of the step stays below 1e-13·n. Any
    formula error moves θ by at least ~1e-6 per step here, seven orders above this bound.

    float32: each step rounds the stored θ (2^-24·|θ|), and the step α·m/√v carries the
    relative error of float32 moments (a few 2^-24: the moving averages forget old rounding
    errors, so it does not grow with n). Linear accumulation of 4·2^-24·|θ| + 32·2^-24·|Δ| per
    step, with |Δ| ≤ α·max(1, (1 − β1)/√(1 − β2)) (the README's bound on the step), bounds it; the
    largest error seen on these problems is a quarter of it (float64: 1/75). A wrong bias
    correction, ε placement, decay or step count moves θ by ≥ 1e-4 per affected step, orders
    of magnitude above this bound (test_problem_tells_every_formula_apart).
    """
    beta1, beta2 = betas
    step_bound = lr * max(1.0, (1.0 - beta1) / math.sqrt(1.0 - beta2))
    if dtype == torch.float64:
        unit = 2.0**-52
        per_step = 16 * unit * (scale + step_bound)
    else:
        unit = 2.0**-24
        per_step = unit * (4 * scale + 32 * step_bound)
    return n * per_step


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("decay_name", list(DECAYS))
@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_matches_oracle(optimized_update: bool, decay_name: str, dtype, backend: str) -> None:
    decay = DECAYS[decay_name]
    groups = problem()
    init, grads = draw(groups, DTYPES[dtype])
    hyper = resolved(groups, decay)
    tensors = [[torch.nn.Parameter(torch.tensor(x, dtype=dtype)) for x in row] for row in init]
    opt = make_optimizer(groups, tensors, decay, optimized_update, backend)
    wd_flags = {} if decay is None else {"weight_decouple": decay[0], "absolute": decay[1]}
    oracle = AdamOracle(
        [{"params": row, **h} for row, h in zip(init, hyper)],
        optimized_update=optimized_update,
        **wd_flags,
    )
    scales = [[max(1.0, float(np.abs(x).max())) for x in row] for row in init]

    for n, step_grads in enumerate(grads, start=1):
        given: list[list[Optional[torch.Tensor]]] = []
        for row, grow in zip(tensors, step_grads):
            given.append([])
            for p, g in zip(row, grow):
                p.grad = None if g is None else torch.tensor(g, dtype=dtype)
                given[-1].append(None if g is None else p.grad.clone())
        before = [[as_np(p) for p in row] for row in tensors]
        opt.step()
        oracle.step(step_grads)
        for gi, (row, h) in enumerate(zip(tensors, hyper)):
            for i, p in enumerate(row):
                got = as_np(p)
                want = oracle.params[gi][i]
                assert np.isfinite(got).all(), f"step {n}: group {gi} param {i} is not finite"
                tol = tolerance(dtype, n, scales[gi][i], h["lr"], h["betas"])
                err = float(np.abs(got - want).max())
                assert err <= tol, f"step {n}: group {gi} param {i}: error {err:.3g} > {tol:.3g}"
                # L2 returns a new gradient: the user's .grad is never written.
                if given[gi][i] is not None:
                    assert torch.equal(p.grad, given[gi][i])
                # The eps guard (group 0, eps=1e-16): a zero gradient on a parameter's first
                # update gives a zero update, not 0/0; with no decay nothing else moves θ.
                if decay is None and gi == 0:
                    if i == 0:  # its column 0 always has a zero gradient
                        assert np.array_equal(got[:, 0], init[0][0][:, 0])
                    elif step_grads[0][1] is not None and oracle.state[0][1]["step"] == 1:
                        assert np.array_equal(got, before[0][1])

    # State: t per parameter, and the moments.
    for gi, row in enumerate(tensors):
        for i, p in enumerate(row):
            state, want = opt.state[p], oracle.state[gi][i]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            assert state["step"] == want["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].dtype == dtype and state[key].shape == p.shape
                ref = want[key]
                # float32 moments: a few 2^-24 of the largest recent magnitude (see tolerance).
                rtol = 1e-12 if dtype == torch.float64 else 1e-5
                atol = rtol * float(np.abs(ref).max())
                np.testing.assert_allclose(as_np(state[key]), ref, rtol=rtol, atol=atol)
    # b skipped its first 10 steps and every third after: t counts its own updates only.
    assert opt.state[tensors[0][1]]["step"] == 1 + (STEPS - 11) - (STEPS - 11) // 3


def final_params(
    optimized_update: bool, decay: Optional[tuple[bool, bool]]
) -> list[list[np.ndarray]]:
    groups = problem()
    init, grads = draw(groups, np.float64)
    flags = {} if decay is None else {"weight_decouple": decay[0], "absolute": decay[1]}
    oracle = AdamOracle(
        [{"params": row, **h} for row, h in zip(init, resolved(groups, decay))],
        optimized_update=optimized_update,
        **flags,
    )
    for g in grads:
        oracle.step(g)
    return oracle.params


@pytest.mark.parametrize("decay_name", list(DECAYS))
def test_problem_tells_every_formula_apart(decay_name: str) -> None:
    """The oracle test could not pass with another mode's formula: wherever two modes can
    differ, their results after 100 steps differ by far more than the float32 tolerance."""
    decay = DECAYS[decay_name]
    mine = final_params(True, decay)
    # optimized_update only matters where ε is comparable to √v (group 1); the decay modes
    # only where λ ≠ 0 (groups 0 and 2).
    others = [((False, decay), [1])]
    others += [((True, d), [0, 2]) for k, d in DECAYS.items() if k != decay_name]
    for other, distinct_groups in others:
        theirs = final_params(*other)
        for gi in distinct_groups:
            diff = max(float(np.abs(x - y).max()) for x, y in zip(mine[gi], theirs[gi]))
            assert diff > 1e-3, f"{decay_name} vs {other}: group {gi} differs by only {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_zero_gradient_first_step_is_zero_update(optimized_update: bool, backend: str) -> None:
    """eps=1e-16 (the default): m = v = 0 gives 0 / (0 + ε) = 0, never 0/0."""
    for dtype in (torch.float32, torch.float64):
        p = torch.nn.Parameter(torch.tensor([1.5, -2.0, 0.0, 3.0], dtype=dtype))
        before = p.detach().clone()
        opt = Adam([p], lr=0.1, optimized_update=optimized_update, backend=backend)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p.detach(), before)
        assert torch.equal(opt.state[p]["exp_avg_sq"], torch.zeros_like(p))
        # A later nonzero gradient moves only the elements it touches.
        p.grad = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=dtype)
        opt.step()
        moved = (p.detach() != before).tolist()
        assert moved == [False, True, False, False]
        assert torch.isfinite(p).all()


def test_defaults() -> None:
    sig = inspect.signature(Adam.__init__)
    assert sig.parameters["eps"].default == 1e-16
    assert sig.parameters["optimized_update"].default is True
    assert sig.parameters["lr"].default == 1e-3
    assert tuple(sig.parameters["betas"].default) == (0.9, 0.999)
    opt = Adam([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults["eps"] == 1e-16
    assert opt.optimized_update is True
    assert opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_eps_and_mode_act(backend: str) -> None:
    """The defaults act as eps=1e-16 with optimized_update=True: with gradients ~1e-16, ε̂ and
    the placement of the bias correction change θ by far more than float64 rounding."""
    rng = np.random.default_rng(7)
    x0 = rng.normal(size=8)
    gs = [rng.normal(size=8) * 1e-16 for _ in range(20)]
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = Adam([p], lr=1e-2, backend=backend)
    results = {}
    for eps, mode in [(1e-16, True), (1e-16, False), (1e-8, True), (0.0, True)]:
        o = AdamOracle(
            [{"params": [x0], "lr": 1e-2, "betas": (0.9, 0.999), "eps": eps, "weight_decay": 0.0}],
            optimized_update=mode,
        )
        for g in gs:
            o.step([[g]])
        results[(eps, mode)] = o.params[0][0]
    for g in gs:
        p.grad = torch.tensor(g)
        opt.step()
    got = as_np(p)
    want = results[(1e-16, True)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for key, other in results.items():
        if key != (1e-16, True):
            assert np.abs(other - want).max() > 1e-4, key


@pytest.mark.parametrize("decay_name", list(DECAYS))
@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_rust_and_torch_backends_agree(optimized_update: bool, decay_name: str) -> None:
    """float32, one step at a time from the same state (the torch side is re-synced to the Rust
    side after every step), over 100 steps:

    - m and v are bit-equal: both compute them with the same operations, correctly rounded.
    - θ: torch's float32 sqrt is not always correctly rounded (~20% of elements are 1 ulp
      off), the core's is. One ulp in √v moves the step y = α'·m/(√v + ε) by at most ~2 ulp of
      |y| after both sides round it, and rounding θ + y can add one ulp of θ: so
      |θ_rust − θ_torch| ≤ ulp(θ) + 2·ulp(y); where |y| ≪ |θ| that is 1 ulp of θ.
    """
    decay = DECAYS[decay_name]
    groups = problem()
    init, grads = draw(groups, np.float32, seed=3)
    sides = []
    for backend in ("rust", "torch"):
        ts = [[torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in r] for r in init]
        sides.append((make_optimizer(groups, ts, decay, optimized_update, backend), ts))
    (rust, tr), (ref, tt) = sides
    pairs = [
        (gi, i, pr, pt)
        for gi, (a, b) in enumerate(zip(tr, tt))
        for i, (pr, pt) in enumerate(zip(a, b))
    ]
    for n, step_grads in enumerate(grads, start=1):
        for ts in (tr, tt):
            for row, grow in zip(ts, step_grads):
                for p, g in zip(row, grow):
                    p.grad = None if g is None else torch.tensor(g, dtype=torch.float32)
        before = [pr.detach().numpy().copy() for _, _, pr, _ in pairs]
        rust.step()
        ref.step()
        for (gi, i, pr, pt), old in zip(pairs, before):
            where = f"step {n}, group {gi}, param {i}"
            if step_grads[gi][i] is None:
                assert np.array_equal(pr.detach().numpy(), old), where
                assert torch.equal(pr, pt), where
                continue
            sr, st = rust.state[pr], ref.state[pt]
            assert sr["step"] == st["step"], where
            assert torch.equal(sr["exp_avg"], st["exp_avg"]), where
            assert torch.equal(sr["exp_avg_sq"], st["exp_avg_sq"]), where
            a, b = pr.detach().numpy(), pt.detach().numpy()
            bound = np.spacing(np.abs(a)) + 2 * np.spacing(np.abs(a - old))
            assert (np.abs(a - b) <= bound).all(), f"{where}: {np.abs(a - b).max()}"
            with torch.no_grad():
                pt.copy_(pr)


@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_thread_count_does_not_change_results(optimized_update: bool) -> None:
    """1 and 2 threads give bit-identical θ, m, v; one tensor spans several work chunks."""
    rng = np.random.default_rng(11)
    shapes = [(300_000,), (5, 3), (1,)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    init[1] = init[1].astype(np.float64)
    runs = []
    for threads in (1, 2):
        ps = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
        opt = Adam(
            [{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-1}],
            lr=1e-2,
            weight_decay=WeightDecay(0.1, weight_decouple=False),
            optimized_update=optimized_update,
            backend="rust",
            num_threads=threads,
        )
        grng = np.random.default_rng(12)
        for _ in range(5):
            for p in ps:
                p.grad = torch.from_numpy(grng.normal(size=p.shape)).to(p.dtype)
            opt.step()
        runs.append((ps, opt))
    (ps1, o1), (ps2, o2) = runs
    for a, b in zip(ps1, ps2):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o1.state[a][key], o2.state[b][key])
