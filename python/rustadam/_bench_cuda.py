# ruff: noqa: ANN001  (triton reads annotations of @triton.jit arguments as their types)
"""``python -m rustadam.bench --device cuda``: the Adam step on a CUDA GPU.

Cases (shapes from :func:`rustadam.bench.make_cases`): (b) 4,000 float32 tensors of 1,000
elements, (c) the 148 tensors of GPT-2 small (124M float32 elements), (d) one bfloat16 tensor
of 16M elements.

Contenders, all the same algorithm as the CPU benchmark (α = 1e-3, β = (0.9, 0.999),
ε = 1e-8, no weight decay; rustadam with ``optimized_update=False``):
``rustadam.Adam(backend="triton")`` (one Triton launch per (device, dtype) over a pointer
table), ``rustadam.Adam(backend="foreach")`` (torch foreach ops), and ``torch.optim.Adam``
with ``fused=True``, ``foreach=True`` and the for-loop.

Roofline: a Triton kernel with the real kernel's structure — a device pointer table (θ, g, m, v,
numel per tensor), a prefix sum of block counts, one 1-D grid over the blocks of all tensors
(BLOCK = 1024) found by binary search, **one launch per step for every case**, the single-tensor
case (d) included — with the same loads and stores (reads θ, g, m, v; writes θ, m, v) and
trivial arithmetic (θ += g, m += g, v += g in float32). Its table is built once, outside the
timed steps: it is what the memory system allows this kernel shape, without host work.

Timing: each contender in turn, in ``--rounds`` rounds that each set it up afresh on copies of
the same initial parameters and gradients, run ``--warmup`` steps (Triton compiles there), then
its share of the measured steps back to back, each between two CUDA events; the device is
synchronised before the first and after the last event only. The median of the event times is
reported, and, as *host ms*, the median wall time the host spent inside ``step()`` (launch
overhead; a step whose host ms reaches its device ms is bound by the host).

The harness itself (rounds, medians, tables, targets, files) is device-agnostic and takes the
timer as an argument, so the tests run it on CPU tensors with a wall-clock timer under
``TRITON_INTERPRET=1``.

``import rustadam._bench_cuda`` does not import triton.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rustadam import Adam, __version__, bench
from rustadam.bench import EPS, Case, Contender, _ms, _ratio, _reason, _share, md_table, text_table

CASE_KEYS = ("b", "c", "d")
# Measured steps per case (divisible by the default 3 rounds).
STEPS = {"b": 30, "c": 60, "d": 90}
TRITON = "rustadam (triton)"
FOREACH = "rustadam (foreach)"
FUSED = bench.FUSED
ROOFLINE = bench.ROOFLINE
BLOCK = 1024
# Elements of the first and last parameter compared with torch fused after the first round.
SAMPLE = 4096
NO_CUDA_EXIT = 2

# A timer runs ``warmup`` untimed steps, then ``steps`` timed ones; returns (device seconds,
# host seconds) per timed step.
Timer = Callable[[Callable[[], Any], int, int], tuple[list[float], list[float]]]


# ---- timers --------------------------------------------------------------------------------------


def cuda_timer(step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """CUDA-event time of each step, the steps back to back; host time inside ``step()``."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(steps)
    ]
    host = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for start, end in events:
            start.record()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            end.record()
        torch.cuda.synchronize()
    finally:
        if gc_was_enabled:
            gc.enable()
    return [s.elapsed_time(e) / 1e3 for s, e in events], host


