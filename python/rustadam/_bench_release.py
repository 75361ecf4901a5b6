"""``python -m rustadam.bench --gradient-release``: what ``Adam(..., gradient_release=True)`` saves.

One CPU model whose gradients total a few hundred MiB (default: an MLP of 8 float32
``Linear(3072, 3072)`` layers with ReLU between them, 75.5M parameters, 288 MiB of gradients)
is trained on the same batches from the same initial weights in two ways, both with
``rustadam.Adam(lr=1e-4)`` (``backend="auto"``, the Rust core):

- *usual loop*: ``loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``;
- *gradient release*: ``Adam(..., gradient_release=True)`` and ``loss.backward()`` only: each
  parameter is stepped inside backward as soon as its gradient is complete, and the gradient is
  freed at once.

A step is timed whole (forward, loss, backward and the optimizer's work). Each variant runs in a
fresh process of its own (started with ``subprocess``, not ``fork``), so neither sees the other's
allocations; in each of ``--rounds`` rounds two fresh workers are started, warm up (the first
step creates the optimizer state), then take measured steps strictly in turn, the order
alternating from step to step and round to round, so a drift of the machine's load reaches both
alike.

Peak memory of a step: just before it the worker resets the kernel's high-water mark of its
resident set (``echo 5 > /proc/self/clear_refs``, Linux) and reads it back as the baseline
(``getrusage(RUSAGE_SELF).ru_maxrss``, which the reset sets to the current RSS); after the step
``ru_maxrss`` is the step's peak, and the difference is the memory the step needed above the
model and its optimizer state. torch's CPU allocator hands tensors of 32 MiB and more straight
to ``mmap`` and back to the kernel when freed (glibc's largest mmap threshold), which is why the
default layers are that big: the RSS then follows the live gradients exactly. Without
``/proc/self/clear_refs`` the memory columns read n/a.

The two variants must end with bit-identical weights (SHA-256 of every parameter's bytes after
the round's steps) and bit-identical losses at every step; the run says whether they do.

Reported: the gradient bytes of the model; per variant the median (and min–max) step time and
the median (and max) peak extra memory of the measured steps; the saving (usual − release) and
its ratio to the gradient bytes, against the best a release can do (all gradients but the
largest, the one being stepped); the time ratio release / usual (target ≤ 1.05) and the median
of the per-pair ratios. ``--out`` writes ``bench-release.md`` and ``bench-release.json``.

Example::

    python -m rustadam.bench --gradient-release --out out/bench
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

USUAL = "usual loop"
RELEASE = "gradient release"
VARIANTS = (USUAL, RELEASE)
LR = 1e-4
TIME_TARGET = 1.05  # release step time / usual step time
MIB = 1 << 20
CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class Config:
    """The model and the run: ``depth`` Linear(width, width) layers, ``batch`` rows per step."""

    width: int = 3072
    depth: int = 8
    batch: int = 64
    steps: int = 12  # measured steps per variant, over all rounds
    warmup: int = 2  # per round and variant; the first creates the optimizer state
    rounds: int = 3
    seed: int = 0
    threads: int = 1

    def share(self, rnd: int) -> int:
        """The measured steps of round ``rnd``; the rounds together measure ``steps``."""
        return self.steps // self.rounds + (1 if rnd < self.steps % self.rounds else 0)


QUICK = {"width": 3072, "depth": 2, "batch": 8, "steps": 2, "warmup": 1, "rounds": 1}


# ---- the worker (one variant in a process of its own) ------------------------------------------


def _model(cfg: Config) -> Any:
    import torch

    torch.manual_seed(cfg.seed)
    layers: list[torch.nn.Module] = []
    for i in range(cfg.depth):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(cfg.width, cfg.width))
    return torch.nn.Sequential(*layers)


def _batch(cfg: Config, i: int) -> tuple[Any, Any]:
    """Step ``i``'s inputs and targets, the same in every worker."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + i)
    x = torch.randn(cfg.batch, cfg.width, generator=gen)
    return x, torch.randn(cfg.batch, cfg.width, generator=gen)


def _digest(params: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().view(-1).view(dtype=_uint8()).numpy().data)
    return h.hexdigest()


def _uint8() -> Any:
    import torch

    return torch.uint8


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux


