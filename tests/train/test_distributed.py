"""``train`` under torchrun (sse_sam_fast.train.distributed): the checks, the split of
the global batch and of the test set, rank 0 alone writing, and the real thing,
``torchrun --nproc_per_node 2`` on gloo, against one process with the same global batch.

The torchrun tests start two Python processes per launch (about 10 s each on a
2-core machine, FSDP2's slower) and are marked ``long``: ``make test`` leaves them
out, ``make test-long`` runs them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sse_sam_fast.cli import main
from sse_sam_fast.train import distributed
from sse_sam_fast.train.config import OptionError
from sse_sam_fast.train.data import load_dataset
from sse_sam_fast.train.distributed import World, check_job, check_resume, class_hits
from sse_sam_fast.train.loop import _step_function, train
from tests.train.short_runs import digits, quiet

GROUPS = ("all", "many", "medium", "few", "head", "tail")
# README, "More than one GPU": a 2-process run's group accuracies lie within this of the
# 1-process run's with the same global batch (measured: equal at the default 30 epochs)
ACCURACY_TOLERANCE = 0.005


# ---- checks -------------------------------------------------------------------------------------

DDP2 = World(rank=0, size=2, strategy="ddp", backend="gloo")


def test_the_global_batch_must_divide_among_the_processes():
    check_job(64, None, DDP2)
    with pytest.raises(OptionError, match="65 is the global batch and does not divide among 2") as e:
        check_job(65, None, DDP2)
    assert e.value.option == "--batch-size"
    check_job(65, None, distributed.SINGLE)  # one process: any batch


def test_capture_is_refused_under_torchrun_and_auto_turns_it_off():
    with pytest.raises(OptionError, match="not supported under torchrun") as e:
        check_job(64, True, DDP2)
    assert e.value.option == "--capture"
    check_job(64, False, DDP2)
    check_job(64, None, DDP2)


@pytest.mark.parametrize(
    "saved, world, option, words",
    [
        ({"world_size": 2}, World(), "--resume", "written by 2 processes and this run has 1 process"),
        ({}, DDP2, "--resume", "written by 1 process and this run has 2 processes"),
        ({"world_size": 2, "strategy": "fsdp"}, DDP2, "--fsdp", "written with --fsdp; resume it with"),
        (
            {"world_size": 2, "strategy": "ddp"},
            World(0, 2, "fsdp", "gloo"),
            "--fsdp",
            "written without --fsdp; resume it without",
        ),
    ],
)
def test_resume_needs_the_layout_that_wrote_the_checkpoint(saved, world, option, words):
    with pytest.raises(OptionError, match=words) as e:
        check_resume(saved, world)
    assert e.value.option == option


def test_fsdp_without_torchrun_is_an_error_naming_it(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    code = None
    try:
        code = main(["train", "--fsdp", "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "argument --fsdp: shards the model over the processes of a torchrun job" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["compare", "--seeds", "1"]) == 2
    assert "compare runs in one process; launch train under torchrun" in capsys.readouterr().err


def test_an_explicit_cuda_index_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device("cpu") == torch.device("cpu")
    assert distributed.process_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(OptionError, match="pass --device cuda, not cuda:0") as e:
        distributed.process_device("cuda:0")
    assert e.value.option == "--device"


# ---- the split of the work ----------------------------------------------------------------------


def test_shards_of_a_global_batch_are_disjoint_and_cover_it():
    batch = torch.randperm(55)  # a short last batch: shards of 19, 18, 18
    shards = [World(r, 3, "ddp").shard(batch) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == sorted(batch.tolist())
    assert [len(s) for s in shards] == [19, 18, 18]


def test_plain_sgd_shards_of_unequal_size_average_to_the_batch_mean():
    """Under DDP the processes' gradients are averaged; a short last batch (3 samples on
    2 processes) must still step with the mean over its 3 samples, not the mean of the
    two shards' means. SGD with lr 1 moves the weights by minus the gradient, so the
    average of the two shards' moves is the averaged gradient."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 1])

    def moved(world, xs, ys, batch):
        model = torch.nn.Linear(5, 2)
        model.load_state_dict(start)
        base = torch.optim.SGD(model.parameters(), lr=1.0)
        loss_fn = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")
        run = SimpleNamespace(
            model=model, base=base, opt=None, loss_fn=loss_fn, tails=None, world=world, capture=False,
            cfg=SimpleNamespace(schedule="exact"),
        )  # fmt: skip
        _step_function(run)(xs, ys, *([] if batch is None else [batch]))
        return model.weight.detach() - start["weight"]

    start = torch.nn.Linear(5, 2).state_dict()
    whole = moved(distributed.SINGLE, x, y, None)
    shards = [
        moved(World(r, 2, "ddp"), World(r, 2, "ddp").shard(x), World(r, 2, "ddp").shard(y), 3) for r in (0, 1)
    ]
    torch.testing.assert_close((shards[0] + shards[1]) / 2, whole)