def wall_timer(step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Wall-clock time of each step, for CPU tensors (tests); host time is the same."""
    times = bench._time_steps(step, warmup, steps)
    return times, list(times)


# ---- results -------------------------------------------------------------------------------------


@dataclass
class GpuResult(bench.Result):
    """A contender's device times, plus host times and its difference from torch fused."""

    host: list[float] = field(default_factory=list)
    # max |θ − θ_fused| over the sampled elements after the first round (None: not compared).
    delta: Optional[float] = None

    @property
    def host_median(self) -> float:
        return statistics.median(self.host) if self.ok and self.host else math.nan


def _sample(params: Sequence[torch.Tensor]) -> torch.Tensor:
    ends = [params[0], params[-1]] if len(params) > 1 else [params[0]]
    return torch.cat([p.detach().reshape(-1)[:SAMPLE].float().cpu() for p in ends])


def measure(
    contender: Contender,
    p0: list[torch.Tensor],
    grads: list[torch.Tensor],
    warmup: int,
    steps: int,
    timer: Timer,
) -> tuple[GpuResult, Optional[torch.Tensor]]:
    """Times ``opt.step()`` of one contender on fresh copies of ``p0`` with gradients ``grads``.

    Returns the result and a sample of the final parameters. A contender that raises is n/a
    with the reason; one that leaves the parameters unchanged is n/a too.
    """
    res = GpuResult(contender.name, warmup=warmup)
    sample = None
    params: list[torch.Tensor] = []
    opt: Optional[torch.optim.Optimizer] = None
    try:
        for p, g in zip(p0, grads):
            q = p.clone().requires_grad_(True)
            q.grad = g
            params.append(q)
        opt = contender.make(params)
        res.times, res.host = timer(opt.step, warmup, steps)
        with torch.no_grad():
            still = [i for i in {0, len(params) - 1} if torch.equal(params[i], p0[i])]
        if still:
            res.times, res.host = [], []
            res.error = f"the step left parameter {still[0]} unchanged"
        else:
            sample = _sample(params)
    except Exception as e:
        res.times, res.host = [], []
        res.error = _reason(e)
    finally:
        del opt, params
    return res, sample


# ---- the roofline kernel -------------------------------------------------------------------------

_JIT_MODULE = "rustadam._bench_cuda_jit"
_E_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


@functools.cache
def _roofline_kernel() -> Any:
    """The jitted roofline kernel: this file loaded again under a name whose block defines it."""
    mod = sys.modules.get(_JIT_MODULE)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_JIT_MODULE, __file__)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_JIT_MODULE] = mod
        spec.loader.exec_module(mod)
    return mod._roofline


def roofline_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
) -> Callable[[], None]:
    """A step function launching the roofline kernel once over all the (same-dtype) tensors.

    The pointer table and block prefix sum are built here, once; the step only launches.
    """
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _E_KIND:
        raise TypeError(f"roofline: one supported dtype expected, got {sorted(map(str, dtypes))}")
    for ts in (params, grads, exp_avgs, exp_avg_sqs):
        if not all(t.is_contiguous() for t in ts):
            raise ValueError("roofline: contiguous tensors expected")
    rows = [
        [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel()]
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)
    ]
    starts_l = [0]
    for p in params:
        starts_l.append(starts_l[-1] + math.ceil(p.numel() / BLOCK))
    device = params[0].device
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    starts = torch.tensor(starts_l, dtype=torch.int32).to(device)
    n, nb = len(rows), starts_l[-1]
    kernel = _roofline_kernel()
    e_kind = _E_KIND[params[0].dtype]
    search = max(1, math.ceil(math.log2(n + 1)))
    keep = (params, grads, exp_avgs, exp_avg_sqs)

    def step() -> None:
        assert keep  # the table's addresses stay valid while the step exists
        kernel[(nb,)](table, starts, n, E_KIND=e_kind, SEARCH_STEPS=search, BLOCK=BLOCK)

    return step


def measure_roofline(
    p0: list[torch.Tensor], grads: list[torch.Tensor], warmup: int, steps: int, timer: Timer
) -> GpuResult:
    res = GpuResult(ROOFLINE, warmup=warmup)
    try:
        ps = [p.clone() for p in p0]
        ms = [torch.zeros_like(p) for p in p0]
        vs = [torch.zeros_like(p) for p in p0]
        res.times, res.host = timer(roofline_step(ps, grads, ms, vs), warmup, steps)
        if torch.equal(ps[0], p0[0]):
            res.times, res.host = [], []
            res.error = "the roofline kernel left the parameters unchanged"
    except Exception as e:
        res.times, res.host = [], []
        res.error = _reason(e)
    return res


# ---- cases, contenders, rounds -------------------------------------------------------------------


def make_cases(quick: bool = False) -> dict[str, Case]:
    """The CPU benchmark's cases (b), (c), (d) with the GPU's measured steps."""
    cases = bench.make_cases(quick)
    return {k: dataclasses.replace(cases[k], steps=3 if quick else STEPS[k]) for k in CASE_KEYS}


