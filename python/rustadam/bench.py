"""``make bench``: the step time of rustadam against torch.optim.Adam, and the machine's limit.

Adam on the CPU is memory-bound: each step reads θ, g, m, v and writes θ, m, v, so it moves
7 · itemsize bytes per element (28 for float32, 14 for bfloat16). The benchmark times
``opt.step()`` of every contender on the same tensors and reports, per case:

- the median step time over the measured steps (after warm-up steps that also create the
  state), the min–max, and the effective bandwidth 7 · itemsize · elements / median;
- the ratio to ``torch.optim.Adam(fused=True)`` on the same tensors;
- the roofline: ``rustadam._core.plan(...).roofline`` checks the tensors as a step does and
  makes the same loads and stores as the kernel, over
  the same chunks and threads, with trivial arithmetic (θ += g, m += g, v += g). Its time is
  what the memory system allows; a contender's share of it is roofline time / contender time.

Cases: (a) one float32 tensor of 16M (2^24) elements; (b) 4,000 float32 tensors of 1,000
elements; (c) the 148 parameter tensors of GPT-2 small (124,439,808 float32 elements);
(d) one bfloat16 tensor of 16M elements; (e) one float32 tensor of 1M (2^20) elements, which
fits in the caches; (f) the demo's MLP (128×64, 128, 10×128, 10 float32).

Contenders in turn, in three rounds (``--rounds``) that each measure a third of the steps, so a
drift of the machine's memory bandwidth during the run reaches all of them; ``rustadam.Adam``
(the Rust core) and torch fused, whose ratio the targets take, run back to back in each round
(which of the two goes first alternates), so that they meet the machine in the same state.
Each contender runs on fresh copies of the same initial parameters with the same gradients
(freed before the next):
``rustadam.Adam`` with ``backend="auto"`` (the Rust core) and ``backend="torch"`` (the
per-operation torch path), and ``torch.optim.Adam`` with ``fused=True``, ``foreach=True`` and
the for-loop (``foreach=False, fused=False``). All run the
same algorithm: torch's defaults (α = 1e-3, β = (0.9, 0.999), no weight decay), ε = 1e-8, and
rustadam with ``optimized_update=False`` (the textbook form torch uses). Every contender and
the roofline use ``torch.get_num_threads()`` threads (``--threads`` sets it). A contender that
raises is reported as n/a with the reason.

Writes ``bench.md`` (the tables), ``bench.png`` (step time relative to torch fused, per case)
and ``bench.json`` (every measured time) under ``--out`` (default ``out/bench``) and prints
the tables and the paths.

Example::

    python -m rustadam.bench --cases a,b,e --steps 20 --out out/bench

matplotlib is needed here only; the library does not import it.

``--device cuda`` runs the GPU benchmark instead (:mod:`rustadam._bench_cuda`): cases (b), (c),
(d); ``rustadam.Adam`` with the Triton and foreach backends against torch fused, foreach and
for-loop and a Triton roofline kernel, timed with CUDA events; writes ``bench-cuda.md`` and
``bench-cuda.json`` under ``--out``. Without CUDA it says so and exits with code 2.

``--gradient-release`` runs :mod:`rustadam._bench_release` instead of the cases: the peak memory
and step time of ``Adam(..., gradient_release=True)`` against the usual loop on a CPU MLP with
288 MiB of gradients; writes ``bench-release.md`` and ``bench-release.json`` under ``--out``
(``python -m rustadam.bench --gradient-release --help`` lists its options).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rustadam import Adam, __version__, _core

EPS = 1e-8
# Element count from which a case is "large": the slow contenders get CAPPED_STEPS measured
# steps there (the for-loop and the per-op path take seconds per step on GPT-2 small).
LARGE_CASE = 50_000_000
CAPPED_STEPS = 3
CAPPED_WARMUP = 2
CASE_KEYS = ("a", "b", "c", "d", "e", "f")
# (f): the demo's 64-128-10 MLP, a model whose step is dominated by per-call overhead.
MLP_SHAPES = ((128, 64), (128,), (10, 128), (10,))
FUSED = "torch fused"
RUST = "rustadam (auto)"
TORCH_PATH = "rustadam (torch path)"
ROOFLINE = "roofline"
M = 1 << 20


def gpt2_shapes(
    vocab: int = 50257, n_ctx: int = 1024, d: int = 768, n_layer: int = 12
) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter tensors of GPT-2 (defaults: GPT-2 small, 148 tensors, 124,439,808 elements).

    Linear weights are stored (in, out), as in the released checkpoints.
    """
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


