"""Count what one training step asks of the host, with torch.profiler.

    python benchmarks/profile_step.py --device cuda [--model resnet32] [--steps 5]

Per step, for eager SGD, SGD captured as one CUDA graph, and SSE-SAM (stage 1
and 2) through ``opt.step`` (exact) and ``opt.capture``: kernels run on the
device, kernel and graph launches made by the host, device-to-device copies,
device-to-host copies, host synchronisations (``cuda*Synchronize``; a
``.item()`` is one) and operators called from Python (top-level ``aten::``
ops; inside a replayed graph there are none). On a CPU only the operator count
is meaningful (a smoke test of the script; the captured rows run eagerly there).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from sse_sam_fast import SSESAM
from sse_sam_fast.bench import _graphed_sgd
from sse_sam_fast.train.models import MODELS
from sse_sam_fast.verify import per_sample_losses

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COLUMNS = ("kernels", "launches", "graph_launches", "dtod", "dtoh", "syncs", "ops")


def _under_aten(event) -> bool:
    """Whether an operator runs inside another (``aten::linear`` calls ``aten::addmm``)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def window(fn, steps: int, device: torch.device) -> dict[str, int]:
    """The events of ``steps`` calls of ``fn`` and one synchronisation, by kind."""
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    if gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if gpu:
            torch.cuda.synchronize(device)
    c = dict.fromkeys(COLUMNS, 0)
    for e in prof.events():
        name, on_device = e.name, e.device_type == torch.autograd.DeviceType.CUDA
        if on_device:
            if "DtoD" in name:
                c["dtod"] += 1
            elif "DtoH" in name:
                c["dtoh"] += 1
            elif "Memcpy" not in name and "Memset" not in name:
                c["kernels"] += 1
        elif name in LAUNCHES:
            c["launches"] += 1
        elif name == "cudaGraphLaunch":
            c["graph_launches"] += 1
        elif name in SYNCS:
            c["syncs"] += 1
        elif name.startswith("aten::") and not _under_aten(e):
            c["ops"] += 1
    return c


def per_step(fn, steps: int, device: torch.device, idle: dict[str, int]) -> dict[str, float]:
    """Events per call of ``fn``, less those of an empty window ``idle`` (the profiler's own)."""
    busy = window(fn, steps, device)
    return {k: (busy[k] - idle[k]) / steps for k in COLUMNS}


def steppers(model_name: str, device: torch.device, batch: int) -> dict:
    """name -> (one training step, its captured step or None), each on its own
    copy of the model, warmed up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    tail = (torch.rand(batch, generator=g) < 0.19).to(device)
    torch.manual_seed(0)
    model = MODELS[model_name](100).to(device).train()

    def sgd():
        m = copy.deepcopy(model)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)

    m, o = sgd()

    def sgd_step():
        o.zero_grad()
        per_sample_losses(m, x, y).mean().backward()
        o.step()

    out = {"sgd": (sgd_step, None)}
    if device.type == "cuda":
        out["sgd-graph"] = (_graphed_sgd(*sgd(), x, y), None)
    for stage in (1, 2):
        for how in ("exact", "captured"):
            m_s, base = sgd()
            opt = SSESAM(base, m_s, 0.05, 0.10, gamma=0.5, total_epochs=2)
            if stage == 2:
                opt.update_rho()
            losses = lambda xs, ys, m=m_s: per_sample_losses(m, xs, ys)  # noqa: E731
            if how == "exact":
                step = lambda o=opt, f=losses: o.step(lambda: f(x, y), tail)  # noqa: E731
                out[f"ssesam {stage} exact"] = (step, None)
            else:
                captured = opt.capture(losses)
                out[f"ssesam {stage} captured"] = (lambda c=captured: c(x, y, tail_mask=tail), captured)
    for fn, _ in out.values():
        for _ in range(8):  # warm-up; captured steps: eager warm-up, capture, check, replays
            fn()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet32", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, batch {args.batch}, on {name}; torch {torch.__version__}; per step of {args.steps}")
    print(f"{'step':<22}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'graphed':>9}")
    idle = window(lambda: None, args.steps, device)
    for label, (fn, captured) in steppers(args.model, device, args.batch).items():
        c = per_step(fn, args.steps, device, idle)
        graphed = "" if captured is None else "yes" if captured.graphed else "no"
        print(f"{label:<22}" + "".join(f"{c[k]:>15.1f}" for k in COLUMNS) + f"{graphed:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