@pytest.mark.parametrize("size", [2, 3, 7])
def test_every_test_sample_counts_once_and_every_process_runs_as_many_forwards(size):
    """``class_hits`` of each rank without the all-reduce, summed by hand: the counts
    of the whole test set once (no sample padded in twice), and the same number of
    forwards on every rank (FSDP2's forward is a collective)."""
    pytest.importorskip("sklearn")
    data = load_dataset("digits-lt", 10.0)  # 500 test samples: 7 processes get 72, 72, ..., 68
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    forwards, hits, seen = [], 0, 0
    for rank in range(size):
        calls = []

        def forward(x, calls=calls):
            calls.append(len(x))
            return model(x)

        h, s = class_hits(forward, data, 10, World(rank, size), batch=50)
        hits, seen, forwards = hits + h, seen + s, forwards + [calls]
    with torch.no_grad():
        right = (model(data.x_test).argmax(1) == data.y_test).double()
    assert torch.equal(seen, torch.bincount(data.y_test, minlength=10).double())
    assert torch.equal(hits, torch.zeros(10, dtype=torch.float64).index_add_(0, data.y_test, right))
    assert len({len(calls) for calls in forwards}) == 1, forwards
    assert sum(map(sum, forwards)) == len(data.y_test)


# ---- in one process: a process group of one, and a rank other than 0 -------------------------


def _ignore(_: str) -> None:
    pass