@dataclass(frozen=True)
class Case:
    """One benchmark case: the parameter shapes, their dtype and the default measured steps."""

    key: str
    title: str
    label: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    steps: int

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bytes_per_step(self) -> int:
        """Reads of θ, g, m, v and writes of θ, m, v: 7 · itemsize bytes per element."""
        return 7 * self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def large(self) -> bool:
        return self.numel >= LARGE_CASE


def make_cases(quick: bool = False) -> dict[str, Case]:
    """The five cases; ``quick`` shrinks every size for a smoke test, keeping the structure."""
    if quick:
        # Below torch's parallel grain (32K elements) so that a smoke test on a busy machine
        # does not wait on descheduled OpenMP threads.
        big, many, cache = 1 << 14, (50, 100), 1 << 12
        gpt2 = gpt2_shapes(vocab=256, n_ctx=32, d=16, n_layer=2)
        steps = {k: 3 for k in CASE_KEYS}
    else:
        big, many, cache = 16 * M, (4000, 1000), 1 * M
        gpt2 = gpt2_shapes()
        steps = {"a": 20, "b": 20, "c": 10, "d": 20, "e": 50, "f": 200}
    n_t, n_el = many
    return {
        "a": Case("a", f"one float32 tensor of {_count(big)} elements", f"(a) {_count(big)} fp32",
                  ((big,),), torch.float32, steps["a"]),
        "b": Case("b", f"{n_t:,} float32 tensors of {n_el:,} elements",
                  f"(b) {n_t:,}×{n_el:,} fp32", ((n_el,),) * n_t, torch.float32, steps["b"]),
        "c": Case("c", f"GPT-2{' (shrunk)' if quick else ' small'}: {len(gpt2)} float32 tensors",
                  "(c) GPT-2 small" if not quick else "(c) GPT-2 (shrunk)",
                  tuple(s for _, s in gpt2), torch.float32, steps["c"]),
        "d": Case("d", f"one bfloat16 tensor of {_count(big)} elements", f"(d) {_count(big)} bf16",
                  ((big,),), torch.bfloat16, steps["d"]),
        "e": Case("e", f"one float32 tensor of {_count(cache)} elements (in cache)",
                  f"(e) {_count(cache)} fp32", ((cache,),), torch.float32, steps["e"]),
        "f": Case("f", "small model: the MLP shapes (128×64, 128, 10×128, 10)", "(f) MLP",
                  MLP_SHAPES, torch.float32, steps["f"]),
    }  # fmt: skip


def _count(n: int) -> str:
    if n % M == 0:
        return f"{n // M}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


@dataclass
class Contender:
    """A named optimizer factory; ``slow`` ones get capped steps on large cases."""

    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    slow: bool = False


