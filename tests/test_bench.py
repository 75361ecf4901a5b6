"""Smoke test of ``make bench``: it runs end to end on small sizes and writes what it reports.

No timing is asserted: only that every contender produced a finite time and the files exist.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rustadam import bench


@pytest.fixture
def one_thread():
    # --threads sets torch's global thread count; give the rest of the session its own back.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quick_run_writes_tables_chart_and_finite_times(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    md, png, js = out / "bench.md", out / "bench.png", out / "bench.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text(encoding="utf-8")
    raw = json.loads(js.read_text(encoding="utf-8"))

    names = [bench.ROOFLINE] + [c.name for c in bench.contenders(1)]
    assert [c["key"] for c in raw["cases"]] == list(bench.CASE_KEYS)
    for case in raw["cases"]:
        assert [r["name"] for r in case["results"]] == names
        for r in case["results"]:
            assert r["error"] is None, (case["key"], r["name"], r["error"])
            assert len(r["times_s"]) == 2
            assert all(math.isfinite(t) and t > 0 for t in r["times_s"])
    for name in names:
        assert name in text and name in printed
    assert raw["machine"]["threads"] == 1
    assert raw["machine"]["simd"] in text and raw["machine"]["date"] in text
    # Every target is judged, in both outputs.
    assert len(raw["targets"]) == len(bench.TARGETS)
    assert all(t["result"] in ("pass", "miss") for t in raw["targets"])
    for t in bench.TARGETS:
        assert t.text in text and t.text in printed
    assert str(md) in printed and str(png) in printed


def test_gpt2_small_shapes():
    # GPT-2 small's published parameter count (tied output embedding counted once).
    shapes = bench.gpt2_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for _, s in shapes) == 124_439_808
    case = bench.make_cases()["c"]
    assert case.numel == 124_439_808 and case.bytes_per_step == 28 * 124_439_808
    assert bench.make_cases()["d"].bytes_per_step == 14 * (1 << 24)


def test_failing_or_idle_contender_is_na():
    def broken(params):
        raise RuntimeError("no such optimizer\nsecond line")

    entries = [
        bench.Contender("broken", broken),
        bench.Contender("idle", lambda ps: torch.optim.SGD(ps, lr=0.0)),
        bench.Contender(bench.FUSED, lambda ps: torch.optim.Adam(ps, fused=True)),
    ]
    cr = bench.run_case(bench.make_cases(quick=True)["e"], 1, 2, 1, entries=entries)
    by = {r.name: r for r in cr.results}
    assert by["broken"].error == "RuntimeError: no such optimizer" and not by["broken"].ok
    assert "unchanged" in by["idle"].error and math.isnan(by["idle"].median)
    assert by[bench.FUSED].ok and by[bench.ROOFLINE].ok
    rows = {row[0]: row for row in bench.case_rows(cr)}
    assert rows["broken"][1] == "n/a" and "no such optimizer" in rows["broken"][2]


def test_rounds_measure_rustadam_and_fused_back_to_back_alternating_the_lead():
    """The pair the targets compare runs first, adjacent, each leading every other round; the
    tables keep the listed order."""
    order = []

    def make(name):
        def factory(params):
            order.append(name)
            return torch.optim.SGD(params, lr=0.1)

        return factory

    names = ["other", bench.RUST, "slow", bench.FUSED]
    entries = [bench.Contender(n, make(n)) for n in names]
    cr = bench.run_case(bench.make_cases(quick=True)["e"], 1, 4, 1, entries=entries, rounds=4)
    rounds = [order[i : i + 4] for i in range(0, 16, 4)]
    assert rounds[0] == [bench.RUST, bench.FUSED, "other", "slow"]
    assert rounds[1] == [bench.FUSED, bench.RUST, "other", "slow"]
    assert rounds[2] == rounds[0] and rounds[3] == rounds[1]
    assert [r.name for r in cr.results] == [bench.ROOFLINE, *names]


def test_targets_pass_and_miss():
    cases = bench.make_cases(quick=True)

    def case(key, **medians):
        return bench.CaseResult(
            cases[key], [bench.Result(n, times=[t]) for n, t in medians.items()]
        )

    names = {"roofline": bench.ROOFLINE, "rust": bench.RUST, "fused": bench.FUSED}
    a = case("a", **{names["roofline"]: 0.9, names["rust"]: 1.0, names["fused"]: 2.0})
    b = case("b", **{names["rust"]: 1.0, names["fused"]: 2.0, bench.TORCH_PATH: 20.0})
    rows = {t: (v, s) for t, v, s in bench.target_rows({"a": a, "b": b})}
    by = {(t.case, t.kind): rows[t.text] for t in bench.TARGETS}
    assert by["a", "vs_fused"] == ("0.50×", "pass")
    assert by["a", "roofline"] == ("90%", "pass")
    assert by["a", "vs_torch_path"] == ("n/a", "n/a")
    assert by["b", "vs_fused"][1] == "miss"
    assert by["b", "vs_torch_path"] == ("20.0×", "pass")
    assert by["c", "vs_fused"] == ("", "not run")


def test_small_model_case_f():
    case = bench.make_cases()["f"]
    assert case.shapes == ((128, 64), (128,), (10, 128), (10,))
    assert case.numel == 128 * 64 + 128 + 10 * 128 + 10 and case.dtype == torch.float32
    assert "f" in bench.CASE_KEYS and bench.parse_args(["--cases", "f"]).cases == ["f"]


# ---- --device cuda ------------------------------------------------------------------------------


def test_device_argument_and_cuda_cases():
    from rustadam import _bench_cuda

    cpu = bench.parse_args([])
    assert cpu.device == "cpu" and cpu.cases == list(bench.CASE_KEYS)
    gpu = bench.parse_args(["--device", "cuda"])
    assert gpu.device == "cuda" and gpu.cases == ["b", "c", "d"] == list(_bench_cuda.CASE_KEYS)
    assert bench.parse_args(["--device", "cuda", "--cases", "d,c,d"]).cases == ["d", "c"]
    for bad in (["--device", "cuda", "--cases", "a"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2
    cases = _bench_cuda.make_cases()
    assert [c.key for c in cases.values()] == ["b", "c", "d"]
    assert cases["c"].shapes == bench.make_cases()["c"].shapes and cases["c"].numel == 124_439_808
    assert cases["b"].shapes == ((1000,),) * 4000 and cases["d"].dtype == torch.bfloat16
    assert all(c.steps % 3 == 0 for c in cases.values())


def test_cuda_mode_without_cuda_says_so_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench"
    assert bench.main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cuda" in err
    assert not out.exists()


def test_cuda_harness_rounds_ratios_and_targets_on_cpu():
    """The device-agnostic harness with the wall-clock timer on CPU tensors, no triton."""
    from rustadam import _bench_cuda as bc

    calls = []

    def timer(step, warmup, steps):
        calls.append((warmup, steps))
        return bc.wall_timer(step, warmup, steps)

    def broken(params):
        raise RuntimeError("no kernel here\nmore")

    entries = [
        bench.Contender(bc.TRITON, broken),
        bench.Contender(bc.FUSED, lambda ps: torch.optim.Adam(ps, eps=bench.EPS, fused=True)),
        bench.Contender("torch for-loop", lambda ps: torch.optim.Adam(ps, eps=bench.EPS)),
    ]
    case = bench.Case("b", "tiny", "(b) tiny", ((7,), (3, 5)), torch.float32, 5)
    cpu = torch.device("cpu")
    cr = bc.run_case(case, cpu, timer, warmup=2, rounds=2, entries=entries, roofline=False)
    # 5 steps over 2 rounds: 3 then 2, each round with its own warm-up
    assert calls == [(2, 3), (2, 3), (2, 2), (2, 2)]  # the broken one never steps
    by = {r.name: r for r in cr.results}
    assert by[bc.TRITON].error == "RuntimeError: no kernel here" and not by[bc.TRITON].ok
    fused, loop = by[bc.FUSED], by["torch for-loop"]
    assert len(fused.times) == 5 and len(fused.host) == 5 and fused.delta == 0.0
    assert loop.ok and loop.delta is not None and loop.delta < 1e-6
    assert cr.ratio(bc.FUSED) == 1.0
    rows = {row[0]: row for row in bc.case_rows(cr)}
    assert rows[bc.TRITON][1] == "n/a" and rows[bc.FUSED][6] == "1.00"

    def result(name, t):
        return bc.GpuResult(name, times=[t], host=[t / 2])

    cases = bc.make_cases(quick=True)
    c = bench.CaseResult(
        cases["c"], [result(bc.ROOFLINE, 0.9), result(bc.TRITON, 1.0), result(bc.FUSED, 1.1)]
    )
    d = bench.CaseResult(cases["d"], [result(bc.TRITON, 1.0), result(bc.FUSED, 2.0)])
    rows = {t: (v, s) for t, v, s in bc.target_rows({"c": c, "d": d})}
    by_t = {(t.case, t.kind): rows[t.text] for t in bc.TARGETS}
    assert by_t["c", "vs_fused"] == ("0.91×", "pass")
    assert by_t["c", "roofline"] == ("90%", "pass")
    assert by_t["d", "roofline"] == ("n/a", "n/a")
    assert by_t["b", "vs_fused"] == ("", "not run")
    slow = [result(bc.ROOFLINE, 0.5), result(bc.TRITON, 1.0), result(bc.FUSED, 0.5)]
    rows = {t: (v, s) for t, v, s in bc.target_rows({"c": bench.CaseResult(cases["c"], slow)})}
    assert rows[bc.TARGETS[0].text] == ("2.00×", "miss")
    assert rows[bc.TARGETS[2].text] == ("50%", "miss")


def test_cuda_timer_units_and_counts(monkeypatch):
    """cuda_timer's bookkeeping, with torch.cuda.Event stood in for by a wall-clock stamp."""
    import time

    from rustadam import _bench_cuda as bc

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):  # milliseconds, as CUDA events report
            return (end.t - self.t) * 1e3

    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    ran = []
    dev, host = bc.cuda_timer(lambda: (ran.append(1), time.sleep(0.002)), 2, 3)
    assert len(ran) == 5 and len(syncs) == 2 and len(dev) == len(host) == 3
    assert all(0.002 <= h <= d < 1.0 for d, h in zip(dev, host))


