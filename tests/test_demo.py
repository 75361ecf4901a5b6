"""``make demo`` (rustadam.demo) on a 2-epoch run: its figures, its head-to-head, its claims."""

import contextlib
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch

import rustadam
from rustadam import demo

FIGURES = {
    "head_to_head.png",
    "update_modes.png",
    "weight_decay.png",
    "step_bound.png",
    "bf16_rounding.png",
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One demo run shared by the tests: (result, output folder, what it printed)."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    printed = io.StringIO()  # not a terminal: the demo must print plain lines, no progress bar
    try:
        with contextlib.redirect_stdout(printed):
            result = demo.main(
                ["--epochs", "2", "--out", str(out), "--seed", "0", "--threads", "1"]
            )
    finally:
        torch.set_num_threads(threads)  # --threads sets torch's count for the whole process
    return result, out, printed.getvalue()


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Splits a PNG into (type, body) chunks, checking the signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_writes_every_figure_as_a_valid_png(ran):
    import matplotlib.image

    result, out, printed = ran
    assert {p.name for p in out.iterdir()} == FIGURES
    assert [p.parent for p in result.figures] == [out] * len(FIGURES)
    assert {p.name for p in result.figures} == FIGURES
    for path in result.figures:
        assert f"wrote {path}" in printed
        chunks = _png_chunks(path.read_bytes())
        assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
        width, height = struct.unpack(">II", chunks[0][1][:8])
        assert width >= 600 and height >= 400, (path.name, width, height)
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[:2] == (height, width)
        # Something was drawn: a blank canvas is a single colour.
        assert pixels[..., :3].std() > 0.05, path.name


def test_head_to_head_is_the_same_algorithm_as_torch(ran):
    result, _, printed = ran
    r, t = result.head_to_head["rustadam"], result.head_to_head["torch"]
    assert isinstance(r.opt, rustadam.Adam) and r.opt.optimized_update is False
    assert r.opt.backend == "rust"  # the Rust core, not the torch fallback
    assert type(t.opt) is torch.optim.Adam
    for opt in (r.opt, t.opt):
        group = opt.param_groups[0]
        assert group["eps"] == 1e-8 and group["lr"] == demo.LR and group["betas"] == demo.BETAS
    assert "optimized_update=False, eps=1e-8" in printed
    assert len(r.loss) == len(t.loss) == 2
    # Same weights, batches and formula: only float32 rounding differs (torch's float32 sqrt is
    # off by 1 ulp on some elements, the core's is correctly rounded), which moves the epoch
    # loss by ~1e-7 relative. 1e-5 leaves a wide margin for that while still catching a changed
    # algorithm: ε added in the other place (optimized_update=True), 10× ε, β2 = 0.998 or α off
    # by 0.1% each move the second epoch's loss by 1.5e-5 to 1.4e-3.
    for epoch, (a, b) in enumerate(zip(r.loss, t.loss), 1):
        assert abs(a - b) / b < 1e-5, (epoch, a, b)
    for a, b in zip(r.acc, t.acc):
        assert abs(a - b) <= 1 / 360 + 1e-12  # at most one of the 360 test images
    n_batches = math.ceil(len(demo.load_data(0).x_train) / demo.BATCH_SIZE)
    assert len(r.step_s) == len(t.step_s) == 2 * n_batches
    assert all(s > 0 for s in r.step_s + t.step_s)


def test_every_run_learns(ran):
    result, _, _ = ran
    runs = [*result.head_to_head.values(), *result.update_modes.values()]
    runs += [*result.weight_decay.values(), *result.bf16.values()]
    for run in runs:
        assert run.loss[1] < run.loss[0] < math.log(10), (run.label, run.loss)
        assert run.acc[-1] > 0.5, (run.label, run.acc)  # 10 classes: chance is 0.1


def test_update_modes_differ_only_by_rounding(ran):
    result, _, _ = ran
    # With ε = 1e-16 both forms compute the same update; a wrong bias correction in either
    # (e.g. √bc2 missing, a factor 31.6 at t = 1) would move the weights by ~1e-3 at once.
    assert len(result.update_modes_gap) == 2
    assert max(result.update_modes_gap) < 1e-5
    a, b = result.update_modes["True"].loss, result.update_modes["False"].loss
    assert a == pytest.approx(b, rel=1e-5)


def test_every_weight_decay_mode_shrinks_the_weights(ran):
    result, _, _ = ran
    none = result.weight_decay["none"]
    assert none.opt.param_groups[0]["weight_decay"] == 0
    for key in ("l2", "decoupled", "absolute"):
        run = result.weight_decay[key]
        assert run.norm[0] == none.norm[0]  # same initial weights
        assert run.norm[-1] < none.norm[-1], (key, run.norm, none.norm)
    wds = {k: result.weight_decay[k].opt.weight_decay for k in ("l2", "decoupled", "absolute")}
    assert (wds["l2"].weight_decouple, wds["l2"].absolute) == (False, False)
    assert (wds["decoupled"].weight_decouple, wds["decoupled"].absolute) == (True, False)
    assert (wds["absolute"].weight_decouple, wds["absolute"].absolute) == (True, True)


def test_step_bound_holds(ran):
    result, _, _ = ran
    info = result.bound
    beta1, beta2 = demo.BETAS
    assert info["alpha"] == demo.LR
    assert info["bound"] == pytest.approx(demo.LR * (1 - beta1) / math.sqrt(1 - beta2))
    deltas = np.concatenate(result.bound_run.deltas)
    assert info["n"] == deltas.size and info["max"] == deltas.max()
    # |Δθ| is measured as the float32 difference of θ before and after, which rounds by at most
    # ulp(θ)/2 ≈ 6e-8·|θ|; relative to the bound that is far below 1e-4.
    assert 0 < info["max"] <= info["bound"] * (1 + 1e-4)
    assert 0 < info["zeros"] < info["n"]


def test_first_step_moves_every_weight_with_a_gradient_by_alpha(ran):
    # At t = 1, m̂ = g and v̂ = g², so |Δθ| = α·|g|/|g| = α whatever g (ε ≈ 0), up to the
    # float32 rounding of θ − Δθ; weights with g = 0 (blank pixels, inactive units) stay put.
    result, _, _ = ran
    first = result.bound_run.deltas[0]
    moved = first[first > 0]
    assert 0.5 * first.size < moved.size < first.size
    np.testing.assert_allclose(moved, demo.LR, rtol=1e-4)


def test_pure_bfloat16_runs_keep_their_small_updates(ran):
    result, _, printed = ran
    runs = result.bf16
    assert list(runs) == ["float32", "nearest", "stochastic", "kahan", "kahan, release"]
    for key, run in runs.items():
        dtype = torch.float32 if key == "float32" else torch.bfloat16
        assert run.dtype == dtype and len(run.loss) == 2
        assert run.opt.rounding == ("nearest" if key == "float32" else key.split(",")[0])
        assert run.opt.gradient_release == key.endswith("release")
        for p in run.model.parameters():
            state = run.opt.state[p]
            assert p.dtype == dtype, key
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == dtype, key
            assert ("compensation" in state) == key.startswith("kahan"), key
            if "compensation" in state:
                assert state["compensation"].dtype == dtype
    # Gradient release changes nothing but when each parameter is stepped.
    assert runs["kahan, release"].loss == runs["kahan"].loss
    for a, b in zip(runs["kahan, release"].model.parameters(), runs["kahan"].model.parameters()):
        assert torch.equal(a, b)
    assert "kahan with gradient release gives the kahan run bit for bit: True" in printed
    # After two epochs round-to-nearest has drifted from float32 (by ~0.6% of the loss) while
    # stochastic rounding and Kahan summation follow it (~0.01%).
    f32 = runs["float32"].loss[-1]
    gap = {k: abs(runs[k].loss[-1] - f32) / f32 for k in ("nearest", "stochastic", "kahan")}
    assert gap["stochastic"] < 2e-3 and gap["kahan"] < 2e-3, gap
    assert gap["nearest"] > 3 * max(gap["stochastic"], gap["kahan"]), gap


def test_memory_table_is_measured_per_mode(ran):
    result, _, printed = ran
    rows = {(m.label, m.release): m for m in result.memory}
    expected = {  # weights + gradients + moments (+ compensation), bytes per parameter
        "float32": (4, 4, 8),
        "bfloat16, nearest": (2, 2, 4),
        "bfloat16, stochastic": (2, 2, 4),
        "bfloat16, kahan": (2, 2, 6),
    }
    assert set(rows) == {(label, r) for label in expected for r in (False, True)}
    n = sum(p.numel() for p in demo.make_model(0).parameters())
    largest = max(p.numel() for p in demo.make_model(0).parameters())
    for label, (w, g, s) in expected.items():
        usual, release = rows[label, False], rows[label, True]
        assert (usual.weights, usual.grads, usual.states, usual.total) == (w, g, s, w + g + s)
        # Every gradient is freed once stepped: none is held, at most one alive at a time.
        assert (release.weights, release.grads, release.states) == (w, 0, s)
        assert release.total == w + s
        assert usual.peak_grads == g
        assert release.peak_grads == pytest.approx(g * largest / n)
        assert f"{label:<22}" in printed


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--threads", "0"], ["--epochs", "x"]])
def test_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err