def contenders(threads: int) -> list[Contender]:
    """The five contenders, all the same algorithm (torch's defaults with ε = 1e-8)."""

    def rust(backend: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda ps: Adam(
            ps, eps=EPS, optimized_update=False, backend=backend, num_threads=threads
        )

    return [
        Contender(RUST, rust("auto")),
        Contender(TORCH_PATH, rust("torch"), slow=True),
        Contender(FUSED, lambda ps: torch.optim.Adam(ps, eps=EPS, fused=True)),
        Contender("torch foreach", lambda ps: torch.optim.Adam(ps, eps=EPS, foreach=True)),
        Contender(
            "torch for-loop",
            lambda ps: torch.optim.Adam(ps, eps=EPS, foreach=False, fused=False),
            slow=True,
        ),
    ]


@dataclass
class Result:
    """The measured step times (seconds) of one contender on one case, or why there are none."""

    name: str
    times: list[float] = field(default_factory=list)
    warmup: int = 0
    capped: bool = False
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.ok else math.nan


@dataclass
class CaseResult:
    case: Case
    results: list[Result]

    def get(self, name: str) -> Optional[Result]:
        r = next((r for r in self.results if r.name == name), None)
        return r if r is not None and r.ok else None

    def ratio(self, name: str, to: str = FUSED) -> float:
        """``name``'s median time over ``to``'s, NaN where either is missing."""
        a, b = self.get(name), self.get(to)
        return a.median / b.median if a and b else math.nan


def _time_steps(step: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    # A collection in the middle of a step would be charged to it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def measure_roofline(
    p0: list[torch.Tensor],
    grads: list[torch.Tensor],
    threads: int,
    warmup: int,
    steps: int,
    collect: bool = True,
) -> Result:
    """Times the core's roofline (``Plan.roofline``) on copies of the params and zero moments."""
    res = Result(ROOFLINE, warmup=warmup)
    try:
        ps = [p.clone() for p in p0]
        ms = [torch.zeros_like(p) for p in p0]
        vs = [torch.zeros_like(p) for p in p0]
        group = [(_core.Config(), ps, grads, ms, vs, None, None, [1] * len(ps), [0] * len(ps))]
        # A checked plan per call, as every optimizer step makes one.
        res.times = _time_steps(
            lambda: _core.plan(group, strict=True).roofline(num_threads=threads), warmup, steps
        )
    except Exception as e:
        res.error = _reason(e)
    finally:
        ps = ms = vs = []
        if collect:
            gc.collect()
    return res


def measure(
    contender: Contender,
    p0: list[torch.Tensor],
    grads: list[torch.Tensor],
    warmup: int,
    steps: int,
    capped: bool,
    collect: bool = True,
) -> Result:
    """Times ``opt.step()`` of one contender on fresh copies of ``p0`` with gradients ``grads``.

    Checks the step changed the parameters, so a contender that silently skips them cannot
    post a time.
    """
    res = Result(contender.name, warmup=warmup, capped=capped)
    params: list[torch.Tensor] = []
    opt: Optional[torch.optim.Optimizer] = None
    try:
        for p, g in zip(p0, grads):
            q = p.clone().requires_grad_(True)
            q.grad = g
            params.append(q)
        opt = contender.make(params)
        res.times = _time_steps(opt.step, warmup, steps)
        with torch.no_grad():
            still = [i for i in {0, len(params) - 1} if torch.equal(params[i], p0[i])]
        if still:
            res.times = []
            res.error = f"the step left parameter {still[0]} unchanged"
    except Exception as e:
        res.times = []
        res.error = _reason(e)
    finally:
        del opt, params
        # The tensors go with their last reference; a collection (half a second with torch
        # loaded) also frees any cycle holding them, which matters only for large cases.
        if collect:
            gc.collect()
    return res


def _round_order(entries: list[Contender], rnd: int) -> list[Contender]:
    """The contenders in the order round ``rnd`` measures them: rustadam (auto) and torch
    fused first, back to back, each leading in every other round; then the rest as listed."""
    pair = [c for c in entries if c.name in (RUST, FUSED)]
    if rnd % 2:
        pair.reverse()
    return pair + [c for c in entries if c.name not in (RUST, FUSED)]


def run_case(
    case: Case,
    threads: int,
    steps: Optional[int],
    warmup: int,
    entries: Optional[list[Contender]] = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    rounds: int = 3,
) -> CaseResult:
    """Measures the roofline and every contender on one case.

    The measured steps are split over ``rounds`` passes through all contenders (each pass sets a
    contender up afresh and warms it up), so a drift in the machine's memory bandwidth or load
    during the run reaches every contender alike instead of whichever ran at the time.
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(s, generator=gen).to(case.dtype) for s in case.shapes]
    grads = [torch.randn(s, generator=gen).to(case.dtype) for s in case.shapes]
    n = case.steps if steps is None else steps
    collect = case.numel >= M
    entries = contenders(threads) if entries is None else entries
    rounds = max(1, rounds)
    merged: dict[str, Result] = {}

    def add(r: Result) -> None:
        m = merged.setdefault(r.name, Result(r.name, warmup=r.warmup, capped=r.capped))
        m.times.extend(r.times)
        m.error = m.error or r.error

    for rnd in range(rounds):
        # Round r measures its share of the steps; the rounds together measure them all.
        def share(total: int, rnd: int = rnd) -> int:
            return total // rounds + (1 if rnd < total % rounds else 0)

        if share(n):
            log(f"({case.key}) roofline, round {rnd + 1}/{rounds}")
            add(measure_roofline(p0, grads, threads, warmup, share(n), collect))
        for c in _round_order(entries, rnd):
            capped = c.slow and case.large
            total = min(n, CAPPED_STEPS) if capped else n
            if not share(total):
                continue
            log(f"({case.key}) {c.name}, round {rnd + 1}/{rounds}")
            add(
                measure(
                    c,
                    p0,
                    grads,
                    min(warmup, CAPPED_WARMUP) if capped else warmup,
                    share(total),
                    capped,
                    collect,
                )
            )
    results = [merged[ROOFLINE]] + [merged[c.name] for c in entries]
    for r in results:
        if r.error is not None:
            r.times = []
    del p0, grads
    if collect:
        gc.collect()
    return CaseResult(case, results)


# ---- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A performance goal for rustadam (auto) on one case, checked against the same run."""

    case: str
    # "vs_fused": time ratio ≤ bound; "roofline": share ≥ bound; "vs_torch_path": speed-up ≥ bound.
    kind: str
    bound: float

    @property
    def text(self) -> str:
        if self.kind == "vs_fused":
            return f"({self.case}) rustadam ≤ {self.bound:g}× torch fused time"
        if self.kind == "roofline":
            return f"({self.case}) rustadam ≥ {self.bound:.0%} of the roofline"
        return f"({self.case}) rustadam ≥ {self.bound:g}× faster than its per-op torch path"

    def value(self, cr: CaseResult) -> float:
        if self.kind == "vs_fused":
            return cr.ratio(RUST, FUSED)
        if self.kind == "roofline":
            return cr.ratio(ROOFLINE, RUST)
        return cr.ratio(TORCH_PATH, RUST)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.kind == "vs_fused" else value >= self.bound

    def show(self, value: float) -> str:
        return _share(value) if self.kind == "roofline" else f"{_ratio(value)}×"


# (a) and (c) are memory-bound: within 3 % of torch fused, which runs at the roofline too.
TARGETS = (
    Target("a", "vs_fused", 1.03),
    Target("a", "roofline", 0.90),
    Target("a", "vs_torch_path", 6.0),
    Target("b", "vs_fused", 0.45),
    Target("b", "vs_torch_path", 10.0),
    Target("c", "vs_fused", 1.03),
    Target("d", "vs_fused", 0.7),
    Target("e", "vs_fused", 1.0),
    Target("f", "vs_fused", 0.5),
)


def target_rows(done: dict[str, CaseResult]) -> list[tuple[str, str, str]]:
    """(target, measured, pass/miss/n/a/not run) for every target."""
    rows = []
    for t in TARGETS:
        cr = done.get(t.case)
        if cr is None:
            rows.append((t.text, "", "not run"))
            continue
        v = t.value(cr)
        if math.isnan(v):
            rows.append((t.text, "n/a", "n/a"))
        else:
            rows.append((t.text, t.show(v), "pass" if t.met(v) else "miss"))
    return rows


# ---- reporting ----------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, logical CPUs, torch and rustadam versions, SIMD level, threads, date."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rustadam": __version__,
        "simd": _core.simd_levels()[-1],
        "threads": threads,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_start": _load(),
        "load_end": None,
    }