_SMOKE = """
import json, sys, torch
from pathlib import Path
from rustadam import bench, _bench_cuda as bc
out = Path(sys.argv[1])
args = bench.parse_args(["--device", "cuda", "--cases", "c,d", "--steps", "2", "--rounds", "1",
                         "--warmup", "1", "--out", str(out)])
cases = {
    "c": bench.Case("c", "3 fp32 tensors", "(c)", ((300,), (2, 37), (1030,)), torch.float32, 2),
    "d": bench.Case("d", "one bfloat16 tensor", "(d)", ((1100,),), torch.bfloat16, 2),
}
sys.exit(bc.run(args, "smoke", torch.device("cpu"), bc.wall_timer, "wall clock", cases=cases))
"""


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"
)
def test_cuda_harness_end_to_end_under_triton_interpreter(tmp_path):
    """Every contender and the Triton roofline kernel, on CPU tensors in triton's interpreter.

    A subprocess: ``TRITON_INTERPRET`` is read when triton is first imported.
    """
    import os
    import subprocess
    import sys

    from rustadam import _bench_cuda as bc

    out = tmp_path / "bench"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SMOKE, str(out)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = json.loads((out / "bench-cuda.json").read_text(encoding="utf-8"))
    text = (out / "bench-cuda.md").read_text(encoding="utf-8")
    names = [bc.ROOFLINE] + [c.name for c in bc.contenders()]
    assert [c["key"] for c in raw["cases"]] == ["c", "d"]
    for case in raw["cases"]:
        assert [r["name"] for r in case["results"]] == names
        for r in case["results"]:
            assert r["error"] is None, (case["key"], r["name"], r["error"])
            assert len(r["times_s"]) == 2 and len(r["host_times_s"]) == 2
            assert all(math.isfinite(t) and t > 0 for t in r["times_s"])
        delta = {r["name"]: r["max_abs_delta_vs_fused"] for r in case["results"]}
        assert delta[bc.ROOFLINE] is None and delta[bc.FUSED] == 0.0
        # The same algorithm: rustadam's backends agree with torch fused to rounding.
        tol = 1e-6 if case["dtype"] == "float32" else 1e-2
        assert delta[bc.TRITON] <= tol and delta[bc.FOREACH] <= tol
    results = {t["target"]: t["result"] for t in raw["targets"]}
    for t in bc.TARGETS:
        assert (
            results[t.text] == "not run" if t.case == "b" else results[t.text] in ("pass", "miss")
        )
    for name in names:
        assert name in text and name in proc.stdout
    for t in bc.TARGETS:
        assert t.text in text and t.text in proc.stdout
    assert raw["machine"]["triton"] and raw["machine"]["torch"] == torch.__version__
