"""Smoke test of ``python -m rustadam.bench --gradient-release`` on its small model (--quick).

No timing is asserted: only the shape of what it prints and writes, that both variants end with
bit-identical weights, and that gradient release does not need more memory than the usual loop.
"""

from __future__ import annotations

import json
import math

import pytest

from rustadam import _bench_release, bench

MARGIN = 2 << 20  # bytes: RSS noise allowed between the two workers' peaks


def test_quick_run_prints_and_writes_both_variants(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--gradient-release", "--quick", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out

    md, js = out / "bench-release.md", out / "bench-release.json"
    raw = json.loads(js.read_text(encoding="utf-8"))
    text = md.read_text(encoding="utf-8")
    for name in _bench_release.VARIANTS:
        assert name in printed and f"| {name} |" in text
    assert "Final weights bit-identical: yes" in printed
    assert "losses bit-identical at every step: yes" in printed
    assert "Step time, gradient release / usual loop:" in printed
    assert raw["command"].startswith("python -m rustadam.bench --gradient-release --quick")

    cfg = raw["config"]
    assert (cfg["width"], cfg["depth"], cfg["threads"]) == (3072, 2, 1)
    w = cfg["width"]
    assert raw["model"]["grad_bytes"] == 4 * cfg["depth"] * (w * w + w)
    assert raw["weights_identical"] and raw["losses_identical"] and raw["weights_changed"]
    assert math.isfinite(raw["time_ratio"]) and raw["time_ratio"] > 0
    for name in _bench_release.VARIANTS:
        v = raw["variants"][name]
        assert len(v["times_s"]) == cfg["steps"]
        assert all(t > 0 for t in v["times_s"])

    if not raw["model"]["peak_method"]:
        assert "Peak memory: n/a" in printed
        pytest.skip(f"no {_bench_release.CLEAR_REFS} here: peak memory not measured")
    usual = raw["variants"][_bench_release.USUAL]["median_peak_extra_bytes"]
    release = raw["variants"][_bench_release.RELEASE]["median_peak_extra_bytes"]
    assert release <= usual + MARGIN, (release, usual)
    assert "Memory saved by gradient release:" in printed


def test_quick_applies_only_to_unset_options():
    args = _bench_release.parse_args(["--quick", "--depth", "3"])
    assert (args.depth, args.width, args.steps, args.rounds) == (3, 3072, 2, 1)


@pytest.mark.parametrize("flag", ["--steps", "--depth", "--warmup"])
def test_rejects_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit):
        _bench_release.parse_args([flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_worker_failure_names_the_variant(monkeypatch):
    # A worker that cannot start reports its exit code and stderr instead of hanging.
    cfg = _bench_release.Config(width=8, depth=1, batch=2, steps=1, warmup=1, rounds=1)
    monkeypatch.setattr(_bench_release.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="usual loop worker exited with code 1"):
        _bench_release.run(cfg)