def _reset_peak() -> Optional[int]:
    """Resets the resident-set high-water mark; returns it (= the current RSS) or None."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return _maxrss_bytes()


def worker(variant: str, cfg: Config, proto: IO[str]) -> None:
    """Serves one variant: a line ``step`` runs the next step, ``finish`` hashes and exits."""
    import torch
    import torch.nn.functional as F

    from rustadam import Adam

    torch.set_num_threads(cfg.threads)
    model = _model(cfg)
    params = list(model.parameters())
    release = variant == RELEASE
    opt = Adam(params, lr=LR, backend="auto", gradient_release=release)

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    send(
        ready=True,
        grad_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        largest_grad=max(p.numel() * p.element_size() for p in params),
        params=sum(p.numel() for p in params),
        tensors=len(params),
        init_sha256=_digest(params),
        peak_method=_reset_peak() is not None,
    )
    gc.collect()
    gc.disable()  # a collection inside a step would be charged to it
    i = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "finish":
            send(sha256=_digest(params), steps=i)
            return
        if cmd != "step":
            raise RuntimeError(f"unknown command {cmd!r}")
        x, y = _batch(cfg, i)
        base = _reset_peak()
        t0 = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if not release:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = time.perf_counter() - t0
        peak = _maxrss_bytes() - base if base is not None else None
        send(
            time_s=t,
            peak_bytes=peak,
            base_bytes=base,
            loss=float(loss).hex(),
            grads_left=sum(p.grad is not None for p in params),
        )
        del x, y, loss
        i += 1


# ---- the harness ---------------------------------------------------------------------------------


@dataclass
class Measured:
    """One variant's measured steps over all rounds."""

    name: str
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)  # bytes above the step's baseline
    bases: list[int] = field(default_factory=list)  # RSS before the step (model + state)
    grads_left: int = 0  # gradients still set after a measured step, summed

    @property
    def median_time(self) -> float:
        return statistics.median(self.times)

    @property
    def median_peak(self) -> Optional[float]:
        return statistics.median(self.peaks) if self.peaks else None


@dataclass
class Report:
    cfg: Config
    model: dict[str, Any]
    results: dict[str, Measured]
    pair_ratios: list[float]  # release / usual time, per pair of adjacent steps
    weights_identical: bool
    losses_identical: bool
    weights_changed: bool
    init_identical: bool

    @property
    def grad_bytes(self) -> int:
        return int(self.model["grad_bytes"])

    @property
    def saving(self) -> Optional[float]:
        a, b = self.results[USUAL].median_peak, self.results[RELEASE].median_peak
        return None if a is None or b is None else a - b

    @property
    def time_ratio(self) -> float:
        return self.results[RELEASE].median_time / self.results[USUAL].median_time


class Worker:
    """A worker process and its protocol pipes; its stderr goes to a temporary file."""

    def __init__(self, variant: str, cfg: Config) -> None:
        self.variant = variant
        self.err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        spec = json.dumps({"variant": variant, "cfg": asdict(cfg)})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rustadam._bench_release", "--worker", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            bufsize=1,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = self.err.read()[-3000:]
            raise RuntimeError(
                f"the {self.variant} worker exited with code {self.proc.returncode}:\n{tail}"
            )
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.err.close()


def run(cfg: Config, log: Any = lambda s: None) -> Report:
    """Measures both variants in ``cfg.rounds`` rounds of fresh worker pairs."""
    results = {v: Measured(v) for v in VARIANTS}
    pair_ratios: list[float] = []
    model: dict[str, Any] = {}
    weights_identical = losses_identical = weights_changed = init_identical = True
    for rnd in range(cfg.rounds):
        n = cfg.share(rnd)
        if not n:
            continue
        log(f"round {rnd + 1}/{cfg.rounds}: starting both workers")
        workers = {v: Worker(v, cfg) for v in VARIANTS}
        try:
            ready = {v: w.read() for v, w in workers.items()}
            model = {k: ready[USUAL][k] for k in ("grad_bytes", "largest_grad", "params",
                                                  "tensors", "peak_method")}  # fmt: skip
            init_identical &= ready[USUAL]["init_sha256"] == ready[RELEASE]["init_sha256"]
            for k in range(cfg.warmup + n):
                order = VARIANTS if (rnd + k) % 2 == 0 else VARIANTS[::-1]
                if k == cfg.warmup:
                    log(f"round {rnd + 1}/{cfg.rounds}: {n} measured step(s) each")
                out = {v: workers[v].ask("step") for v in order}
                losses_identical &= out[USUAL]["loss"] == out[RELEASE]["loss"]
                if k < cfg.warmup:
                    continue
                for v in VARIANTS:
                    m = results[v]
                    m.times.append(out[v]["time_s"])
                    if out[v]["peak_bytes"] is not None:
                        m.peaks.append(out[v]["peak_bytes"])
                        m.bases.append(out[v]["base_bytes"])
                    m.grads_left += out[v]["grads_left"]
                pair_ratios.append(out[RELEASE]["time_s"] / out[USUAL]["time_s"])
            done = {v: w.ask("finish") for v, w in workers.items()}
            weights_identical &= done[USUAL]["sha256"] == done[RELEASE]["sha256"]
            weights_changed &= done[USUAL]["sha256"] != ready[USUAL]["init_sha256"]
            for w in workers.values():
                w.proc.wait(timeout=60)
        finally:
            for w in workers.values():
                w.close()
    return Report(cfg, model, results, pair_ratios, weights_identical, losses_identical,
                  weights_changed, init_identical)  # fmt: skip


