"""Command-line interface: ``sse-sam-fast <command>`` or ``python -m sse_sam_fast <command>``.

``train``   trains one model on a long-tailed data set (digits, MNIST-1D, a Gaussian
            mixture, CIFAR-10/100-LT) with SGD, SAM, ImbSAM or SSE-SAM and reports Many /
            Medium / Few and head / tail accuracy; checkpoints every epoch.
``compare`` runs several methods over several seeds and tabulates mean ± std.
``verify``  checks a backend against the published algorithms on this machine.
``bench``   times SSE-SAM steps against SGD and the published schedule.

Each command is one ``_cmd_<name>(args, parser) -> int`` function registered in
:func:`build_parser`; the training application itself lives in :mod:`sse_sam_fast.train`,
and every choice offered here comes from one registry (:mod:`sse_sam_fast.train.registry`).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .train.config import FIELDS, OptionError, TrainConfig, check_read, default_device
from .train.distributed import is_main_process, launched
from .train.registry import (
    BACKENDS,
    DATASETS,
    IMAGE_MODELS,
    LOSSES,
    METHODS,
    MODELS,
    REUSE_POLICIES,
    SCHEDULES,
)


def _number(cast, low, what: str):
    """An argparse type: ``cast(text)``, finite and ``>= low``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1, "an integer >= 1")
_non_negative_int = _number(int, 0, "an integer >= 0")
_non_negative_float = _number(float, 0.0, "a finite number >= 0")


def _imb_factor(text: str) -> float:
    value = _non_negative_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (largest / smallest class size), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are the error and where to look: argparse prints the
    whole usage first (23 lines for ``train``), which pushes the one line that
    matters off the screen. The sub-commands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sse-sam-fast", description="Fast SAM, ImbSAM and SSE-SAM for long-tailed learning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(commands)
    _add_compare(commands)
    _add_verify(commands)
    _add_bench(commands)
    return parser