def _load() -> Optional[float]:
    """The 1-minute load average, where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {info['os']}; torch {info['torch']}, "
        f"rustadam {info['rustadam']} (SIMD {info['simd']}), {info['threads']} threads "
        f"(torch.get_num_threads(), for every contender and the roofline); {info['date']}"
    )


def _ratio(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _share(v: float) -> str:
    return f"{v:.0%}" if v >= 0.1 else f"{v:.1%}"


def _ms(t: float) -> str:
    ms = t * 1e3
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


HEADER = ("contender", "median ms", "min–max ms", "steps", "GB/s", "× fused", "% roofline")


def case_rows(cr: CaseResult) -> list[tuple[str, ...]]:
    """One row per contender (the roofline first), formatted for the tables."""
    rows = []
    roof = cr.get(ROOFLINE)
    for r in cr.results:
        if not r.ok:
            rows.append((r.name, "n/a", r.error or "no time", "", "", "", ""))
            continue
        med = r.median
        rows.append(
            (
                r.name,
                _ms(med),
                f"{_ms(min(r.times))}–{_ms(max(r.times))}",
                f"{len(r.times)}{'†' if r.capped else ''}",
                f"{cr.case.bytes_per_step / med / 1e9:.1f}",
                _ratio(cr.ratio(r.name)) if cr.get(FUSED) else "n/a",
                _share(roof.median / med) if roof else "n/a",
            )
        )
    return rows


def case_heading(cr: CaseResult) -> str:
    c = cr.case
    return (
        f"({c.key}) {c.title}: {c.numel:,} elements in {len(c.shapes):,} "
        f"tensor{'s' if len(c.shapes) > 1 else ''}, "
        f"{c.bytes_per_step / 1e6:,.1f} MB moved per step"
    )


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [str(x).ljust(w) if j == 0 else str(x).rjust(w) for j, (x, w) in enumerate(
            zip(row, widths))]  # fmt: skip
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def notes(done: Sequence[CaseResult], warmup: int, info: dict[str, Any]) -> list[str]:
    out = [
        f"Median over the measured steps, after {warmup} warm-up steps that also create the "
        "state. GB/s = 7 · itemsize · elements / median (reads θ, g, m, v; writes θ, m, v). "
        "× fused = median / torch fused median (lower is faster). % roofline = roofline median "
        "/ contender median, the roofline being the core's loop with the same loads, stores, "
        "chunks and threads and trivial arithmetic.",
        "Same algorithm for all: α = 1e-3, β = (0.9, 0.999), ε = 1e-8, no weight decay; "
        "rustadam with optimized_update=False.",
    ]
    loads = [x for x in (info.get("load_start"), info.get("load_end")) if x is not None]
    if loads:
        busy = max(loads) > (info.get("logical_cpus") or 1)
        out.append(
            f"Load average (1 min): {info.get('load_start')} at the start, "
            f"{info.get('load_end')} at the end"
            + (
                f", above the {info.get('logical_cpus')} logical CPUs: other processes "
                "competed for the cores, so the times are noisy (a parallel region waits for "
                "its slowest thread)."
                if busy
                else "."
            )
        )
    over = [
        f"({cr.case.key}) {r.name}"
        for cr in done
        for r in cr.results
        if r.name != ROOFLINE and cr.ratio(ROOFLINE, r.name) > 1.0
    ]
    if over:
        out.append(
            f"Above 100% of the roofline: {', '.join(over)}. The roofline and the contenders "
            "take turns, so a change in the machine's load between turns shows up in the "
            "share."
        )
    if any(r.capped for cr in done for r in cr.results):
        out.append(
            f"† slow contender on a large case: {CAPPED_STEPS} measured steps after "
            f"{CAPPED_WARMUP} warm-up steps."
        )
    return out


def plot(done: Sequence[CaseResult], info: dict[str, Any], path: Path) -> None:
    """Grouped bars per case: each contender's median step time relative to torch fused."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = [r.name for r in done[0].results] if done else []
    colors = dict(
        zip(names, ("#9e9e9e", "#d95f02", "#fdae6b", "#1b9e77", "#7570b3", "#e7298a", "#66a61e"))
    )
    fig = Figure(figsize=(max(7.0, 2.2 * len(done) + 2), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    tops = [1.0]
    for ci, cr in enumerate(done):
        fused = cr.get(FUSED)
        if fused is None:
            ax.text(ci, 1.0, "torch fused n/a", ha="center", va="bottom", fontsize=8)
            continue
        for ni, name in enumerate(names):
            x = ci - 0.4 + width * (ni + 0.5)
            r = cr.get(name)
            if r is None:
                ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            v = r.median / fused.median
            tops.append(v)
            ax.bar(x, v, width, color=colors[name], label=name if ci == 0 else None)
            mark = "†" if r.capped else ""
            shown = f"{v:.0f}" if v >= 10 else f"{v:.2g}"
            ax.text(x, v * 1.04, f"{shown}{mark}", ha="center", va="bottom", fontsize=7)
            if name == RUST:
                for t in TARGETS:
                    if t.case == cr.case.key and t.kind == "vs_fused":
                        ax.hlines(t.bound, x - 0.7 * width, x + 0.7 * width, colors="black",
                                  linestyles="--", linewidth=1.6)  # fmt: skip
    ax.axhline(1.0, color="#444444", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(min(0.8 * min(tops), 0.5), max(tops) * 2.5)
    ax.set_xticks(range(len(done)), [cr.case.label for cr in done])
    ax.set_ylabel("step time ÷ torch fused step time (log scale)")
    ax.set_title(
        "Adam step time on the CPU relative to torch.optim.Adam(fused=True); lower is faster\n"
        f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
        f"rustadam SIMD {info['simd']}, {info['date']}",
        fontsize=10,
    )
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.6))
    labels.append(f"target for {RUST}")
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=4)
    if any(r.capped for cr in done for r in cr.results):
        ax.set_xlabel(
            f"† {CAPPED_STEPS} measured steps (slow contender, large case)", fontsize=7, loc="right"
        )
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.savefig(path, dpi=120)


