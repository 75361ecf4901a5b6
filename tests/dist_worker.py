"""One rank of a 2-process gloo run for tests/test_distributed.py, and the shared model and data.

Run by the tests as ``python tests/dist_worker.py OUTDIR SCENARIO...`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; the parent process holds the TCPStore on
that port. Several scenarios share one launch (starting torch dominates their cost); each writes
what it observed to ``OUTDIR/SCENARIO-rankR.pt``, which the tests compare with a single-process
run of the same model on the full batch.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rustadam import Adam, WeightDecay

WORLD = 2
BATCH = 16  # split in equal halves, so the mean of the ranks' mean gradients is the full one
STEPS = 4
LR = 1e-2
TIMEOUT = timedelta(seconds=60)

# Optimizer settings per FSDP2 case; "rust" is strict, so it fails unless every local shard
# reaches the Rust core, and "torch" runs the per-parameter torch ops on the DTensors.
FSDP_CASES: dict[str, dict[str, Any]] = {
    "decoupled-rust": dict(weight_decay=WeightDecay(0.1), backend="rust"),
    "absolute": dict(weight_decay=WeightDecay(0.05, absolute=True)),
    "l2-textbook": dict(
        weight_decay=WeightDecay(0.1, weight_decouple=False), optimized_update=False
    ),
    "torch-path": dict(weight_decay=WeightDecay(0.1), backend="torch"),
    "offload-rust": dict(weight_decay=WeightDecay(0.1), backend="rust"),
}
DDP_OPT: dict[str, Any] = dict(weight_decay=WeightDecay(0.1))
ZERO_OPT: dict[str, Any] = dict(weight_decay=WeightDecay(0.1, weight_decouple=False))
# Absolute decay: DCP's state initialisation decays the parameters, and loading must undo that.
DCP_OPT: dict[str, Any] = dict(weight_decay=WeightDecay(0.05, absolute=True))
DCP_SAVE_AT = 2


def make_model() -> nn.Sequential:
    """Dim 0 of the layers: 5 (shards 3+2, uneven), 3 (2+1), 1 (1+0, rank 1's shard is empty)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step; rank r of `world` gets its r-th contiguous slice."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    n = BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    rank: int = 0,
    world: int = 1,
    set_to_none: bool = True,
) -> None:
    for step in steps:
        x, y = batch(step, rank, world)
        opt.zero_grad(set_to_none=set_to_none)
        F.mse_loss(model(x), y).backward()
        opt.step()


def zero_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups; the second holds one tensor, so one rank's share of it is empty."""
    params = list(model.parameters())
    return [{"params": params[:-1]}, {"params": params[-1:], "lr": 2 * LR}]


