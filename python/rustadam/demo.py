"""``make demo``: rustadam.Adam and torch.optim.Adam train the same small network, side by side.

The model is a 64-128-10 MLP (ReLU) on scikit-learn's bundled handwritten digits (1797 images of
8×8 pixels, no download), cross-entropy loss, learning rate α = 1e-3, batches of 32. The demo runs
four parts and writes one PNG per figure under ``--out`` (default ``out/demo``):

1. Head to head (``head_to_head.png``): ``rustadam.Adam(optimized_update=False, eps=1e-8)``
   against ``torch.optim.Adam(eps=1e-8)``. Both are then the same algorithm,

       θ ← θ − (α / bc1) · m / (sqrt(v) / sqrt(bc2) + ε),   bc_i = 1 − β_i^t,

   started from the same initial weights and fed the same batches, so their losses agree to
   float32 rounding. Prints per-epoch training loss and test accuracy of both, and the mean time
   of ``opt.step()`` (``time.perf_counter`` around that call only).
2. rustadam's options, a few epochs each: ``optimized_update=True`` against ``False``
   (``update_modes.png``) and the three weight-decay modes — L2, decoupled and decoupled
   absolute — against none (``weight_decay.png``).
3. The bounded step (``step_bound.png``): with ε = 0 the update Δ = α · m̂ / sqrt(v̂) satisfies
   |Δ| ≤ α·(1 − β1)/sqrt(1 − β2) when 1 − β1 > sqrt(1 − β2) (≈ 3.16·α for the default betas),
   and |Δ| ≈ α in most cases. The demo records |Δθ| of every weight at every step and plots
   the distribution against α and that bound.
4. Pure bfloat16 (``bf16_rounding.png``): the same MLP with its weights, inputs, gradients and
   optimizer state in bfloat16, trained with ``rounding="nearest"``, ``"stochastic"`` and
   ``"kahan"`` (and Kahan with ``gradient_release=True``, which must give the Kahan run's numbers
   exactly) against float32, loss per epoch. Round-to-nearest loses every update smaller than
   half a bfloat16 ulp of its weight; the other two keep them on average or exactly. Also
   prints the bytes per parameter each mode holds — weights, gradients, moments and Kahan's
   compensation, measured from the tensors the optimizer allocates — with and without
   gradient release.

Example::

    python -m rustadam.demo --epochs 12 --out out/demo --seed 0 --threads 1

matplotlib, tqdm and scikit-learn are needed here only; the library does not import them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rustadam import Adam, WeightDecay

LR = 1e-3
BETAS = (0.9, 0.999)
BATCH_SIZE = 32
HIDDEN = 128
# ε of the head-to-head: torch.optim.Adam's default, given to both optimizers.
HEAD_TO_HEAD_EPS = 1e-8
# rustadam's default ε̂, used by the option runs.
DEFAULT_EPS = 1e-16
# The option runs and the step-bound run are short: at most this many epochs.
BRIEF_EPOCHS = 6
# ε of the step-bound run. Not 0: weights fed by pixels that are blank in every image get g = 0
# at every step, and with ε = 0 their update would be 0/0 (with 1e-30 it is 0). 1e-30 is a
# normal float32 far below any non-zero sqrt(v̂) the run produces, so every other update is
# the ε = 0 update to float32 precision.
BOUND_EPS = 1e-30
# Weight decay λ per mode, each a usual or telling value for a run of a few epochs:
# - L2 adds λ·θ to the gradient before Adam normalises it, so a weight whose gradient is 0 (the
#   weights of pixels blank in every image) moves by ≈ α per step however small λ is; λ = 1e-4,
#   a common torch.optim.Adam setting, already shrinks the weights within the first epoch.
# - decoupled (AdamW) multiplies θ by 1 − α·λ per step; λ = 0.1 is a common AdamW setting.
# - decoupled absolute multiplies θ by 1 − λ per step whatever α is; λ = 5e-4 shrinks 5× as much
#   per step as the decoupled run.
WD_L2 = 1e-4
WD_DECOUPLED = 0.1
WD_ABSOLUTE = 5e-4

_MISSING = (
    "rustadam.demo needs {pkg} (the library itself does not). Run `make demo`, which installs "
    "matplotlib, tqdm and scikit-learn into .venv, or `pip install {pkg}`."
)


def _need(module: str, pkg: str) -> Any:
    """Imports a demo-only dependency, or fails saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(_MISSING.format(pkg=pkg)) from e