# ---- reporting -----------------------------------------------------------------------------------


def _mib(b: Optional[float]) -> str:
    return "n/a" if b is None else f"{b / MIB:,.1f}"


def model_line(rep: Report) -> str:
    c = rep.cfg
    return (
        f"MLP of {c.depth} float32 Linear({c.width}, {c.width}) layers (ReLU between), "
        f"{rep.model['params']:,} parameters in {rep.model['tensors']} tensors; gradients "
        f"{rep.grad_bytes:,} bytes = {_mib(rep.grad_bytes)} MiB (largest "
        f"{_mib(rep.model['largest_grad'])} MiB); batch {c.batch}; rustadam.Adam(lr={LR:g}), "
        f"backend auto, {c.threads} thread(s)"
    )


HEADER = ("variant", "median step ms", "min–max ms", "steps", "peak extra MiB (median)",
          "max MiB", "RSS before step MiB")  # fmt: skip


def rows(rep: Report) -> list[tuple[str, ...]]:
    from rustadam.bench import _ms

    out = []
    for v in VARIANTS:
        m = rep.results[v]
        out.append(
            (
                v,
                _ms(m.median_time),
                f"{_ms(min(m.times))}–{_ms(max(m.times))}",
                str(len(m.times)),
                _mib(m.median_peak),
                _mib(max(m.peaks)) if m.peaks else "n/a",
                _mib(statistics.median(m.bases)) if m.bases else "n/a",
            )
        )
    return out


def summary(rep: Report) -> list[str]:
    g = rep.grad_bytes
    best = g - rep.model["largest_grad"]
    lines = []
    s = rep.saving
    if s is None:
        lines.append(f"Peak memory: n/a (needs Linux's {CLEAR_REFS} to reset the high-water mark)")
    else:
        lines.append(
            f"Memory saved by gradient release: {_mib(s)} MiB = {s / g:.0%} of the gradient "
            f"bytes ({_mib(g)} MiB); at best {_mib(best)} MiB ({best / g:.0%}), all gradients "
            "but the one being stepped."
        )
    r = rep.time_ratio
    lines.append(
        f"Step time, gradient release / usual loop: {r:.3f}× (target ≤ {TIME_TARGET:.2f}×: "
        f"{'pass' if r <= TIME_TARGET else 'miss'}); median of the "
        f"{len(rep.pair_ratios)} per-pair ratios {statistics.median(rep.pair_ratios):.3f}×."
    )
    lines.append(
        "Final weights bit-identical: "
        + ("yes" if rep.weights_identical else "NO")
        + f" (SHA-256 of every parameter after {rep.cfg.warmup} + the measured steps, each round)"
        + "; losses bit-identical at every step: "
        + ("yes" if rep.losses_identical else "NO")
        + ("" if rep.weights_changed else "; the weights did NOT change")
        + ("" if rep.init_identical else "; the initial weights DIFFERED")
        + "."
    )
    left = rep.results[RELEASE].grads_left
    if left:
        lines.append(f"Gradients left set after release steps: {left} (expected none).")
    return lines


