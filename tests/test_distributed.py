"""rustadam under torch.distributed: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor shards, CPU
offload) and distributed checkpoints, each run as 2 gloo processes on the loopback interface and
compared with the same model trained in one process on the full batch.

Two launches of tests/dist_worker.py per rank run every scenario (the second resumes from the
first's checkpoint); the parent holds the rendezvous store, bounds the run's time and kills
what is left on any failure.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dist_worker as w
from rustadam import Adam, WeightDecay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="this torch build has no torch.distributed with gloo",
    ),
]

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT = 150.0


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), names[0])


def run_ranks(scenarios: list[str], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Runs scenarios in one launch of WORLD processes; returns what each rank saved for each."""
    # The parent owns the rendezvous store, so the port is bound before any worker starts.
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=LAUNCH_TIMEOUT),
    )
    env_base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": str(w.WORLD),
        "GLOO_SOCKET_IFNAME": _loopback_interface(),
        "OMP_NUM_THREADS": "1",
        "RUSTADAM_NUM_THREADS": "1",
        "LAUNCHED_AT": repr(time.time()),
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = [out / f"{scenarios[0]}-rank{r}.log" for r in range(w.WORLD)]
    try:
        for r in range(w.WORLD):
            env = {**env_base, "RANK": str(r), "LOCAL_RANK": str(r)}
            with open(logs[r], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(out), *scenarios],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        # A rank that fails leaves the other waiting in a collective: stop at the first failure.
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        del store
    codes = [p.returncode for p in procs]
    if codes != [0] * w.WORLD:
        tails = "\n".join(
            f"--- rank {r} ---\n{logs[r].read_text()[-4000:]}" for r in range(w.WORLD)
        )
        pytest.fail(f"{scenarios}: ranks exited with {codes} (negative: killed)\n{tails}")
    return {
        s: [torch.load(out / f"{s}-rank{r}.pt", weights_only=False) for r in range(w.WORLD)]
        for s in scenarios
    }


def assert_ranks_identical(results: list[dict[str, Any]], key: str = "params") -> None:
    first = results[0][key]
    for other in results[1:]:
        assert other[key].keys() == first.keys()
        for name in first:
            assert torch.equal(other[key][name], first[name]), f"{key} {name} differs across ranks"


