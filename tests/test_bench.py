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