def write_outputs(
    done: Sequence[CaseResult], info: dict[str, Any], warmup: int, command: str, out: Path
) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, png, js = out / "bench.md", out / "bench.png", out / "bench.json"
    plot(done, info, png)
    parts = [
        "# rustadam benchmark: Adam step time on the CPU",
        "",
        f"Machine: {machine_line(info)}",
        "",
        f"Command: `{command}`",
        "",
        f"![Step time relative to torch fused]({png.name})",
        "",
    ]
    for cr in done:
        parts += [f"## {case_heading(cr)}", "", md_table(HEADER, case_rows(cr)), ""]
    parts += [
        "## Targets",
        "",
        md_table(("target", "measured", ""), target_rows(_by_key(done))),
        "",
    ]
    parts += [f"- {n}" for n in notes(done, warmup, info)]
    md.write_text("\n".join(parts) + "\n", encoding="utf-8")
    raw = {
        "machine": info,
        "command": command,
        "cases": [
            {
                "key": cr.case.key,
                "title": cr.case.title,
                "elements": cr.case.numel,
                "tensors": len(cr.case.shapes),
                "dtype": str(cr.case.dtype).replace("torch.", ""),
                "bytes_per_step": cr.case.bytes_per_step,
                "results": [
                    {
                        "name": r.name,
                        "times_s": r.times,
                        "median_s": r.median if r.ok else None,
                        "warmup": r.warmup,
                        "capped": r.capped,
                        "error": r.error,
                    }
                    for r in cr.results
                ],
            }
            for cr in done
        ],
        "targets": [
            {"target": t, "measured": v, "result": s} for t, v, s in target_rows(_by_key(done))
        ],
    }
    js.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    return md, png, js