_DEFAULTS_EPILOG = """\
defaults by data set (each can be overridden):
  digits-lt, synthetic-lt: --model mlp --epochs 30 --batch-size 64 --lr 0.05 --momentum 0.9
      --weight-decay 5e-4; --imb-factor 10 (digits) / 100 (synthetic, 500 down to 5 samples)
  mnist1d-lt: the same with --epochs 40 --imb-factor 100 (1700 down to 17 samples); --model cnn1d
      for the MNIST-1D paper's CNN
  cifar10-lt, cifar100-lt: --model resnet32 --epochs 200 --batch-size 64 --lr 0.01 --momentum 0.9
      --weight-decay 1e-3 --imb-factor 100 (the published SSE-SAM / ImbSAM recipe)
  every data set: cosine LR decay per epoch; --rho 0.05 --head-rho 0.05 --tail-rho 0.1 --gamma 0.7
--eta (tail classes have fewer training samples): digits-lt 40; mnist1d-lt the Few threshold (68 at
  imbalance 100); cifar100-lt 100 (20 for imbsam); other profiles the Many threshold (the Few
  threshold for imbsam)
Many / Medium / Few: cifar100-lt n > 100 / 20..100 / n < 20 (the literature's); other profiles
  the same positions on their own profile (digits-lt: n > 54 / 25..54 / n < 25; mnist1d-lt:
  n > 340 / 68..340 / n < 68)
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``compare`` share. Every default is None here and
    filled in per data set by :func:`sse_sam_fast.train.config.resolve`, so that
    ``--resume`` can tell an option given on the command line from a default."""
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=tuple(DATASETS), help="long-tailed data set (default digits-lt)")
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        help="CIFAR root (cifar-10-batches-py/, cifar-100-python/); mnist1d-lt's cache (default ./data)",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="fetch missing CIFAR files with torchvision (needs torchvision)",
    )
    data.add_argument("--num-classes", type=_positive_int, help="classes of synthetic-lt (default 10)")
    data.add_argument("--imb-factor", type=_imb_factor, help="largest / smallest training class size")

    model = p.add_argument_group("model and loss")
    model.add_argument(
        "--model", choices=tuple(MODELS), help="mlp (flattens images), cnn1d (mnist1d-lt) or an image model"
    )
    model.add_argument("--hidden", type=_positive_int, help="MLP hidden width (default 128)")
    model.add_argument(
        "--loss",
        choices=tuple(LOSSES),
        help="ce; ldam (margins, s=30, cosine classifier, DRW); la (logit adjustment); vs (vector scaling) "
        "(default ce)",
    )
    model.add_argument(
        "--drw-epoch",
        type=_non_negative_int,
        help="ldam: train this many epochs unweighted, then class-balanced (default 80%% of --epochs)",
    )
    model.add_argument("--tau", type=_non_negative_float, help="la, vs: weight of log prior (default 1)")
    model.add_argument(
        "--vs-gamma", type=_non_negative_float, help="vs: exponent of (n_c / n_max)^gamma (default 0.2)"
    )

    opt = p.add_argument_group("optimizer")
    opt.add_argument("--rho", type=_non_negative_float, help="radius of sam and imbsam (default 0.05)")
    opt.add_argument("--head-rho", type=_non_negative_float, help="ssesam head radius (default 0.05)")
    opt.add_argument("--tail-rho", type=_non_negative_float, help="ssesam tail radius (default 0.1)")
    opt.add_argument(
        "--gamma",
        type=_unit_interval,
        help="fraction of the epochs before ssesam stops perturbing the head; 0 or 1: never (default 0.7)",
    )
    opt.add_argument(
        "--eta", type=_non_negative_float, help="tail classes have fewer training samples than this"
    )
    opt.add_argument("--epochs", type=_positive_int, help="training epochs")
    opt.add_argument("--batch-size", type=_positive_int, help="batch size")
    opt.add_argument("--lr", type=_non_negative_float, help="initial learning rate (cosine decay per epoch)")
    opt.add_argument("--momentum", type=_non_negative_float, help="SGD momentum")
    opt.add_argument("--weight-decay", type=_non_negative_float, help="SGD weight decay")
    opt.add_argument(
        "--backend", choices=BACKENDS, help="sse_sam_fast backend of sam, imbsam, ssesam (default auto)"
    )
    opt.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ASAM: perturb by rho*|w|^2 g/||w g|| (sam, imbsam, ssesam; default off)",
    )
    opt.add_argument(
        "--max-grad-norm", type=_positive_float, help="clip the gradient of each step to this global norm"
    )
    opt.add_argument(
        "--imbsam-normalization",
        choices=("batch", "group"),
        help="imbsam losses: sums over the batch, tail weight 2 (batch, default; the ImbSAM code) or each "
        "group's mean (group; the SSE-SAM repository's baseline)",
    )
    opt.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="opt.step schedule: exact (default: every pass sees the whole batch), split (each group's "
        "passes on its own samples; a variant for BatchNorm models), auto",
    )

    report = p.add_argument_group("reporting and machine")
    report.add_argument(
        "--many-thr", type=_non_negative_float, help="Many classes have more training samples than this"
    )
    report.add_argument("--few-thr", type=_non_negative_float, help="Few classes have fewer training samples")
    report.add_argument("--device", help=f"torch device (default {default_device()})")
    report.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch ops (default 1 for the MLP, which is too small for more; on a busy "
        "machine extra threads stall in OpenMP barriers; else torch's default)",
    )
    report.add_argument(
        "--quiet",
        action="store_true",
        help="train: no progress bar, no per-epoch lines; compare: no per-run lines",
    )
    report.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train on a long-tailed data set; report Many/Medium/Few and head/tail accuracy",
        description=(
            "Train one model with SGD, SAM, ImbSAM or SSE-SAM on a long-tailed training split and\n"
            "report per-class, Many/Medium/Few and head/tail accuracy on a balanced test split.\n"
            "Writes checkpoint.pt (every epoch), results.json and results.png to --out;\n"
            "--resume continues a run."
        ),
        epilog=_DEFAULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--opt", choices=tuple(METHODS), help="method (default ssesam)")
    train.add_argument(
        "--seed",
        type=_non_negative_int,
        help="seed of the init, shuffling, augmentation (and the digits / mnist1d-lt split)",
    )
    _add_run_options(train)
    train.add_argument(
        "--reuse",
        type=_positive_int,
        metavar="K",
        help="sam/imbsam/ssesam: compute each perturbation every K-th step and reuse it on the K-1 steps "
        "between, which skip its clean pass (default 1: every step)",
    )
    train.add_argument(
        "--reuse-policy",
        choices=REUSE_POLICIES,
        help="with --reuse K > 1, what the steps between reuse: perturbation (default: each group's kept "
        "move) or correction (the kept difference of the SAM gradient to the clean one, added to one "
        "clean pass: the passes of an SGD step)",
    )
    train.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drive the optimizer through opt.capture (one CUDA graph per step; on a CPU the same step "
        "runs eagerly). Default: on for sam/imbsam/ssesam on CUDA with the triton backend and the exact "
        "schedule, off otherwise; may change on --resume",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (fully_shard per block and at the root) instead "
        "of DistributedDataParallel replicas",
    )
    out = train.add_argument_group("outputs")
    out.add_argument("--out", metavar="DIR", help="output directory (default runs/<dataset>-<opt>-seed<k>)")
    out.add_argument("--overwrite", action="store_true", help="start over in an --out with an unfinished run")
    out.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run saved in DIR with its saved configuration (options given must agree, "
        "except --device, --backend, --threads, --data-dir, --capture)",
    )
    # stop as if killed after this epoch (tests of --resume)
    out.add_argument("--stop-after", type=_positive_int, help=argparse.SUPPRESS)
    # late checks (those that need the data) report as "sse-sam-fast train: error: ..."
    train.set_defaults(func=functools.partial(_cmd_train, parser=train))