@dataclass
class Data:
    """The digits split: pixel intensities scaled to [0, 1], labels 0-9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Run:
    """One model with its optimizer and what training it produced, one entry per epoch."""

    label: str
    model: nn.Module
    opt: torch.optim.Optimizer
    loss: list[float] = field(default_factory=list)  # mean training loss over the epoch
    acc: list[float] = field(default_factory=list)  # test accuracy after the epoch
    # ‖θ‖₂ over all parameters: before training, then after each epoch (one more entry).
    norm: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # seconds of every opt.step()
    # |Δθ| of every element at every step, recorded only when not None.
    deltas: Optional[list[np.ndarray]] = None
    # The model's dtype: inputs are cast to it (bfloat16 for the pure-bfloat16 runs).
    dtype: torch.dtype = torch.float32

    def mean_step_us(self) -> float:
        return 1e6 * float(np.mean(self.step_s))

    def median_step_us(self) -> float:
        return 1e6 * float(np.median(self.step_s))


@dataclass
class DemoResult:
    """What :func:`main` measured, for callers (tests) that check it."""

    head_to_head: dict[str, Run]
    update_modes: dict[str, Run]
    # max |θ(optimized_update=True) − θ(False)| after each epoch.
    update_modes_gap: list[float]
    weight_decay: dict[str, Run]
    # The step-bound run (its ``deltas`` hold |Δθ| per step) and its summary: ``max`` |Δθ|,
    # ``alpha``, the spec's ``bound`` α·(1−β1)/sqrt(1−β2), ``n`` values, ``zeros``, ``le_alpha``.
    bound_run: Run
    bound: dict[str, float]
    figures: list[Path]
    # The pure-bfloat16 runs ("float32", "nearest", "stochastic", "kahan", "kahan, release")
    # and the measured memory per mode (:class:`Memory`).
    bf16: dict[str, Run] = field(default_factory=dict)
    memory: list[Memory] = field(default_factory=list)


def load_data(seed: int) -> Data:
    """scikit-learn's digits, 80/20 stratified split, as float32/int64 tensors."""
    datasets = _need("sklearn.datasets", "scikit-learn")
    model_selection = _need("sklearn.model_selection", "scikit-learn")
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # intensities are 0..16
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    return Data(
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te).long(),
    )


def make_model(seed: int) -> nn.Module:
    """The 64-128-10 MLP with torch's default initialisation, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def train_lockstep(
    runs: Sequence[Run],
    data: Data,
    epochs: int,
    seed: int,
    title: str,
    tqdm: Any,
    on_epoch: Callable[[int, Sequence[Run], Callable[[str], None]], None],
) -> None:
    """Trains every run on the same batches in the same order, one batch for all, then the next.

    ``tqdm`` is the tqdm class when stdout is a terminal (a progress bar), else None; ``on_epoch``
    gets the epoch number, the runs and a function that prints a line without breaking the bar.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    n_batches = math.ceil(n / BATCH_SIZE)
    bar = tqdm(total=epochs * n_batches, desc=title, unit="batch", leave=False) if tqdm else None
    say: Callable[[str], None] = tqdm.write if tqdm else print
    for run in runs:
        if not run.norm:
            run.norm.append(_flat_params(run.model).norm().item())
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        totals = [0.0] * len(runs)
        for b in range(n_batches):
            idx = perm[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]
            xb, yb = data.x_train[idx], data.y_train[idx]
            for k, run in enumerate(runs):
                run.opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(run.model(xb.to(run.dtype)), yb)
                loss.backward()
                before = _flat_params(run.model).clone() if run.deltas is not None else None
                # As timeit does: a full collection of the cyclic garbage collector (hundreds
                # of ms with torch, sklearn and matplotlib loaded) must not land in a timing.
                gc.disable()
                t0 = time.perf_counter()
                run.opt.step()
                run.step_s.append(time.perf_counter() - t0)
                gc.enable()
                if before is not None and run.deltas is not None:
                    run.deltas.append((_flat_params(run.model) - before).abs().numpy())
                totals[k] += loss.item() * len(idx)
            if bar is not None:
                bar.update(1)
        with torch.no_grad():
            for k, run in enumerate(runs):
                run.loss.append(totals[k] / n)
                pred = run.model(data.x_test.to(run.dtype)).argmax(dim=1)
                run.acc.append((pred == data.y_test).float().mean().item())
                run.norm.append(_flat_params(run.model).norm().item())
        on_epoch(epoch, runs, say)
    if bar is not None:
        bar.close()


def _g(x: float) -> str:
    """A hyper-parameter as written in code: 1e-8, not 1e-08."""
    return f"{x:g}".replace("e-0", "e-").replace("e+0", "e+")


def _rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ---- the four parts ------------------------------------------------------------------------------