def single_process(
    opt_kwargs: dict[str, Any],
    steps: int = STEPS,
    groups: Callable[[nn.Module], Any] | None = None,
) -> tuple[nn.Module, Adam]:
    """The oracle: the unsharded model trained in one process on the full batch."""
    model = make_model()
    params = groups(model) if groups is not None else model.parameters()
    opt = Adam(params, lr=LR, **opt_kwargs)
    train(model, opt, range(steps))
    return model, opt


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (gathered) parameters and states, by parameter name."""
    out: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for name, p in model.named_parameters():
        out["params"][name] = _full(p)
        state = opt.state.get(p, {})
        if state:
            out["exp_avg"][name] = _full(state["exp_avg"])
            out["exp_avg_sq"][name] = _full(state["exp_avg_sq"])
            out["step"][name] = state["step"]
    return out


# ---- scenarios --------------------------------------------------------------------------------


def scenario_ddp(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result = {}
    for bucket_view in (False, True):
        model = DDP(make_model(), gradient_as_bucket_view=bucket_view)
        opt = Adam(model.parameters(), lr=LR, **DDP_OPT)
        # Keeping the gradients between steps keeps them views into DDP's buckets.
        train(model, opt, range(STEPS), rank, world, set_to_none=not bucket_view)
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        snap = snapshot(model.module, opt)
        snap["grad_storages"] = len(storages)
        result[f"bucket_view={bucket_view}"] = snap
    return result


def scenario_zero(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(zero_groups(model), optimizer_class=Adam, lr=LR, **ZERO_OPT)
    train(ddp, opt, range(STEPS), rank, world)
    result = snapshot(model, opt.optim)
    result["local_group_sizes"] = [len(g["params"]) for g in opt.optim.param_groups]
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        result["consolidated"] = opt.state_dict()
    return result


def _shard(model: nn.Module, **kwargs: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def _layout(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What the sharding looks like on this rank: local sizes, types, placements, devices."""
    from torch.distributed.tensor import DTensor

    layout: dict[str, Any] = {"local_numel": {}, "dtensor_states": True, "devices": set()}
    for name, p in model.named_parameters():
        layout["local_numel"][name] = p.to_local().numel()
        layout["devices"].add(str(p.to_local().device))
        if p.grad is not None:
            layout["devices"].add(str(p.grad.to_local().device))
        for key in ("exp_avg", "exp_avg_sq"):
            s = opt.state[p][key]
            layout["dtensor_states"] &= (
                isinstance(s, DTensor)
                and s.placements == p.placements
                and s.to_local().shape == p.to_local().shape
            )
    return layout


def scenario_fsdp(rank: int, world: int, out: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy

    result = {}
    for case, kwargs in FSDP_CASES.items():
        model = make_model()
        # Pinned memory needs CUDA; on a CPU-only machine offloading keeps plain CPU memory.
        policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if "offload" in case else {}
        _shard(model, **policy)
        opt = Adam(model.parameters(), lr=LR, **kwargs)
        train(model, opt, range(STEPS), rank, world)
        result[case] = {**snapshot(model, opt), **_layout(model, opt)}
    return result


def _dcp_model() -> tuple[nn.Module, Adam]:
    model = make_model()
    _shard(model)
    return model, Adam(model.parameters(), lr=LR, **DCP_OPT)


def scenario_dcp_save(rank: int, world: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _dcp_model()
    train(model, opt, range(DCP_SAVE_AT), rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=out / "checkpoint")
    train(model, opt, range(DCP_SAVE_AT, STEPS), rank, world)
    return snapshot(model, opt)


def scenario_dcp_load(rank: int, world: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _dcp_model()
    fresh = snapshot(model, opt)
    # On an optimizer without state this runs one step with zero gradients and lr = 0.
    model_sd, optim_sd = get_state_dict(model, opt)
    initialised = snapshot(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=out / "checkpoint")
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = snapshot(model, opt)
    layout = _layout(model, opt)
    train(model, opt, range(DCP_SAVE_AT, STEPS), rank, world)
    return {
        "fresh": fresh,
        "initialised": initialised,
        "loaded": loaded,
        "layout": layout,
        "final": snapshot(model, opt),
    }


SCENARIOS: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "ddp": scenario_ddp,
    "zero": scenario_zero,
    "fsdp": scenario_fsdp,
    "dcp_save": scenario_dcp_save,
    "dcp_load": scenario_dcp_load,
}


def main(out: Path, scenarios: list[str]) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Two ranks share a small machine: one thread each.
    torch.set_num_threads(1)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=False,
        timeout=TIMEOUT,
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    launched = float(os.environ.get("LAUNCHED_AT", time.time()))
    print(f"rank {rank}: joined after {time.time() - launched:.1f} s", flush=True)
    try:
        for scenario in scenarios:
            result = SCENARIOS[scenario](rank, world, out)
            torch.save(result, out / f"{scenario}-rank{rank}.pt")
            print(f"rank {rank}: {scenario} done after {time.time() - launched:.1f} s", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    # Everything is saved and the group is gone; skip the interpreter's slow teardown of torch.
    sys.stdout.flush()
    os._exit(0)