def _add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="run sgd/sam/imbsam/ssesam over several seeds; tabulate mean ± std by group",
        description=(
            "Train each method with seeds 0..N-1 (runs in --out/<method>-seed<k>, reused or resumed\n"
            "when present) and write a mean ± std table of Many/Medium/Few/All and head/tail accuracy\n"
            "to stdout and --out/compare.md, with compare.json and compare.png. Head/tail use one eta\n"
            "for every method (--eta, else SSE-SAM's default) so the columns describe the same classes."
        ),
        epilog=_DEFAULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--seeds", type=_positive_int, default=5, help="seeds per method (default 5)")
    compare.add_argument(
        "--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS), help="methods (default all)"
    )
    _add_run_options(compare)
    compare.add_argument(
        "--reuse",
        dest="reuses",
        nargs="+",
        type=_positive_int,
        default=[1],
        metavar="K",
        help="train every sam-family method once per K (reuse=K); the table adds a row per K > 1",
    )
    compare.add_argument(
        "--reuse-policy",
        dest="reuse_policies",
        nargs="+",
        choices=REUSE_POLICIES,
        default=["perturbation"],
        metavar="POLICY",
        help=f"with --reuse K > 1, one row per policy ({', '.join(REUSE_POLICIES)}; default perturbation)",
    )
    compare.add_argument("--out", metavar="DIR", help="output directory (default runs/compare-<dataset>)")
    compare.set_defaults(func=functools.partial(_cmd_compare, parser=compare))


def _given(args: argparse.Namespace, fields: Sequence[str]) -> dict:
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def _run(parser: argparse.ArgumentParser, job) -> int:
    """Run ``job()``; a bad option becomes an argparse error (exit 2) naming it,
    a missing optional dependency a one-line error (exit 1)."""
    try:
        job()
    except OptionError as exc:
        if not is_main_process():  # under torchrun every process meets the error; rank 0 says it once
            return 2
        parser.error(f"argument {exc.option}: {exc}")
    except ImportError as exc:  # scikit-learn for the digits, torchvision for --download
        if is_main_process():
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.checkpoint import config_for_resume, load_checkpoint
    from .train.loop import train

    def job():
        given = _given(args, FIELDS)
        ckpt = None
        if args.resume is not None:
            if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
                raise OptionError("--out", f"a resumed run continues in its own directory {args.resume}")
            ckpt = load_checkpoint(args.resume)
            check_read([ckpt["config"]["opt"]], given)
            cfg = config_for_resume(ckpt, given)
            out = Path(args.resume)
        else:
            cfg = TrainConfig(**given)
            check_read([cfg.opt], given)
            out = Path(args.out or Path("runs") / f"{cfg.dataset}-{cfg.opt}-seed{cfg.seed}")
        train(
            cfg,
            out,
            resume=ckpt,
            stop_after=args.stop_after,
            download=args.download,
            quiet=args.quiet,
            plot=not args.no_plot,
            overwrite=args.overwrite,
            fsdp=args.fsdp,
        )

    return _run(parser, job)