def head_to_head(
    data: Data, epochs: int, seed: int, threads: Optional[int], tqdm: Any
) -> dict[str, Run]:
    model = make_model(seed)
    twin = copy.deepcopy(model)
    runs = [
        Run(
            "rustadam.Adam",
            model,
            Adam(
                model.parameters(),
                lr=LR,
                betas=BETAS,
                eps=HEAD_TO_HEAD_EPS,
                optimized_update=False,
                backend="rust",  # the Rust core or an error, never the torch fallback
                num_threads=threads,
            ),
        ),
        Run(
            "torch.optim.Adam",
            twin,
            torch.optim.Adam(twin.parameters(), lr=LR, betas=BETAS, eps=HEAD_TO_HEAD_EPS),
        ),
    ]
    print(
        f"\n[1/4] Head to head: rustadam.Adam(optimized_update=False, eps={_g(HEAD_TO_HEAD_EPS)}) "
        f"vs torch.optim.Adam(eps={_g(HEAD_TO_HEAD_EPS)})\n"
        "      The same algorithm, theta <- theta - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps), "
        "from the same\n      initial weights on the same batches; only float32 rounding "
        "differs."
    )
    print(
        f"{'epoch':>7}  {'loss rustadam':>13}  {'loss torch':>10}  {'rel. diff':>9}  "
        f"{'test acc rustadam':>17}  {'test acc torch':>14}"
    )

    def report(epoch: int, runs: Sequence[Run], say: Callable[[str], None]) -> None:
        r, t = runs
        say(
            f"{epoch:>3}/{epochs:<3}  {r.loss[-1]:>13.6f}  {t.loss[-1]:>10.6f}  "
            f"{_rel_diff(r.loss[-1], t.loss[-1]):>9.1e}  {r.acc[-1]:>17.2%}  {t.acc[-1]:>14.2%}"
        )

    train_lockstep(runs, data, epochs, seed, "head to head", tqdm, report)
    r, t = runs
    print(
        f"mean optimizer step time (time.perf_counter around opt.step() only, "
        f"{len(r.step_s)} steps, {sum(p.numel() for p in r.model.parameters())} parameters):\n"
        f"      rustadam.Adam {r.mean_step_us():8.1f} us (median {r.median_step_us():.1f})    "
        f"torch.optim.Adam {t.mean_step_us():8.1f} us (median {t.median_step_us():.1f})    "
        f"ratio of means torch/rustadam {t.mean_step_us() / r.mean_step_us():.2f}"
    )
    return {"rustadam": r, "torch": t}


def _rustadam_run(
    label: str,
    base: nn.Module,
    threads: Optional[int],
    *,
    eps: float = DEFAULT_EPS,
    optimized_update: bool = True,
    weight_decay: Optional[WeightDecay] = None,
) -> Run:
    model = copy.deepcopy(base)
    opt = Adam(
        model.parameters(),
        lr=LR,
        betas=BETAS,
        eps=eps,
        weight_decay=weight_decay if weight_decay is not None else WeightDecay(),
        optimized_update=optimized_update,
        backend="rust",
        num_threads=threads,
    )
    return Run(label, model, opt)


def _summary(runs: Sequence[Run]) -> None:
    print(f"      {'run':<46}  {'loss':>8}  {'test acc':>8}  {'|theta|_2':>9}")
    for r in runs:
        print(f"      {r.label:<46}  {r.loss[-1]:>8.4f}  {r.acc[-1]:>8.2%}  {r.norm[-1]:>9.3f}")


def _progress_line(
    part: str, epochs: int, then: Optional[Callable[[Sequence[Run]], None]] = None
) -> Callable[[int, Sequence[Run], Callable[[str], None]], None]:
    def report(epoch: int, runs: Sequence[Run], say: Callable[[str], None]) -> None:
        if then is not None:
            then(runs)
        say(f"      {part}: epoch {epoch}/{epochs} done")

    return report


def _max_gap(a: nn.Module, b: nn.Module) -> float:
    return (_flat_params(a) - _flat_params(b)).abs().max().item()