@contextlib.contextmanager
def group_of_one(tmp_path):
    """A gloo process group of one process, as a caller's own group: ``train`` uses it
    and leaves it alone."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_process_group_of_one_trains_like_one_process(tmp_path):
    one = quiet(digits(epochs=3), tmp_path / "one")
    with group_of_one(tmp_path):
        ddp = quiet(digits(epochs=3), tmp_path / "ddp")
        assert dist.is_initialized()  # the caller's group survives the run
    assert one["world_size"] == 1 and one["distributed"] is None
    assert ddp["world_size"] == 1
    assert ddp["distributed"] == {"world_size": 1, "strategy": "ddp", "backend": "gloo"}
    assert ddp["capture"]["why"] == "auto: steps over several processes (torchrun) are not captured"
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert (ckpt["world_size"], ckpt["strategy"]) == (1, "ddp")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the same layout as one process
    for a, b in zip(ddp["epochs"], one["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in GROUPS:
        assert ddp["final"]["acc"][k] == pytest.approx(one["final"]["acc"][k], abs=ACCURACY_TOLERANCE)


def test_capture_through_the_cli_in_a_process_group_is_an_error_naming_it(tmp_path, capsys):
    argv = ["train", "--capture", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    with group_of_one(tmp_path), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --capture: is not supported under torchrun" in err
    assert not (tmp_path / "run").exists()


def test_a_rank_other_than_0_neither_writes_nor_logs(tmp_path, monkeypatch):
    """Rank 1's view of a run (its group here has one process, so no collective waits
    for a partner): it trains, and leaves no file and no line behind."""

    @contextlib.contextmanager
    def as_rank_1(device, fsdp=False):
        yield World(rank=1, size=1, strategy="ddp", backend="gloo")

    monkeypatch.setattr("sse_sam_fast.train.loop.session", as_rank_1)
    lines = []
    with group_of_one(tmp_path):
        results = train(digits(epochs=2), tmp_path / "run", plot=True, log=lines.append)
    assert results["finished"] and len(results["epochs"]) == 2
    assert not (tmp_path / "run").exists()
    assert lines == []


def test_fsdp_in_a_group_of_one_saves_full_state_and_resumes_bit_for_bit(tmp_path):
    """FSDP2 shards (of one process here): the checkpoint holds full tensors keyed as a
    one-process run's model, the momentum keyed by parameter name (DCP's layout), and a
    stopped and resumed run ends with the weights of one that never stopped."""
    lines = []
    with group_of_one(tmp_path):
        whole = train(
            digits(epochs=3, opt="sgd"), tmp_path / "whole", fsdp=True, plot=False, log=lines.append
        )
        train(digits(epochs=3, opt="sgd"), tmp_path / "cut", fsdp=True, stop_after=1, plot=False, log=_ignore)
        ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
        resumed = train(
            digits(epochs=3, opt="sgd"), tmp_path / "cut", fsdp=True, resume=ckpt, plot=False, log=_ignore
        )
    assert whole["distributed"]["strategy"] == "fsdp" and resumed["sessions"] == 2
    # the model as it was built, not fully_shard's FSDPSequential / FSDPLinear classes
    assert any("model: mlp, MLP (0.03M parameters, Linear classifier)" in line for line in lines), lines
    assert "processes: 1 (FSDP, gloo); global batch 64, 64 per process; only rank 0 logs and writes" in lines
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["strategy"] == "fsdp"
    assert all(type(t) is torch.Tensor for t in a["model"].values())  # full tensors, not DTensor shards
    assert list(a["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert set(a["optimizer"]["state"]) == set(a["model"])  # momentum by parameter name
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(
            a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]
        )


def test_fsdp_refuses_reuse_naming_it(tmp_path):
    with group_of_one(tmp_path), pytest.raises(OptionError, match="not supported with --fsdp") as e:
        quiet(digits(epochs=1, reuse=2), tmp_path / "run", fsdp=True)
    assert e.value.option == "--reuse"


@pytest.mark.parametrize("opt", ["sam", "imbsam", "ssesam"])
def test_fsdp_trains_the_sam_methods_as_one_process(opt, tmp_path):
    """The optimizer's FSDP2 strategy steps shards (issue 19): --fsdp with a SAM method
    in a group of one ends where the run without it ends."""
    with group_of_one(tmp_path):
        sharded = quiet(digits(epochs=2, opt=opt), tmp_path / "fsdp", fsdp=True)
    quiet(digits(epochs=2, opt=opt), tmp_path / "plain")
    assert sharded["distributed"]["strategy"] == "fsdp"
    a = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# ---- the real thing: torchrun, two gloo processes -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, logs: Path, *argv: str, seconds: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        # each rank's stdout and stderr in its own file under logs, to tell who printed what
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "sse_sam_fast",
        "train",
        *argv,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=seconds)


def _rank_logs(logs: Path, rank: int) -> tuple[str, str]:
    (out,) = logs.glob(f"**/attempt_0/{rank}/stdout.log")
    return out.read_text(), out.with_name("stderr.log").read_text()


@pytest.mark.long
def test_torchrun_two_processes_resume_and_match_one_process(tmp_path):
    """The default job (SSE-SAM on digits-LT, 30 epochs, batch 64), stopped after 15
    epochs and resumed under torchrun, against one process."""
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    argv = ["--device", "cpu", "--no-plot"]
    first = _torchrun(tmp_path, tmp_path / "logs1", "--out", str(run), "--stop-after", "15", *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["finished"] is False
    resumed = _torchrun(tmp_path, tmp_path / "logs2", "--resume", str(run), *argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    two = json.loads((run / "results.json").read_text())
    assert two["finished"] and two["sessions"] == 2
    assert two["world_size"] == 2
    assert two["distributed"] == {"world_size": 2, "strategy": "ddp", "backend": "gloo"}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "results.json"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["world_size"] == 2
    # one log, rank 0's: rank 1 printed nothing, in neither session
    for logs in ("logs1", "logs2"):
        out0, _ = _rank_logs(tmp_path / logs, 0)
        out1, err1 = _rank_logs(tmp_path / logs, 1)
        assert "processes: 2 (DDP, gloo); global batch 64, 32 per process" in out0
        assert out1 == "" and "Traceback" not in err1
    assert "resuming" in _rank_logs(tmp_path / "logs2", 0)[0]
    assert "final test accuracy after 30 epochs" in _rank_logs(tmp_path / "logs2", 0)[0]

    one = quiet(digits(epochs=None), tmp_path / "one")  # the default job: the same global batch, 64
    assert len(one["epochs"]) == len(two["epochs"]) == 30
    for a, b in zip(two["epochs"], one["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    # the reason they agree: 2 processes on halves of each batch step like 1 on the batch, up
    # to rounding (measured: 1.8e-5 apart after 30 epochs, weights of magnitude up to 0.6)
    _assert_same_job(run, two, tmp_path / "one", one, atol=1e-4)

    # the same checkpoint in one process: refused, naming both sizes, nothing changed
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run), "--no-plot"])
    assert e.value.code == 2
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.long
def test_torchrun_fsdp_two_processes_resume_and_match_one_process(tmp_path):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    argv = ["--fsdp", "--opt", "ssesam", "--epochs", "3", "--device", "cpu", "--no-plot"]
    first = _torchrun(tmp_path, tmp_path / "logs1", "--out", str(run), "--stop-after", "1", *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(tmp_path, tmp_path / "logs2", "--resume", str(run), *argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = json.loads((run / "results.json").read_text())
    assert two["finished"] and two["distributed"] == {"world_size": 2, "strategy": "fsdp", "backend": "gloo"}
    assert _rank_logs(tmp_path / "logs2", 1)[0] == ""
    one = quiet(digits(epochs=3, opt="ssesam"), tmp_path / "one")
    _assert_same_job(run, two, tmp_path / "one", one, atol=1e-5)


def _assert_same_job(two_dir: Path, two: dict, one_dir: Path, one: dict, atol: float) -> None:
    """A torchrun job and the one-process run: group accuracies within the README's
    tolerance, the saved weights within ``atol``."""
    for k in GROUPS:
        assert abs(two["final"]["acc"][k] - one["final"]["acc"][k]) <= ACCURACY_TOLERANCE, k
    two_w = torch.load(two_dir / "checkpoint.pt", weights_only=True)["model"]
    one_w = torch.load(one_dir / "checkpoint.pt", weights_only=True)["model"]
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=atol)


@pytest.mark.long
def test_torchrun_refuses_a_one_process_checkpoint_in_one_line(tmp_path):
    pytest.importorskip("sklearn")
    quiet(digits(epochs=1), tmp_path / "one")
    proc = _torchrun(tmp_path, tmp_path / "logs", "--resume", str(tmp_path / "one"), "--no-plot")
    assert proc.returncode != 0
    _, err0 = _rank_logs(tmp_path / "logs", 0)
    out1, err1 = _rank_logs(tmp_path / "logs", 1)
    errors = [line for line in err0.splitlines() if "error:" in line]
    assert errors == [
        "sse-sam-fast train: error: argument --resume: the checkpoint was written by 1 process and this "
        "run has 2 processes; resume it with one process, without torchrun"
    ]
    assert out1 == "" and "error" not in err1