def assert_matches(got: dict[str, Any], model: torch.nn.Module, opt: Adam) -> None:
    """Parameters and moments against the single-process run (float32 reduction order only)."""
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
        state = opt.state[p]
        torch.testing.assert_close(got["exp_avg"][name], state["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            got["exp_avg_sq"][name], state["exp_avg_sq"], rtol=1e-5, atol=1e-9
        )
        assert got["step"][name] == state["step"]


def assert_trained(model: torch.nn.Module) -> None:
    """The comparison means something only if the parameters moved."""
    for (name, p), p0 in zip(model.named_parameters(), w.make_model().parameters()):
        assert not torch.allclose(p, p0, atol=1e-4), f"{name} did not move"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    """The scenarios that start from a fresh model, in one launch; and where they saved."""
    out = tmp_path_factory.mktemp("dist")
    return out, run_ranks(["ddp", "zero", "fsdp", "dcp_save"], out)


# ---- DDP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_results(runs: tuple[Path, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    return runs[1]["ddp"]


@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_matches_single_process(ddp_results: list[dict[str, Any]], bucket_view: bool) -> None:
    results = [r[f"bucket_view={bucket_view}"] for r in ddp_results]
    n_params = len(results[0]["params"])
    for r in results:
        # With bucket views all gradients live in DDP's (here single) bucket.
        assert r["grad_storages"] == (1 if bucket_view else n_params)
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert_ranks_identical(results, key)
    model, opt = w.single_process(w.DDP_OPT)
    assert_trained(model)
    assert_matches(results[0], model, opt)


# ---- ZeroRedundancyOptimizer ---------------------------------------------------------------


def test_zero_redundancy_optimizer(runs: tuple[Path, dict[str, list[Any]]]) -> None:
    results = runs[1]["zero"]
    # The second group holds one tensor: exactly one rank gets it, the other an empty group.
    sizes = [r["local_group_sizes"] for r in results]
    assert sorted(s[1] for s in sizes) == [0, 1]
    assert sum(s[0] for s in sizes) == len(list(w.make_model().parameters())) - 1
    assert_ranks_identical(results)

    model, opt = w.single_process(w.ZERO_OPT, groups=w.zero_groups)
    assert_trained(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(results[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)

    # rank 0's consolidated state loads into a plain rustadam optimizer and carries on as the
    # unsharded one does.
    consolidated = results[0]["consolidated"]
    replica = copy.deepcopy(model)
    plain = Adam(w.zero_groups(replica), lr=w.LR, **w.ZERO_OPT)
    plain.load_state_dict(consolidated)
    assert [g["lr"] for g in plain.param_groups] == [w.LR, 2 * w.LR]
    for p, q in zip(model.parameters(), replica.parameters()):
        want, got = opt.state[p], plain.state[q]
        assert got["step"] == want["step"] == w.STEPS
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    w.train(model, opt, range(w.STEPS, w.STEPS + 1))
    w.train(replica, plain, range(w.STEPS, w.STEPS + 1))
    for p, q in zip(model.parameters(), replica.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


# ---- FSDP2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_results(runs: tuple[Path, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    return runs[1]["fsdp"]


@pytest.mark.parametrize("case", list(w.FSDP_CASES))
def test_fsdp2_matches_single_process(fsdp_results: list[dict[str, Any]], case: str) -> None:
    results = [r[case] for r in fsdp_results]
    # The layers' dim 0 (5, 3, 1) does not divide by 2: uneven shards, and empty ones on rank 1.
    full = {n: p.numel() for n, p in w.make_model().named_parameters()}
    local = [r["local_numel"] for r in results]
    assert {n: sum(loc[n] for loc in local) for n in full} == full
    assert any(local[0][n] != local[1][n] for n in full)
    assert any(local[1][n] == 0 for n in full)
    for r in results:
        # exp_avg and exp_avg_sq are DTensors sharded like their parameters.
        assert r["dtensor_states"]
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert_ranks_identical(results, key)
    model, opt = w.single_process(w.FSDP_CASES[case])
    assert_trained(model)
    # exp_avg.full_tensor() etc. against the unsharded optimizer's state.
    assert_matches(results[0], model, opt)


def test_fsdp2_cpu_offload_steps_on_the_rust_core(fsdp_results: list[dict[str, Any]]) -> None:
    # backend="rust" raises for any local shard the core cannot take, so the case passing at all
    # (test above) means the offloaded step ran there; here: everything lived on the CPU.
    assert w.FSDP_CASES["offload-rust"]["backend"] == "rust"
    for r in fsdp_results:
        assert r["offload-rust"]["devices"] == {"cpu"}


# ---- DTensors the core cannot step shard by shard, in one process --------------------------


@pytest.fixture
def mesh_of_one() -> Any:
    """A 1-process gloo group (in-memory store) and its CPU mesh, destroyed afterwards."""
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_with_differently_placed_gradient(mesh_of_one: Any) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(3)
    values, grads = torch.randn(4, 3, generator=g), [torch.randn(4, 3, generator=g) for _ in "ab"]

    def dparam(backend: str) -> tuple[torch.nn.Parameter, Adam]:
        p = torch.nn.Parameter(distribute_tensor(values.clone(), mesh_of_one, [Shard(0)]))
        return p, Adam([p], lr=w.LR, weight_decay=WeightDecay(0.1), backend=backend)

    # A Replicate gradient for a Shard(0) parameter: torch's ops on the DTensors step it.
    p, opt = dparam("auto")
    q = torch.nn.Parameter(values.clone())
    ref = Adam([q], lr=w.LR, weight_decay=WeightDecay(0.1))
    for grad in grads:
        p.grad = distribute_tensor(grad, mesh_of_one, [Replicate()])
        q.grad = grad.clone()
        opt.step()
        ref.step()
    assert opt.state[p]["exp_avg"].placements == p.placements
    torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"].full_tensor(), ref.state[q]["exp_avg"])

    # backend="rust" refuses it, naming the parameter, and changes nothing.
    p, opt = dparam("rust")
    p.grad = distribute_tensor(grads[0], mesh_of_one, [Replicate()])
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*sharded like it"):
        opt.step()
    assert torch.equal(p.full_tensor(), values)


# ---- distributed checkpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dcp_results(runs: tuple[Path, dict[str, list[Any]]]) -> tuple[list[Any], list[Any]]:
    """The uninterrupted run, and the one resumed in fresh processes from its checkpoint."""
    out, saved = runs
    return saved["dcp_save"], run_ranks(["dcp_load"], out)["dcp_load"]


def test_dcp_resume_matches_uninterrupted_run(dcp_results: tuple[list[Any], list[Any]]) -> None:
    uninterrupted, resumed = dcp_results
    for r in resumed:
        assert r["layout"]["dtensor_states"]
        assert set(r["loaded"]["step"].values()) == {w.DCP_SAVE_AT}
        assert all(type(s) is int for s in r["loaded"]["step"].values())
    at_save, at_save_opt = w.single_process(w.DCP_OPT, steps=w.DCP_SAVE_AT)
    assert_matches(resumed[0]["loaded"], at_save, at_save_opt)
    # Same ranks, data and operations: the resumed run is the uninterrupted one, bit for bit.
    for key in ("params", "exp_avg", "exp_avg_sq", "step"):
        for a, b in zip(uninterrupted, resumed):
            assert a[key].keys() == b["final"][key].keys()
            for name in a[key]:
                assert torch.equal(
                    torch.as_tensor(b["final"][key][name]), torch.as_tensor(a[key][name])
                )
    model, opt = w.single_process(w.DCP_OPT)
    assert_matches(uninterrupted[0], model, opt)


def test_dcp_state_initialisation_under_fsdp2(dcp_results: tuple[list[Any], list[Any]]) -> None:
    # get_state_dict on a fresh optimizer steps once with zero gradients and lr = 0. Under
    # absolute decay that step still scales θ by (1 − λ), as the spec's θ·(1 − λ) has no α;
    # set_state_dict then loads the model after the optimizer, which undoes it (test above).
    lam = w.DCP_OPT["weight_decay"].weight_decay
    for r in dcp_results[1]:
        fresh, init = r["fresh"], r["initialised"]
        for name, p in fresh["params"].items():
            torch.testing.assert_close(init["params"][name], p * (1 - lam), rtol=0, atol=0)
            assert init["step"][name] == 1
            assert not init["exp_avg"][name].any() and not init["exp_avg_sq"][name].any()


# ---- the state initialisation of torch.distributed.checkpoint, in one process ---------------

BETAS = (0.9, 0.999)
LAMBDA = 0.1


@pytest.mark.parametrize("mode", ["none", "l2", "decoupled", "absolute"])
def test_dcp_state_initialisation_matches_torch(mode: str) -> None:
    """What ``get_state_dict`` does to a fresh optimizer, per weight-decay mode.

    It sets every gradient to zero and lr to 0, steps, and restores lr. Parameters stay unchanged
    except under absolute decay (θ ← θ·(1 − λ)); t becomes 1; the moments stay zero except under
    L2, where the gradient is λ·θ. torch.optim.Adam / AdamW do the same, so a run continued from
    there matches theirs.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    wd = {
        "none": WeightDecay(0.0),
        "l2": WeightDecay(LAMBDA, weight_decouple=False),
        "decoupled": WeightDecay(LAMBDA),
        "absolute": WeightDecay(LAMBDA, absolute=True),
    }[mode]
    model = w.make_model().double()
    before = [p.detach().clone() for p in model.parameters()]
    # optimized_update=False with the same ε is torch's formula.
    opt = Adam(model.parameters(), lr=w.LR, betas=BETAS, eps=1e-8, weight_decay=wd,
               optimized_update=False)  # fmt: skip
    get_state_dict(model, opt)
    assert opt.param_groups[0]["lr"] == w.LR
    for p, p0 in zip(model.parameters(), before):
        assert p.grad is None
        state = opt.state[p]
        assert state["step"] == 1
        want = p0 * (1 - LAMBDA) if mode == "absolute" else p0
        assert torch.equal(p.detach(), want)
        g = LAMBDA * p0 if mode == "l2" else torch.zeros_like(p0)
        torch.testing.assert_close(state["exp_avg"], (1 - BETAS[0]) * g, rtol=1e-15, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], (1 - BETAS[1]) * g * g, rtol=1e-15, atol=0)

    if mode == "absolute":
        return  # torch has no counterpart of absolute decay
    ref_model = w.make_model().double()
    torch_cls = torch.optim.AdamW if mode == "decoupled" else torch.optim.Adam
    ref = torch_cls(ref_model.parameters(), lr=w.LR, betas=BETAS, eps=1e-8,
                    weight_decay=wd.weight_decay)  # fmt: skip
    get_state_dict(ref_model, ref)
    for model_, opt_ in ((model, opt), (ref_model, ref)):
        for step in range(2):
            x, y = w.batch(step)
            opt_.zero_grad()
            F.mse_loss(model_(x.double()), y.double()).backward()
            opt_.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert opt.state[p]["step"] == int(ref.state[q]["step"]) == 3
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


# ---- the example ---------------------------------------------------------------------------


def test_example_trains_and_checkpoints_under_torchrun(tmp_path: Path) -> None:
    """examples/distributed.py as the README launches it (torchrun, 2 processes)."""
    example = Path(__file__).parents[1] / "examples" / "distributed.py"
    ckpt = tmp_path / "checkpoint"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(example), "--steps", "4", "--save-every", "2", "--checkpoint-dir", str(ckpt),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": _loopback_interface(), "OMP_NUM_THREADS": "1"}
    # Its own session, so a hung run is ended with everything torchrun started.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "[rustadam] saved step 4" in text, text[-4000:]
    assert (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
