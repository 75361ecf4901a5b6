"""Train a small MLP with FSDP2 and rustadam on several processes, checkpointing with DCP.

Every rank holds a shard of each parameter (``torch.distributed.fsdp.fully_shard``); rustadam
steps the local shards on its Rust core. The model learns a fixed random "teacher" network from
fresh random inputs, so the loss falls towards zero. Runs on CPU with the gloo backend::

    torchrun --nproc-per-node=2 examples/distributed.py                 # train, save a checkpoint
    torchrun --nproc-per-node=2 examples/distributed.py --resume        # continue from it

With ``--offload`` the shards live in CPU memory under FSDP2's ``CPUOffloadPolicy`` (on a GPU
machine the forward and backward would run on the GPU and the optimizer step on the CPU; here
everything is on the CPU and the optimizer step is the same). ``--optimizer`` takes several
names and trains a fresh model with each in turn, timing ``optimizer.step()``::

    torchrun --nproc-per-node=2 examples/distributed.py --offload --width 1024 --steps 30 \\
        --no-checkpoint --optimizer rustadam torch-fused torch-foreach
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from rustadam import Adam, WeightDecay

OPTIMIZERS = ("rustadam", "torch-fused", "torch-foreach")
WARMUP = 3  # steps left out of the timing (first-touch allocation of the state)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--width", type=int, default=64, help="hidden width of the MLP (default 64)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--batch", type=int, default=64, help="samples per rank and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) λ")
    p.add_argument("--offload", action="store_true", help="FSDP2 CPUOffloadPolicy")
    p.add_argument(
        "--optimizer", nargs="+", choices=OPTIMIZERS, default=["rustadam"], metavar="NAME",
        help=f"one or more of {', '.join(OPTIMIZERS)} (default rustadam)",
    )  # fmt: skip
    p.add_argument("--checkpoint-dir", type=Path, default=Path("out/distributed-checkpoint"))
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--no-checkpoint", action="store_true", help="neither save nor load")
    p.add_argument("--resume", action="store_true", help="load --checkpoint-dir and continue")
    return p.parse_args()


def make_model(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def shard(model: nn.Sequential, mesh: DeviceMesh, offload: bool) -> None:
    """One FSDP2 unit per linear layer, then the root."""
    # Pinned memory needs CUDA; CPU-only machines offload to plain CPU memory.
    kwargs: dict[str, Any] = {"mesh": mesh}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "rustadam":
        # optimized_update=False with eps=1e-8 is torch.optim.Adam's formula, for a fair timing.
        return Adam(
            model.parameters(),
            lr=args.lr,
            eps=1e-8,
            optimized_update=False,
            weight_decay=WeightDecay(args.weight_decay),
        )
    torch_cls = torch.optim.AdamW if args.weight_decay > 0 else torch.optim.Adam
    flag = {"torch-fused": "fused", "torch-foreach": "foreach"}[name]
    return torch_cls(
        model.parameters(), lr=args.lr, eps=1e-8, weight_decay=args.weight_decay, **{flag: True}
    )


def batch(step: int, rank: int, size: int, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's samples of a step: its own random inputs, the teacher's outputs."""
    g = torch.Generator().manual_seed(step * 1_000_003 + rank)
    x = torch.randn(size, 16, generator=g)
    with torch.no_grad():
        return x, 10 * teacher(x)


def save(model: nn.Module, opt: torch.optim.Optimizer, step: int, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save(
        {"model": model_sd, "optim": optim_sd, "meta": {"step": step}},
        storage_writer=dcp.FileSystemWriter(path, overwrite=True),
    )


def load(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> int:
    """Loads model and optimizer in place; returns the step the checkpoint was taken at."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "meta": {"step": 0}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return int(state["meta"]["step"])


def train(name: str, args: argparse.Namespace, mesh: DeviceMesh) -> list[float]:
    """Trains a fresh model with optimizer `name`; returns this rank's step times (seconds)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = make_model(args.width, args.depth, seed=1)
    model = make_model(args.width, args.depth)
    shard(model, mesh, args.offload)
    opt = make_optimizer(name, model, args)
    ckpt = None if args.no_checkpoint else args.checkpoint_dir.resolve()
    start = 0
    if ckpt is not None and args.resume:
        start = load(model, opt, ckpt)
        if rank == 0:
            print(f"[{name}] resumed from {ckpt} at step {start}")
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        local = sum(p.to_local().numel() for p in model.parameters())
        print(f"[{name}] {n:,} parameters, {local:,} on rank 0 of {world}")
    times: list[float] = []
    for step in range(start, start + args.steps):
        x, y = batch(step, rank, args.batch, teacher)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        done = step + 1
        if rank == 0 and (done % 50 == 0 or done in (start + 1, start + args.steps)):
            print(f"[{name}] step {done:5d}  loss {loss.item():.5f} (rank 0's batch)")
        if ckpt is not None and (done % args.save_every == 0 or done == start + args.steps):
            save(model, opt, done, ckpt)
            if rank == 0:
                print(f"[{name}] saved step {done} to {ckpt}")
    return times[WARMUP:]


def main() -> None:
    args = parse_args()
    if args.resume and args.no_checkpoint:
        raise SystemExit("--resume needs a checkpoint; drop --no-checkpoint")
    if not args.no_checkpoint and len(args.optimizer) > 1:
        raise SystemExit("several optimizers share one --checkpoint-dir; add --no-checkpoint")
    # torchrun sets OMP_NUM_THREADS=1 per process; rustadam uses torch's thread count.
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        rows = []
        for name in args.optimizer:
            times = train(name, args, mesh)
            if not times:
                continue
            # The slowest rank sets the pace.
            stats = torch.tensor([statistics.median(times), statistics.fmean(times)])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            rows.append((name, *stats.tolist()))
        if dist.get_rank() == 0 and rows:
            print(f"\noptimizer.step() over {len(times)} steps (after {WARMUP} warm-up), "
                  f"slowest rank, {torch.get_num_threads()} thread(s) per rank, "
                  f"offload={args.offload}:")  # fmt: skip
            for name, median, mean in rows:
                print(f"  {name:14s} median {median * 1e3:8.3f} ms   mean {mean * 1e3:8.3f} ms")
    finally:
        # Models, optimizers and the mesh hold gloo work in reference cycles; collect them
        # while the process group is alive rather than at interpreter exit (where gloo's
        # teardown can abort the process).
        mesh = rows = None
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node=2 " + __file__)
    main()