def notes(rep: Report) -> list[str]:
    c = rep.cfg
    return [
        "Step = forward + MSE loss + backward (+ opt.step() and opt.zero_grad(set_to_none=True) "
        "in the usual loop), timed whole with time.perf_counter.",
        f"Each variant in a fresh process; {c.rounds} round(s) of a fresh pair, each "
        f"{c.warmup} warm-up step(s) (the first creates the state), then the measured steps in "
        "turn, the order alternating; same seed, same initial weights, same batches.",
        f"Peak extra = the resident-set high-water mark during the step (reset through "
        f"{CLEAR_REFS} just before it, read with getrusage ru_maxrss) minus the RSS before it "
        "(parameters, optimizer state, the batch).",
    ]


def write_outputs(rep: Report, info: dict[str, Any], command: str, out: Path) -> tuple[Path, Path]:
    from rustadam.bench import machine_line, md_table

    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "bench-release.md", out / "bench-release.json"
    parts = [
        "# rustadam benchmark: gradient release on the CPU",
        "",
        f"Machine: {machine_line(info)}",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {model_line(rep)}",
        "",
        md_table(HEADER, rows(rep)),
        "",
    ]
    parts += [f"- {x}" for x in summary(rep) + notes(rep)]
    md.write_text("\n".join(parts) + "\n", encoding="utf-8")
    raw = {
        "machine": info,
        "command": command,
        "config": asdict(rep.cfg),
        "model": rep.model,
        "lr": LR,
        "variants": {
            v: {
                "times_s": m.times,
                "median_s": m.median_time,
                "peak_extra_bytes": m.peaks,
                "median_peak_extra_bytes": m.median_peak,
                "rss_before_bytes": m.bases,
            }
            for v, m in rep.results.items()
        },
        "saving_bytes": rep.saving,
        "saving_over_grad_bytes": None if rep.saving is None else rep.saving / rep.grad_bytes,
        "time_ratio": rep.time_ratio,
        "pair_ratios": rep.pair_ratios,
        "weights_identical": rep.weights_identical,
        "losses_identical": rep.losses_identical,
        "weights_changed": rep.weights_changed,
    }
    js.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    return md, js


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    d = Config()
    ap = argparse.ArgumentParser(
        prog="python -m rustadam.bench --gradient-release",
        description="Peak memory and step time of Adam(gradient_release=True) against the "
        "usual loop, on a CPU MLP",
    )
    ap.add_argument("--width", type=int, default=d.width, help=f"layer width ({d.width})")
    ap.add_argument("--depth", type=int, default=d.depth, help=f"Linear layers ({d.depth})")
    ap.add_argument("--batch", type=int, default=d.batch, help=f"rows per step ({d.batch})")
    ap.add_argument("--steps", type=int, default=d.steps, help=f"measured steps ({d.steps})")
    ap.add_argument("--warmup", type=int, default=d.warmup, help=f"per round ({d.warmup})")
    ap.add_argument("--rounds", type=int, default=d.rounds, help=f"worker pairs ({d.rounds})")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None, help="default torch.get_num_threads()")
    ap.add_argument("--quick", action="store_true", help="a small model and 2 steps (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == getattr(d, k):
                setattr(args, k, v)
    for k in ("width", "depth", "batch", "steps", "warmup", "rounds"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    args.rounds = min(args.rounds, args.steps)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the measurement, prints the table and summary, writes the markdown and JSON."""
    import torch

    from rustadam.bench import _load, machine_info, machine_line, text_table

    args = parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = "python -m rustadam.bench --gradient-release " + " ".join(
        a for a in shown if a != "--gradient-release"
    )
    command = command.strip()
    threads = args.threads or torch.get_num_threads()
    cfg = Config(args.width, args.depth, args.batch, args.steps, args.warmup, args.rounds,
                 args.seed, threads)  # fmt: skip
    info = machine_info(threads)
    print(f"rustadam gradient-release benchmark — {machine_line(info)}", flush=True)
    print(f"command: {command}\n", flush=True)
    rep = run(cfg, log=lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    info["load_end"] = _load()
    print(f"Model: {model_line(rep)}\n")
    print(text_table(HEADER, rows(rep)) + "\n")
    for line in summary(rep) + notes(rep):
        print(f"- {line}")
    print(
        f"- Load average (1 min): {info['load_start']} at the start, {info['load_end']} at the end"
    )
    md, js = write_outputs(rep, info, command, args.out)
    print(f"\nwrote {md}\nwrote {js}")
    return 0


def _worker_main(spec: str) -> int:
    # The protocol keeps the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    s = json.loads(spec)
    worker(s["variant"], Config(**s["cfg"]), proto)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit(main())
