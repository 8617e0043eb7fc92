"""Command-line interface: ``sse-sam-fast <command>`` or ``python -m sse_sam_fast <command>``.

``train``  trains a small MLP on long-tailed digits with SGD, SAM, ImbSAM or
           SSE-SAM and prints overall, head and tail accuracy.
``verify`` checks a backend against the published algorithms on this machine.
``bench``  times SSE-SAM steps against SGD and the published schedule.

Each command is one ``_cmd_<name>(args, parser) -> int`` function registered in
:func:`build_parser`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import SAM, SSESAM, ImbSAM, __version__, tail_classes, tail_mask
from .models import mlp

OPTIMIZERS = ("sgd", "sam", "imbsam", "ssesam")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _imb_factor(text: str) -> float:
    value = _non_negative_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (largest / smallest class size), got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-sam-fast", description="Fast SAM, ImbSAM and SSE-SAM for long-tailed learning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train an MLP on long-tailed digits and report head and tail accuracy",
        description=(
            "Train a small MLP on scikit-learn's bundled 8x8 digits, made long-tailed "
            "(class 0 the most frequent), and report overall, head and tail accuracy on "
            "a balanced test split."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--opt", choices=OPTIMIZERS, default="ssesam", help="optimizer")
    train.add_argument(
        "--backend",
        choices=("auto", "torch", "reference"),
        default="auto",
        help="sse_sam_fast backend (ignored by sgd)",
    )
    train.add_argument("--epochs", type=_positive_int, default=30, help="training epochs")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="batch size")
    train.add_argument("--hidden", type=_positive_int, default=128, help="MLP hidden width")
    train.add_argument("--lr", type=_non_negative_float, default=0.05, help="initial LR (cosine decay)")
    train.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum")
    train.add_argument("--weight-decay", type=_non_negative_float, default=5e-4, help="SGD weight decay")
    train.add_argument("--rho", type=_non_negative_float, default=0.05, help="radius (sam, imbsam)")
    train.add_argument("--head-rho", type=_non_negative_float, default=0.05, help="head radius (ssesam)")
    train.add_argument("--tail-rho", type=_non_negative_float, default=0.1, help="tail radius (ssesam)")
    train.add_argument(
        "--gamma",
        type=_unit_interval,
        default=0.7,
        help="fraction of the epochs before ssesam stops perturbing the head (0 or 1: never)",
    )
    train.add_argument(
        "--imb-factor", type=_imb_factor, default=10.0, help="largest / smallest training class size"
    )
    train.add_argument(
        "--eta",
        type=_non_negative_float,
        default=40.0,
        help="tail classes are those with fewer training samples than this",
    )
    train.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the data split, init and shuffling"
    )
    train.add_argument("--device", default=_default_device(), help="torch device")
    train.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch ops (the MLP is too small for more to pay; on a busy machine "
        "extra threads stall in OpenMP barriers)",
    )
    # late checks (those that need the data) report as "sse-sam-fast train: error: ..."
    train.set_defaults(func=functools.partial(_cmd_train, parser=train))
    _add_verify(commands)
    _add_bench(commands)
    return parser


def _add_verify(commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check a backend against the published algorithms on this machine",
        description=(
            "Run the parity matrix (SAM, ImbSAM, SSE-SAM x an MLP and a BatchNorm CNN x both APIs x "
            "dtypes, plus empty groups, frozen/unused parameters, Adam, param groups) of a backend "
            "against the published training loop on the reference backend, on the same device. "
            "Exits 1 if any case fails."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verify.add_argument("--backend", choices=("auto", "torch", "triton", "reference"), default="auto")
    verify.add_argument("--device", default=_default_device(), help="torch device")
    verify.add_argument("--steps", type=_positive_int, default=6, help="optimizer steps per case")
    verify.add_argument(
        "--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=["float32", "bfloat16"]
    )
    verify.set_defaults(func=functools.partial(_cmd_verify, parser=verify))


def _cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from .backends import resolve_backend
    from .verify import format_results, verify

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device!r} is not usable here: {e}")
    backend = resolve_backend(args.backend, [torch.empty(0, device=device)])
    if backend == "triton" and device.type != "cuda":
        # without a GPU the kernels run through Triton's interpreter (set before triton loads)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--backend triton on a CPU device needs TRITON_INTERPRET=1 set before triton loads")
        os.environ["TRITON_INTERPRET"] = "1"
    dtypes = [getattr(torch, d) for d in args.dtypes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"verify backend={backend} on {device} ({name}), {args.steps} steps per case; "
        f"torch {torch.__version__}"
    )
    results = verify(backend, str(device), args.steps, dtypes)
    print(format_results(results))
    failed = sum(not r.diff.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time SSE-SAM steps: SGD vs the published schedule vs this library",
        description="Whole-step timing (CIFAR-100 shapes) as ratios to SGD and to the published "
        "4F+4B schedule, and the optimizer side alone with bytes moved; absolute times, "
        "bandwidth and peak memory on a GPU only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--device", default=_default_device(), help="torch device")
    bench.add_argument("--batch", type=_positive_int, default=128)
    bench.add_argument("--tail-frac", type=_unit_interval, default=0.19, help="fraction of tail samples")
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps per schedule")
    bench.add_argument("--warmup", type=_non_negative_int, default=2)
    bench.add_argument(
        "--part",
        choices=("whole", "optimizer", "all"),
        default="all",
        help="whole steps, the optimizer side alone, or both",
    )
    bench.add_argument(
        "--models",
        nargs="+",
        choices=("resnet32", "resnet32-gn", "vit", "resnet34"),
        default=None,
        help="models (default: resnet32, resnet32-gn, vit; and resnet34 on a GPU)",
    )
    bench.add_argument("--quick", action="store_true", help="the first model only")
    bench.add_argument(
        "--out", default="runs/bench", help="directory for bench.json and bench.png ('' for none)"
    )
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


# ---- train ----------------------------------------------------------------------------------


def _build_optimizer(args: argparse.Namespace, model: nn.Module):
    """``(base, wrapper)``; ``wrapper`` is None for plain SGD."""
    base = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    if args.opt == "sgd":
        return base, None
    if args.opt == "sam":
        return base, SAM(base, model, args.rho, backend=args.backend)
    if args.opt == "imbsam":
        return base, ImbSAM(base, model, args.rho, backend=args.backend)
    return base, SSESAM(
        base, model, args.head_rho, args.tail_rho, args.gamma, args.epochs, backend=args.backend
    )


def _per_sample_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


@torch.no_grad()
def _per_class_accuracy(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    model.eval()
    correct = (model(x).argmax(1) == y).to(torch.float64)
    model.train()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    return (hits / torch.bincount(y, minlength=num_classes).clamp_min(1)).cpu()


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train(args, parser)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import digits_lt

    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # unknown or unavailable device
        parser.error(f"argument --device: cannot use {args.device!r}: {exc}")
    try:
        x_train, y_train, x_test, y_test = digits_lt(args.imb_factor, seed=args.seed)
    except ImportError as exc:
        print(f"sse-sam-fast train: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the data set is too small for this imbalance
        parser.error(f"argument --imb-factor: {exc}")
    num_classes = int(y_train.max()) + 1
    counts = torch.bincount(y_train, minlength=num_classes)
    tails = tail_classes(counts, args.eta)
    if tails.numel() in (0, num_classes):
        parser.error(
            f"argument --eta: eta={args.eta:g} makes {'no' if tails.numel() == 0 else 'every'} class a "
            f"tail class (training counts {counts.tolist()}); choose eta in "
            f"({int(counts.min())}, {int(counts.max())}]"
        )
    tail_set = set(tails.tolist())
    heads = [c for c in range(num_classes) if c not in tail_set]

    torch.manual_seed(args.seed)
    model = mlp(x_train.shape[1], num_classes, args.hidden).to(device)
    base, opt = _build_optimizer(args, model)
    # per-epoch cosine decay on the base optimizer: the wrapper shares its param_groups
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=args.epochs)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test, y_test = x_test.to(device), y_test.to(device)
    tails = tails.to(device)
    shuffle = torch.Generator().manual_seed(args.seed)

    print(
        f"data: digits-LT imb_factor={args.imb_factor:g}, {len(y_train)} train / {len(y_test)} test "
        f"(balanced); train counts {counts.tolist()}"
    )
    print(f"tail classes (count < eta={args.eta:g}): {sorted(tail_set)}; head classes: {heads}")
    name = "SGD" if opt is None else f"{type(opt).__name__} (backend {opt.backend})"
    arch = f"mlp({x_train.shape[1]}, {num_classes}, hidden={args.hidden})"
    print(f"model: {arch}; optimizer: {name}; device: {device}")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        stage = f"  stage {opt.stage}" if isinstance(opt, SSESAM) else ""
        total = torch.zeros((), device=device)
        for idx in torch.randperm(len(y_train), generator=shuffle).split(args.batch_size):
            idx = idx.to(device)
            x, y = x_train[idx], y_train[idx]
            if opt is None:
                base.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                base.step()
            else:
                loss = opt.step(functools.partial(_per_sample_loss, model, x, y), tail_mask(y, tails))
            total += loss.detach() * len(y)
        if isinstance(opt, SSESAM):
            opt.update_rho()
        schedule.step()
        loss = float(total) / len(y_train)
        acc = _per_class_accuracy(model, x_test, y_test, num_classes).mean()
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  test acc {acc:.4f}{stage}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start

    per_class = _per_class_accuracy(model, x_test, y_test, num_classes)
    print(f"{'overall accuracy':<18}{per_class.mean():.4f}")
    print(f"{'head accuracy':<18}{per_class[heads].mean():.4f}  (classes {heads})")
    print(f"{'tail accuracy':<18}{per_class[sorted(tail_set)].mean():.4f}  (classes {sorted(tail_set)})")
    print(f"{'wall time':<18}{wall:.2f} s  ({args.epochs} epochs, evaluation included)")
    return 0