def _cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.compare import compare

    if launched():
        if is_main_process():
            print(
                f"{parser.prog}: error: compare runs in one process; launch train under torchrun",
                file=sys.stderr,
            )
        return 2

    def job():
        given = _given(args, FIELDS)
        check_read(args.methods, given)
        base = TrainConfig(**given)
        out = Path(args.out or Path("runs") / f"compare-{base.dataset}")
        compare(
            base,
            out,
            seeds=args.seeds,
            methods=args.methods,
            reuse=args.reuses,
            reuse_policies=args.reuse_policies,
            download=args.download,
            plot=not args.no_plot,
            quiet=args.quiet,
        )

    return _run(parser, job)


def _add_verify(commands) -> None:
    verify = commands.add_parser(
        "verify",
        help="check a backend against the published algorithms on this machine",
        description=(
            "Run the parity matrix (SAM, ImbSAM, SSE-SAM x an MLP and a BatchNorm CNN x both APIs x "
            "dtypes, plus empty groups, frozen/unused parameters, Adam, param groups, ASAM, clipping) of "
            "a backend against the published code, transcribed independently of the engine in "
            "sse_sam_fast/published.py, on the same device. Each row prints the tolerance it is held "
            "to. Exits 1 if any case fails."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verify.add_argument("--backend", choices=BACKENDS, default="auto")
    verify.add_argument("--device", default=default_device(), help="torch device")
    verify.add_argument("--steps", type=_positive_int, default=6, help="optimizer steps per case")
    verify.add_argument(
        "--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), default=["float32", "bfloat16"]
    )
    verify.add_argument(
        "--capture",
        action="store_true",
        help="also verify opt.capture() (CUDA graphs on CUDA with the triton backend, eager elsewhere)",
    )
    verify.set_defaults(func=functools.partial(_cmd_verify, parser=verify))


def _usable_device(text: str, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {text!r} is not usable here: {e}")
    return device


def _cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from .backends import resolve_backend
    from .verify import format_results, verify

    device = _usable_device(args.device, parser)
    backend = resolve_backend(args.backend, [torch.empty(0, device=device)])
    interpreter = None
    if backend == "triton" and device.type != "cuda":
        # without a GPU the kernels run through Triton's interpreter (set before triton loads)
        if os.environ.get("TRITON_INTERPRET") == "1":
            interpreter = "Triton interpreter on (TRITON_INTERPRET=1 was already set)"
        elif "triton" in sys.modules:
            parser.error("--backend triton on a CPU device needs TRITON_INTERPRET=1 set before triton loads")
        else:
            os.environ["TRITON_INTERPRET"] = "1"
            interpreter = "Triton interpreter turned on by verify (TRITON_INTERPRET=1): no CUDA device"
    dtypes = [getattr(torch, d) for d in args.dtypes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"verify backend={backend} on {device} ({name}), {args.steps} steps per case; "
        f"torch {torch.__version__}; ground truth: the published code (sse_sam_fast/published.py)"
    )
    if interpreter:
        print(interpreter)
    apis = ("step", "official", "capture") if args.capture else ("step", "official")
    results = verify(backend, str(device), args.steps, dtypes, apis)
    print(format_results(results))
    failed = sum(not r.diff.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time SSE-SAM steps: SGD vs the published schedule vs this library",
        description="Whole-step timing (CIFAR-100 shapes) of SSE-SAM (both stages), SAM and ImbSAM "
        "as ratios to an eager SGD step, to SGD captured as one CUDA graph (GPU) and to the published "
        "schedule: opt.step (exact, split) and opt.capture (graphed on CUDA, eager elsewhere); and the "
        "optimizer side alone with bytes moved. Absolute times, bandwidth and peak memory on a GPU only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--device", default=default_device(), help="torch device")
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
        choices=tuple(IMAGE_MODELS),
        default=None,
        help="models (default: resnet32, resnet32-gn, vit; and resnet34 on a GPU)",
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        choices=("ssesam", "sam", "imbsam"),
        default=None,
        help="whole-step tables: ssesam (stages 1 and 2), sam, imbsam (default: all; ssesam with --quick)",
    )
    bench.add_argument("--quick", action="store_true", help="the first model only, ssesam only")
    bench.add_argument(
        "--out", default="runs/bench", help="directory for bench.json and bench.png ('' for none)"
    )
    bench.set_defaults(func=functools.partial(_cmd_bench, parser=bench))


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import run_bench

    _usable_device(args.device, parser)
    return run_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    return args.func(args)