def options(
    data: Data, epochs: int, seed: int, threads: Optional[int], tqdm: Any
) -> tuple[dict[str, Run], list[float], dict[str, Run]]:
    base = make_model(seed)
    modes = {
        "True": _rustadam_run("optimized_update=True", base, threads, optimized_update=True),
        "False": _rustadam_run("optimized_update=False", base, threads, optimized_update=False),
    }
    print(
        f"\n[2/4] rustadam options, {epochs} epochs each, same initial weights and batches, "
        f"lr={LR:g}, eps={DEFAULT_EPS:g}\n"
        "      optimized_update=True folds sqrt(bc2) into the step size, False is the textbook "
        "form:"
    )
    gap: list[float] = []

    def record_gap(runs: Sequence[Run]) -> None:
        gap.append(_max_gap(runs[0].model, runs[1].model))

    train_lockstep(
        list(modes.values()),
        data,
        epochs,
        seed,
        "update modes",
        tqdm,
        _progress_line("update modes", epochs, record_gap),
    )
    _summary(list(modes.values()))
    print(
        "      max |theta(True) - theta(False)| after each epoch: "
        + ", ".join(f"{g:.1e}" for g in gap)
    )

    decays = {
        "none": _rustadam_run("no weight decay", base, threads),
        "l2": _rustadam_run(
            f"L2: WeightDecay({WD_L2:g}, weight_decouple=False)",
            base,
            threads,
            weight_decay=WeightDecay(WD_L2, weight_decouple=False),
        ),
        "decoupled": _rustadam_run(
            f"decoupled: WeightDecay({WD_DECOUPLED:g})",
            base,
            threads,
            weight_decay=WeightDecay(WD_DECOUPLED),
        ),
        "absolute": _rustadam_run(
            f"absolute: WeightDecay({WD_ABSOLUTE:g}, absolute=True)",
            base,
            threads,
            weight_decay=WeightDecay(WD_ABSOLUTE, absolute=True),
        ),
    }
    print(
        "      Weight decay (optimized_update=True): L2 adds wd*theta to the gradient; "
        "decoupled\n      multiplies theta by (1 - lr*wd) each step, absolute by (1 - wd):"
    )
    runs = list(decays.values())
    train_lockstep(runs, data, epochs, seed, "weight decay", tqdm, _progress_line("decay", epochs))
    _summary(list(decays.values()))
    return modes, gap, decays


def step_bound(
    data: Data, epochs: int, seed: int, threads: Optional[int], tqdm: Any
) -> tuple[Run, dict[str, float]]:
    run = _rustadam_run(
        f"optimized_update=False, eps={BOUND_EPS:g}",
        make_model(seed),
        threads,
        eps=BOUND_EPS,
        optimized_update=False,
    )
    run.deltas = []
    print(
        f"\n[3/4] The bounded step: |delta theta| of every weight at every step, {epochs} epochs, "
        f"rustadam.Adam(optimized_update=False, eps={BOUND_EPS:g})"
    )
    train_lockstep([run], data, epochs, seed, "step bound", tqdm, _progress_line("bound", epochs))
    deltas = np.concatenate(run.deltas)
    beta1, beta2 = BETAS
    # The spec's bound for 1 − β1 > sqrt(1 − β2), the case of the default betas used here.
    bound = LR * (1 - beta1) / math.sqrt(1 - beta2)
    info = {
        "alpha": LR,
        "bound": bound,
        "max": float(deltas.max()),
        "n": float(deltas.size),
        "zeros": float(np.count_nonzero(deltas == 0)),
        # ≤ α up to the float32 rounding of θ − Δθ (the t = 1 updates are exactly α).
        "le_alpha": float(np.count_nonzero(deltas <= LR * (1 + 1e-4))),
    }
    print(
        f"      {deltas.size} updates: max |delta theta| = {info['max']:.4e} = "
        f"{info['max'] / LR:.3f} * lr; bound lr*(1-beta1)/sqrt(1-beta2) = {bound:.4e}; "
        f"{info['le_alpha'] / deltas.size:.2%} are <= lr; {int(info['zeros'])} are exactly 0"
    )
    return run, info


# Pure bfloat16: the runs of part 4, as (key, dtype, rounding, gradient_release).
BF16_RUNS = [
    ("float32", torch.float32, "nearest", False),
    ("nearest", torch.bfloat16, "nearest", False),
    ("stochastic", torch.bfloat16, "stochastic", False),
    ("kahan", torch.bfloat16, "kahan", False),
    ("kahan, release", torch.bfloat16, "kahan", True),
]


