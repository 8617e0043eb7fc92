"""What an FSDP2 step costs on a CPU, as ratios to a plain SGD step, and what the
engine adds in collectives.

Two gloo processes on 127.0.0.1 train an MLP sharded with ``fully_shard`` (one
FSDP unit per layer, ``--layers`` layers of ``--width``): a plain SGD step
(forward, backward, ``optimizer.step()``), then SSE-SAM's exact step in stage
1 and stage 2 on each backend asked for. Reported per step, median over
``--steps`` after a warm-up, on rank 0: the time as a multiple of the SGD
step, the engine's all-reduces (``torch.distributed.all_reduce``: counts, the
normaliser, every group's norm at once, the perturbed passes' checks, the
verdict) and, for the flat backends, what mirroring the shards costs (one
multi-tensor copy in when a step starts, one out after each move). On a CPU
the numbers only mean something next to each other.

    python benchmarks/fsdp2_cpu.py [--steps 20] [--layers 24] [--width 128] [--backends reference torch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def _model(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(layers - 2):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def _sharded(layers: int, width: int) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = _model(layers, width)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    return fully_shard(model)


def _median(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, world: int, init: str, args) -> None:
    from sse_sam_fast import SSESAM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    tail = y >= 7
    rows = []

    model = _sharded(args.layers, args.width)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain():
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        sgd.zero_grad()

    base = _median(plain, args.steps)
    n_params = len(list(model.parameters()))
    for backend in args.backends:
        model = _sharded(args.layers, args.width)
        base_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = SSESAM(base_opt, model, 0.05, 0.1, gamma=0.5, total_epochs=2, backend=backend)
        step = lambda: opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
        for stage in (1, 2):
            if stage == 2:
                opt.update_rho()  # gamma * total_epochs = 1: stage 2, the head no longer perturbed
            calls = [0]
            original = dist.all_reduce

            def counted(*a, **k):
                calls[0] += 1
                return original(*a, **k)

            dist.all_reduce = counted
            step()
            dist.all_reduce = original
            t = _median(step, args.steps)
            mirror = ""
            buckets = getattr(opt._backend, "buckets", None)
            if buckets and buckets[0].shards is not None:
                moves = 3 if stage == 1 else 2  # pushes: each perturbation and the restore

                @torch.no_grad()
                def copies():
                    for b in buckets:
                        b.pull()
                        for _ in range(moves):
                            b.push()

                c = _median(copies, args.steps)
                mirror = f"{1e6 * c:.0f} us, {c / t:.2%} of the step"
            rows.append((backend, stage, t / base, calls[0], mirror))
    if rank == 0:
        print(f"{n_params} parameter tensors over 2 processes; plain SGD step: {1e3 * base:.1f} ms = 1.00x")
        for backend, stage, ratio, calls, mirror in rows:
            extra = f", mirroring the shards {mirror}" if mirror else ""
            print(f"SSE-SAM stage {stage}, {backend}: {ratio:.2f}x, {calls} all-reduces per step{extra}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["reference", "torch"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, f"file://{tmp}/pg", args), nprocs=2)


if __name__ == "__main__":
    main()