def _by_key(done: Sequence[CaseResult]) -> dict[str, CaseResult]:
    return {cr.case.key: cr for cr in done}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m rustadam.bench", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): the Rust core against torch on the CPU; cuda: rustadam's Triton "
        "and foreach backends against torch on a CUDA GPU, cases b,c,d (exit code 2 without CUDA)",
    )
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated, from a,b,c,d,e,f (--device cuda: from b,c,d); default all",
    )
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default per case)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per round (default 3)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes through all contenders, each measuring its share of the steps (default 3)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 steps (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")
    ap.add_argument(
        "--gradient-release",
        action="store_true",
        help="measure Adam(gradient_release=True) against the usual loop instead (its own "
        "options: --gradient-release --help)",
    )
    args = ap.parse_args(argv)
    allowed = CASE_KEYS
    if args.device == "cuda":
        from rustadam import _bench_cuda

        allowed = _bench_cuda.CASE_KEYS
    if args.cases is None:
        args.cases = ",".join(allowed)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    bad = [k for k in keys if k not in allowed]
    if bad or not keys:
        ap.error(
            f"--cases: unknown case(s) {bad or args.cases!r}; expected some of "
            f"{','.join(allowed)}" + (" with --device cuda" if args.device == "cuda" else "")
        )
    args.cases = list(dict.fromkeys(keys))
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 1:
        ap.error(f"--warmup must be >= 1 (the first step creates the state), got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.quick:
        args.warmup = min(args.warmup, 1)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the chosen cases, prints the tables and writes the markdown, PNG and JSON files."""
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--gradient-release" in rest:
        from rustadam import _bench_release

        return _bench_release.main([a for a in rest if a != "--gradient-release"])
    args = parse_args(argv)
    command = "python -m rustadam.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        from rustadam import _bench_cuda

        return _bench_cuda.main(args, command.strip())
    threads = torch.get_num_threads()
    info = machine_info(threads)
    print(f"rustadam benchmark — {machine_line(info)}", flush=True)
    print(f"command: {command.strip()}\n", flush=True)
    cases = make_cases(args.quick)
    done = []
    for key in args.cases:
        cr = run_case(
            cases[key],
            threads,
            args.steps,
            args.warmup,
            log=lambda s: print(f"  measuring {s} ...", file=sys.stderr, flush=True),
            rounds=args.rounds,
        )
        done.append(cr)
        print(case_heading(cr), flush=True)
        print(text_table(HEADER, case_rows(cr)) + "\n", flush=True)
    print("Targets (same run):")
    print(text_table(("target", "measured", ""), target_rows(_by_key(done))) + "\n")
    info["load_end"] = _load()
    for n in notes(done, args.warmup, info):
        print(f"- {n}")
    md, png, js = write_outputs(done, info, args.warmup, command.strip(), args.out)
    print(f"\nwrote {md}\nwrote {png}\nwrote {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