@dataclass
class Memory:
    """Bytes per parameter one training step holds, measured on the MLP's real tensors.

    ``weights``, ``grads`` (gradients held after backward, when ``opt.step()`` runs) and
    ``states`` (every tensor in the optimizer's state: m, v and Kahan's compensation) are summed
    ``nbytes`` divided by the number of parameters; ``peak_grads`` is the most gradient bytes
    alive at once during backward (with gradient release each one is freed once stepped).
    """

    label: str
    dtype: torch.dtype
    rounding: str
    release: bool
    weights: float
    grads: float
    states: float
    peak_grads: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.states


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(data: Data, seed: int, threads: Optional[int]) -> list[Memory]:
    """Builds the MLP and its optimizer per mode, runs one step and counts what they hold."""
    rows = []
    x, y = data.x_train[:BATCH_SIZE], data.y_train[:BATCH_SIZE]
    for release in (False, True):
        for key, dtype, rounding, _ in BF16_RUNS[:4]:
            model = make_model(seed).to(dtype)
            params = list(model.parameters())
            live = [0]

            # Registered before the optimizer's own hook, so it runs first: it sees this
            # parameter's gradient and every other gradient still alive.
            def count(_: torch.Tensor, params: list[torch.Tensor] = params, live: list = live):
                alive = _nbytes(q.grad for q in params if q.grad is not None)
                live[0] = max(live[0], alive)

            for p in params:
                p.register_post_accumulate_grad_hook(count)
            opt = Adam(
                params,
                lr=LR,
                rounding=rounding,
                gradient_release=release,
                backend="rust",
                num_threads=threads,
            )
            opt.zero_grad()
            F.cross_entropy(model(x.to(dtype)), y).backward()
            opt.step()
            n = sum(p.numel() for p in params)
            states = [t for s in opt.state.values() for t in s.values()]
            rows.append(
                Memory(
                    label=key if dtype == torch.float32 else f"bfloat16, {key}",
                    dtype=dtype,
                    rounding=rounding,
                    release=release,
                    weights=_nbytes(params) / n,
                    grads=_nbytes(p.grad for p in params if p.grad is not None) / n,
                    states=_nbytes(t for t in states if isinstance(t, torch.Tensor)) / n,
                    peak_grads=live[0] / n,
                )
            )
    return rows


def pure_bf16(
    data: Data, epochs: int, seed: int, threads: Optional[int], tqdm: Any
) -> tuple[dict[str, Run], list[Memory]]:
    base = make_model(seed)
    runs = {}
    for key, dtype, rounding, release in BF16_RUNS:
        model = copy.deepcopy(base).to(dtype)
        opt = Adam(
            model.parameters(),
            lr=LR,
            betas=BETAS,
            rounding=rounding,
            gradient_release=release,
            backend="rust",
            num_threads=threads,
        )
        label = "float32" if dtype == torch.float32 else f'bfloat16, rounding="{rounding}"'
        runs[key] = Run(label + (", gradient_release" if release else ""), model, opt, dtype=dtype)
    print(
        f"\n[4/4] Pure bfloat16: weights, inputs, gradients, m and v in bfloat16, {epochs} epochs, "
        f"lr={LR:g}, against float32.\n      Round-to-nearest drops every update below half a "
        "bfloat16 ulp of its weight (2^-9 relative);\n      stochastic rounding keeps them on "
        "average, Kahan summation in a bfloat16 compensation buffer."
    )
    keys = list(runs)
    print("      " + f"{'epoch':>7}" + "".join(f"  {k:>14}" for k in keys) + "   (training loss)")

    def report(epoch: int, rs: Sequence[Run], say: Callable[[str], None]) -> None:
        say("      " + f"{epoch:>3}/{epochs:<3}" + "".join(f"  {r.loss[-1]:>14.4f}" for r in rs))

    train_lockstep(list(runs.values()), data, epochs, seed, "bfloat16", tqdm, report)
    same = runs["kahan"].loss == runs["kahan, release"].loss and torch.equal(
        _flat_params(runs["kahan"].model), _flat_params(runs["kahan, release"].model)
    )
    print(
        "      test accuracy: "
        + ", ".join(f"{k} {r.acc[-1]:.2%}" for k, r in runs.items())
        + f"\n      kahan with gradient release gives the kahan run bit for bit: {same}"
    )
    memory = measure_memory(data, seed, threads)
    print(
        "      Bytes per parameter (measured: nbytes of the weights, of the gradients held "
        "when opt.step() runs\n      and of every optimizer state tensor, over the "
        f"{sum(p.numel() for p in base.parameters())} parameters):"
    )
    print(
        f"      {'mode':<22}  {'gradient release':>16}  {'weights':>7}  {'grads':>5}  "
        f"{'state':>5}  {'total':>5}  {'peak grads in backward':>22}"
    )
    for m in memory:
        print(
            f"      {m.label:<22}  {'yes' if m.release else 'no':>16}  {m.weights:>7.2f}  "
            f"{m.grads:>5.2f}  {m.states:>5.2f}  {m.total:>5.2f}  {m.peak_grads:>22.2f}"
        )
    print(
        "      With gradient release each gradient is freed as soon as its parameter is "
        "stepped: at most one is\n      alive, here at worst the 64x128 weight's gradient "
        f"({max(p.numel() for p in base.parameters())} of the "
        f"{sum(p.numel() for p in base.parameters())} parameters)."
    )
    return runs, memory