def contenders() -> list[Contender]:
    """The five contenders, all the same algorithm (torch's defaults with ε = 1e-8)."""

    def rust(backend: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda ps: Adam(ps, eps=EPS, optimized_update=False, backend=backend)

    return [
        Contender(TRITON, rust("triton")),
        Contender(FOREACH, rust("foreach")),
        Contender(FUSED, lambda ps: torch.optim.Adam(ps, eps=EPS, fused=True)),
        Contender("torch foreach", lambda ps: torch.optim.Adam(ps, eps=EPS, foreach=True)),
        Contender(
            "torch for-loop", lambda ps: torch.optim.Adam(ps, eps=EPS, foreach=False, fused=False)
        ),
    ]


def run_case(
    case: Case,
    device: torch.device,
    timer: Timer,
    steps: Optional[int] = None,
    warmup: int = 3,
    rounds: int = 3,
    entries: Optional[list[Contender]] = None,
    roofline: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> bench.CaseResult:
    """The roofline and every contender on one case, in ``rounds`` alternating rounds."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(s: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(s, generator=gen, device=device).to(case.dtype)

    p0 = [randn(s) for s in case.shapes]
    grads = [randn(s) for s in case.shapes]
    n = case.steps if steps is None else steps
    entries = contenders() if entries is None else entries
    rounds = max(1, rounds)
    merged: dict[str, GpuResult] = {}
    samples: dict[str, torch.Tensor] = {}

    def add(r: GpuResult) -> None:
        m = merged.setdefault(r.name, GpuResult(r.name, warmup=r.warmup))
        m.times.extend(r.times)
        m.host.extend(r.host)
        m.error = m.error or r.error

    for rnd in range(rounds):
        share = n // rounds + (1 if rnd < n % rounds else 0)
        if not share:
            continue
        if roofline:
            log(f"({case.key}) {ROOFLINE}, round {rnd + 1}/{rounds}")
            add(measure_roofline(p0, grads, warmup, share, timer))
        for c in entries:
            log(f"({case.key}) {c.name}, round {rnd + 1}/{rounds}")
            r, sample = measure(c, p0, grads, warmup, share, timer)
            add(r)
            # Every contender made the same number of steps in round 1: compare them there.
            if rnd == 0 and sample is not None:
                samples[c.name] = sample
        _free(device)
    results = ([merged[ROOFLINE]] if roofline else []) + [merged[c.name] for c in entries]
    ref = samples.get(FUSED)
    for r in results:
        if r.error is not None:
            r.times, r.host = [], []
        elif ref is not None and r.name in samples:
            r.delta = float((samples[r.name] - ref).abs().max())
    del p0, grads
    _free(device)
    return bench.CaseResult(case, list(results))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- targets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal for rustadam (triton): time ≤ bound × fused, or share of the roofline ≥ bound."""

    case: str
    kind: str  # "vs_fused" or "roofline"
    bound: float
    name: str = TRITON

    @property
    def text(self) -> str:
        if self.kind == "vs_fused":
            return f"({self.case}) {self.name} ≤ {self.bound:g}× torch fused time"
        return f"({self.case}) {self.name} ≥ {self.bound:.0%} of the roofline"

    def value(self, cr: bench.CaseResult) -> float:
        if self.kind == "vs_fused":
            return cr.ratio(self.name, FUSED)
        return cr.ratio(ROOFLINE, self.name)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.kind == "vs_fused" else value >= self.bound

    def show(self, value: float) -> str:
        return _share(value) if self.kind == "roofline" else f"{_ratio(value)}×"


TARGETS = (
    Target("c", "vs_fused", 1.0),
    Target("b", "vs_fused", 0.5),
    Target("c", "roofline", 0.85),
    Target("d", "roofline", 0.85),
)


def target_rows(done: dict[str, bench.CaseResult]) -> list[tuple[str, str, str]]:
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


# ---- reporting -----------------------------------------------------------------------------------

HEADER = (
    "contender",
    "median ms",
    "min–max ms",
    "host ms",
    "steps",
    "GB/s",
    "× fused",
    "% roofline",
    "max abs Δθ vs fused",
)


def case_rows(cr: bench.CaseResult) -> list[tuple[str, ...]]:
    rows = []
    roof = cr.get(ROOFLINE)
    for r in cr.results:
        if not r.ok:
            rows.append((r.name, "n/a", r.error or "no time", "", "", "", "", "", ""))
            continue
        med = r.median
        host = getattr(r, "host_median", math.nan)
        delta = getattr(r, "delta", None)
        rows.append(
            (
                r.name,
                _ms(med),
                f"{_ms(min(r.times))}–{_ms(max(r.times))}",
                "" if math.isnan(host) else _ms(host),
                str(len(r.times)),
                f"{cr.case.bytes_per_step / med / 1e9:.1f}",
                _ratio(cr.ratio(r.name)) if cr.get(FUSED) else "n/a",
                _share(roof.median / med) if roof else "n/a",
                "" if delta is None else f"{delta:.1e}",
            )
        )
    return rows


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU, driver-side versions, torch, triton and rustadam versions, date."""
    info: dict[str, Any] = {
        "device": str(device),
        "gpu": None,
        "capability": None,
        "gpu_memory_gib": None,
        "sms": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": None,
        "rustadam": __version__,
        "python": platform.python_version(),
        "host": f"{platform.node()} ({platform.machine()})",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover - reported, not fatal
        info["triton"] = f"unavailable ({_reason(e)})"
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(
            gpu=prop.name,
            capability=f"{prop.major}.{prop.minor}",
            gpu_memory_gib=round(prop.total_memory / 2**30, 1),
            sms=prop.multi_processor_count,
        )
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = (
        f"{info['gpu']} (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
        f"{info['gpu_memory_gib']} GiB)"
        if info["gpu"]
        else f"no GPU: {info['device']} tensors"
    )
    return (
        f"{gpu}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, "
        f"rustadam {info['rustadam']}, Python {info['python']}; {info['date']}"
    )


def notes(warmup: int, rounds: int, timer_name: str) -> list[str]:
    return [
        f"Median over the measured steps ({timer_name}); each contender set up afresh in each "
        f"of {rounds} alternating round(s), after {warmup} warm-up step(s) per round (Triton "
        "compiles in the first). host ms = median wall time inside step() (launch overhead; "
        "near the device time, the step is bound by the host). GB/s = 7 · itemsize · "
        "elements / median. × fused = median / torch fused median (lower is faster). "
        "% roofline = roofline median / contender median.",
        "Roofline: a Triton kernel with the real kernel's pointer table, block prefix sum and "
        f"binary search (BLOCK = {BLOCK}), one launch per step for every case (also the "
        "single-tensor case), reading θ, g, m, v and writing θ, m, v with trivial arithmetic; "
        "its table is built once, outside the timed steps.",
        "max abs Δθ vs fused: over the first and last parameter's first "
        f"{SAMPLE} elements, after the first round (same steps for all contenders).",
        "Same algorithm for all: α = 1e-3, β = (0.9, 0.999), ε = 1e-8, no weight decay; "
        "rustadam with optimized_update=False. The steps run back to back on the same "
        "tensors, so a case whose tensors fit in the L2 cache (b: 64 MB of θ, g, m, v) is "
        "partly served from it, for every contender and the roofline alike.",
    ]


def case_heading(cr: bench.CaseResult) -> str:
    return bench.case_heading(cr)


def write_outputs(
    done: Sequence[bench.CaseResult],
    info: dict[str, Any],
    note_lines: Sequence[str],
    command: str,
    out: Path,
) -> tuple[Path, Path]:
    """Writes ``bench-cuda.md`` and ``bench-cuda.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "bench-cuda.md", out / "bench-cuda.json"
    by_key = {cr.case.key: cr for cr in done}
    parts = [
        "# rustadam benchmark: Adam step time on a GPU",
        "",
        f"Machine: {machine_line(info)}",
        "",
        f"Command: `{command}`",
        "",
    ]
    for cr in done:
        parts += [f"## {case_heading(cr)}", "", md_table(HEADER, case_rows(cr)), ""]
    parts += ["## Targets", "", md_table(("target", "measured", ""), target_rows(by_key)), ""]
    parts += [f"- {n}" for n in note_lines]
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
                        "host_times_s": getattr(r, "host", []),
                        "host_median_s": r.host_median if r.ok else None,  # type: ignore[attr-defined]
                        "max_abs_delta_vs_fused": getattr(r, "delta", None),
                        "ratio_to_fused": _finite(cr.ratio(r.name)),
                        "share_of_roofline": _finite(cr.ratio(ROOFLINE, r.name)),
                        "warmup": r.warmup,
                        "error": r.error,
                    }
                    for r in cr.results
                ],
            }
            for cr in done
        ],
        "targets": [{"target": t, "measured": v, "result": s} for t, v, s in target_rows(by_key)],
    }
    js.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    return md, js