# ---- figures -------------------------------------------------------------------------------------


def _epoch_axes(ax: Any, ylabel: str, title: str, last: int, first: int = 1) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(range(first, last + 1, max(1, (last - first) // 8 + 1)))
    ax.grid(alpha=0.3)


def _loss_axes(plt: Any, ax: Any, last: int) -> None:
    """Training loss on a log axis (it falls by an order of magnitude), with plain tick labels."""
    _epoch_axes(ax, "mean training loss over the epoch (cross-entropy)", "Training loss", last)
    ax.set_yscale("log")
    ticker = plt.matplotlib.ticker
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _save(plt: Any, fig: Any, path: Path, bottom: float = 0.0) -> None:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_head_to_head(plt: Any, h2h: dict[str, Run], path: Path) -> None:
    """Loss and accuracy per epoch of both optimizers, and their mean step time."""
    r, t = h2h["rustadam"], h2h["torch"]
    epochs = np.arange(1, len(r.loss) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    # rustadam wide and solid under torch thin and dashed: where they agree both stay visible.
    styles = [
        (r, dict(color="tab:orange", lw=3, marker="o", ms=7)),
        (t, dict(color="tab:blue", lw=1.5, ls="--", marker="x", ms=8)),
    ]
    for run, style in styles:
        axes[0].plot(epochs, run.loss, label=run.label, **style)
        axes[1].plot(epochs, [100 * a for a in run.acc], label=run.label, **style)
    worst = max(_rel_diff(a, b) for a, b in zip(r.loss, t.loss))
    _loss_axes(plt, axes[0], len(epochs))
    axes[0].legend(title=f"largest relative difference: {worst:.1e}")
    _epoch_axes(
        axes[1], "test accuracy (%)", "Test accuracy (20% of the images, held out)", len(epochs)
    )
    axes[1].legend(loc="lower right")
    means = [r.mean_step_us(), t.mean_step_us()]
    bars = axes[2].bar([r.label, t.label], means, color=["tab:orange", "tab:blue"], width=0.6)
    axes[2].bar_label(
        bars,
        labels=[
            f"mean {m:.0f} µs\n(median {run.median_step_us():.0f} µs)"
            for m, run in zip(means, (r, t))
        ],
    )
    axes[2].set_ylabel("mean time of one opt.step() (µs)")
    axes[2].set_title(f"Optimizer step time, {len(r.step_s)} steps")
    axes[2].set_ylim(0, 1.3 * max(means))
    axes[2].grid(alpha=0.3, axis="y")
    n_params = sum(p.numel() for p in r.model.parameters())
    fig.suptitle(
        f"MLP 64-{HIDDEN}-10 ({n_params} parameters) on scikit-learn digits: rustadam.Adam vs "
        "torch.optim.Adam\nthe same algorithm (rustadam with optimized_update=False; "
        f"ε = {_g(HEAD_TO_HEAD_EPS)}, lr = {LR:g} for both), same initial weights, "
        f"same batches of {BATCH_SIZE}"
    )
    _save(plt, fig, path)


def plot_update_modes(plt: Any, modes: dict[str, Run], gap: Sequence[float], path: Path) -> None:
    """optimized_update=True against False: loss, accuracy and how far apart their weights are."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    epochs = np.arange(1, len(modes["True"].loss) + 1)
    styles = [
        dict(color="tab:green", lw=3, marker="o", ms=7),
        dict(color="tab:purple", lw=1.5, ls="--", marker="x", ms=8),
    ]
    for run, style in zip(modes.values(), styles):
        axes[0].plot(epochs, run.loss, label=run.label, **style)
        axes[1].plot(epochs, [100 * a for a in run.acc], label=run.label, **style)
    _loss_axes(plt, axes[0], len(epochs))
    axes[0].legend()
    _epoch_axes(axes[1], "test accuracy (%)", "Test accuracy", len(epochs))
    axes[1].legend(loc="lower right")
    axes[2].plot(epochs, gap, color="black", marker="o")
    ylabel = "max over all weights of |θ(True) − θ(False)|"
    _epoch_axes(axes[2], ylabel, "How far apart the weights are", len(epochs))
    axes[2].set_yscale("log")
    fig.suptitle(
        "rustadam.Adam: optimized_update=True (√bc2 folded into the step size) vs False "
        "(textbook bias correction)\n"
        f"ε = {DEFAULT_EPS:g}, lr = {LR:g}, no weight decay, same initial weights and batches: "
        "the two forms differ only in float32 rounding"
    )
    _save(plt, fig, path)


def plot_weight_decay(plt: Any, decays: dict[str, Run], path: Path) -> None:
    """The three weight-decay modes against none: loss, accuracy, weight norm relative to none."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    n = len(decays["none"].loss)
    epochs = np.arange(1, n + 1)
    colors = {"none": "black", "l2": "tab:red", "decoupled": "tab:blue", "absolute": "tab:green"}
    base = decays["none"].norm
    for key, run in decays.items():
        style = dict(color=colors[key], lw=2, marker="o", ms=4, label=run.label)
        axes[0].plot(epochs, run.loss, **style)
        axes[1].plot(epochs, [100 * a for a in run.acc], **style)
        axes[2].plot(range(n + 1), [a / b for a, b in zip(run.norm, base)], **style)
    _loss_axes(plt, axes[0], n)
    _epoch_axes(axes[1], "test accuracy (%)", "Test accuracy", n)
    _epoch_axes(
        axes[2], "‖θ‖₂ / ‖θ‖₂ of the run without decay", "Weight norm, relative to no decay", n, 0
    )
    # Room below the curves for the note on L2.
    lo, hi = axes[2].get_ylim()
    axes[2].set_ylim(lo - 0.3 * (hi - lo), hi)
    axes[2].text(
        0.98,
        0.03,
        "L2: Adam divides wd·θ by √v̂ like any gradient, so weights\n"
        "whose loss gradient is 0 (pixels blank in every image)\n"
        "move by ≈ lr per step toward 0, however small wd is",
        transform=axes[2].transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        color="tab:red",
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=10)
    fig.suptitle(
        "rustadam.Adam weight-decay modes: L2 (wd·θ added to the gradient), decoupled "
        "(θ ← θ·(1 − lr·wd) per step), decoupled absolute (θ ← θ·(1 − wd) per step)\n"
        f"lr = {LR:g}, ε = {DEFAULT_EPS:g}, optimized_update=True, same initial weights and "
        "batches"
    )
    _save(plt, fig, path, bottom=0.07)


def plot_step_bound(plt: Any, run: Run, info: dict[str, float], path: Path) -> None:
    """Histogram of |Δθ| (log x) against α and the spec's bound α·(1−β1)/√(1−β2)."""
    assert run.deltas is not None
    deltas = np.concatenate(run.deltas)
    positive = deltas[deltas > 0]
    alpha, bound = info["alpha"], info["bound"]
    lo = math.floor(math.log10(positive.min()))
    hi = math.log10(max(positive.max(), bound)) + 0.15
    fig, ax = plt.subplots(figsize=(11, 5.8))
    ax.hist(positive, bins=np.logspace(lo, hi, 121), color="tab:gray", log=True)
    ax.set_xscale("log")
    ax.axvline(alpha, color="tab:blue", lw=2, ls="--", label=f"α = lr = {alpha:g}")
    ax.axvline(
        bound,
        color="tab:red",
        lw=2,
        label=f"bound α·(1−β1)/√(1−β2) = {bound:.3g}  (β1 = {BETAS[0]}, β2 = {BETAS[1]})",
    )
    ax.axvline(
        info["max"], color="black", lw=1, ls=":", label=f"largest |Δθ| seen = {info['max']:.3g}"
    )
    ax.set_xlabel("|Δθ|: how far one weight moved in one step (log scale)")
    ax.set_ylabel("number of (weight, step) pairs (log scale)")
    steps = len(run.deltas)
    ax.set_title(
        "Spec claim: with ε = 0 the Adam step Δ = α·m̂/√v̂ is bounded, "
        "|Δ| ≤ α·(1−β1)/√(1−β2) when 1−β1 > √(1−β2)\n"
        f"rustadam.Adam(lr={alpha:g}, betas={BETAS}, eps={BOUND_EPS:g}, optimized_update=False) "
        f"on the digits MLP: {steps} steps × {deltas.size // steps} weights"
    )
    ax.text(
        0.02,
        0.97,
        f"{info['le_alpha'] / info['n']:.2%} of all |Δθ| are ≤ α\n"
        f"{int(info['zeros'])} of them are exactly 0, not drawn\n"
        "(weights of always-blank pixels\nand of inactive units get g = 0)",
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox=dict(boxstyle="round", fc="white", alpha=0.9),
    )
    ax.legend(loc="upper center", fontsize=9, framealpha=0.9)
    ax.grid(alpha=0.3, which="major")
    _save(plt, fig, path)


def plot_bf16(plt: Any, runs: dict[str, Run], memory: Sequence[Memory], path: Path) -> None:
    """Pure bfloat16 with each rounding mode against float32, and the bytes each mode holds."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [3, 3, 4]})
    n = len(runs["float32"].loss)
    epochs = np.arange(1, n + 1)
    styles = {
        "float32": dict(color="black", lw=3, marker="o", ms=6),
        "nearest": dict(color="tab:red", lw=2, marker="s", ms=5),
        "stochastic": dict(color="tab:blue", lw=2, marker="^", ms=6),
        "kahan": dict(color="tab:green", lw=2.5, marker="D", ms=5),
        "kahan, release": dict(color="lime", lw=1, ls="--", marker="x", ms=7),
    }
    for key, run in runs.items():
        axes[0].plot(epochs, run.loss, label=run.label, **styles[key])
        axes[1].plot(epochs, [100 * a for a in run.acc], label=run.label, **styles[key])
    _loss_axes(plt, axes[0], n)
    axes[0].legend(fontsize=8)
    _epoch_axes(axes[1], "test accuracy (%)", "Test accuracy", n)
    axes[1].legend(loc="lower right", fontsize=8)

    ax = axes[2]
    labels = [
        m.label.replace("bfloat16, ", "bf16\n") + ("\n+ release" if m.release else "")
        for m in memory
    ]
    x = np.arange(len(memory))
    bottom = np.zeros(len(memory))
    parts = [
        ("weights θ", [m.weights for m in memory], "tab:gray"),
        ("gradients held at opt.step()", [m.grads for m in memory], "tab:orange"),
        ("optimizer state (m, v, Kahan compensation)", [m.states for m in memory], "tab:purple"),
    ]
    for name, values, color in parts:
        ax.bar(x, values, bottom=bottom, color=color, width=0.7, label=name)
        bottom += np.asarray(values)
    for xi, total in zip(x, bottom):
        ax.text(xi, total + 0.2, f"{total:.3g}", ha="center", fontsize=9)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("bytes per parameter (measured)")
    ax.set_ylim(0, 1.25 * bottom.max())
    ax.set_title("Memory per parameter, with and without gradient release")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"MLP 64-{HIDDEN}-10 on digits in pure bfloat16 (weights, inputs, gradients, m and v): "
        f"rustadam.Adam(lr={LR:g}, rounding=...) against float32\nround-to-nearest loses every "
        "update below half an ulp of its weight; stochastic rounding and Kahan summation keep "
        "them; same initial weights and batches"
    )
    _save(plt, fig, path)


# ---- entry point ---------------------------------------------------------------------------------


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rustadam.demo",
        description="Train an MLP on scikit-learn's digits with rustadam.Adam and "
        "torch.optim.Adam side by side; draw the spec's options, its step bound and "
        "pure-bfloat16 training with each rounding mode.",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=12,
        help=f"epochs of the head-to-head and the bfloat16 runs (default 12); the option and "
        f"step-bound runs use at most {BRIEF_EPOCHS}",
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split and batches")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and the rustadam core (default 1: a 9610-parameter model gains "
        "nothing from more, and on a busy machine extra threads only wait for each other)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> DemoResult:
    """Runs the demo (arguments as on the command line) and returns what it measured."""
    args = _parse(argv)
    matplotlib = _need("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    plt = _need("matplotlib.pyplot", "matplotlib")
    tqdm_mod = _need("tqdm", "tqdm")
    tqdm = tqdm_mod.tqdm if sys.stdout.isatty() else None
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = load_data(args.seed)
    brief = min(args.epochs, BRIEF_EPOCHS)
    print(
        f"rustadam demo: MLP 64-{HIDDEN}-10 on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images), batch {BATCH_SIZE}, lr {LR:g}, betas {BETAS}, "
        f"seed {args.seed}, {args.threads} thread(s)"
    )
    figures: list[Path] = []

    def save(draw: Callable[..., None], name: str, *what: Any) -> None:
        path = args.out / name
        draw(plt, *what, path)
        figures.append(path)
        print(f"wrote {path}")

    h2h = head_to_head(data, args.epochs, args.seed, args.threads, tqdm)
    save(plot_head_to_head, "head_to_head.png", h2h)
    modes, gap, decays = options(data, brief, args.seed, args.threads, tqdm)
    save(plot_update_modes, "update_modes.png", modes, gap)
    save(plot_weight_decay, "weight_decay.png", decays)
    bound_run, info = step_bound(data, brief, args.seed, args.threads, tqdm)
    save(plot_step_bound, "step_bound.png", bound_run, info)
    bf16, memory = pure_bf16(data, args.epochs, args.seed, args.threads, tqdm)
    save(plot_bf16, "bf16_rounding.png", bf16, memory)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return DemoResult(h2h, modes, gap, decays, bound_run, info, figures, bf16, memory)


if __name__ == "__main__":
    main()