def _finite(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


def run(
    args: Any,
    command: str,
    device: torch.device,
    timer: Timer,
    timer_name: str,
    entries: Optional[list[Contender]] = None,
    cases: Optional[dict[str, Case]] = None,
) -> int:
    """Runs ``args.cases`` on ``device`` with ``timer``; prints the tables, writes the files.

    ``entries`` and ``cases`` replace the contenders and the case definitions (tests).
    """
    t_start = time.perf_counter()
    info = machine_info(device)
    print(f"rustadam GPU benchmark — {machine_line(info)}", flush=True)
    print(f"command: {command}\n", flush=True)
    cases = make_cases(args.quick) if cases is None else cases
    done = []
    for key in args.cases:
        t0 = time.perf_counter()
        cr = run_case(
            cases[key],
            device,
            timer,
            steps=args.steps,
            warmup=args.warmup,
            rounds=args.rounds,
            entries=entries,
            log=lambda s: print(f"  measuring {s} ...", file=sys.stderr, flush=True),
        )
        done.append(cr)
        print(f"{case_heading(cr)} [{time.perf_counter() - t0:.1f} s]", flush=True)
        print(text_table(HEADER, case_rows(cr)) + "\n", flush=True)
    print("Targets (same run):")
    by_key = {cr.case.key: cr for cr in done}
    print(text_table(("target", "measured", ""), target_rows(by_key)) + "\n")
    note_lines = notes(args.warmup, args.rounds, timer_name)
    for n in note_lines:
        print(f"- {n}")
    md, js = write_outputs(done, info, note_lines, command, args.out)
    print(f"\nwrote {md}\nwrote {js}\ntotal {time.perf_counter() - t_start:.1f} s")
    return 0


def main(args: Any, command: str) -> int:
    """The ``--device cuda`` entry: exit code 2 with a message when CUDA is not available."""
    if not torch.cuda.is_available():
        print(
            f"{command}: CUDA is not available (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda}; torch.cuda.is_available() is False). Nothing was measured; "
            "run it on a machine with an NVIDIA GPU, or drop --device cuda for the CPU benchmark.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    device = torch.device("cuda", torch.cuda.current_device())
    return run(args, command, device, cuda_timer, "CUDA events")


# ---- the kernel (only in the copy _roofline_kernel() loads) --------------------------------------

if __name__ == _JIT_MODULE:
    import triton
    import triton.language as tl

    @triton.jit
    def _roofline(
        table,  # int64 [n, 5]: θ, g, m, v pointers, numel
        starts,  # int32 [n + 1], prefix sum of block counts
        n_tensors,
        E_KIND: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        if E_KIND == 0:
            ety = tl.float32
        elif E_KIND == 1:
            ety = tl.float64
        elif E_KIND == 2:
            ety = tl.bfloat16
        else:
            ety = tl.float16
        pid = tl.program_id(0)
        lo = pid * 0
        hi = lo + n_tensors
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(starts + mid) <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        row = table + lo.to(tl.int64) * 5
        p_ptr = tl.load(row + 0).to(tl.pointer_type(ety))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(ety))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(ety))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(ety))
        numel = tl.load(row + 4)
        offs = (pid - tl.load(starts + lo)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + offs, (theta + g).to(ety), mask=mask)
        tl.store(m_ptr + offs, (m + g).to(ety), mask=mask)
        tl.store(v_ptr + offs, (v + g).to(ety), mask=mask)
