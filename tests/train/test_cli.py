"""The ``train`` and ``compare`` commands: output, exit codes, resume, errors that name the option.

The data sets are tested in test_data.py, the loop itself in test_loop.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.short_runs import write_fake_cifar

pytest.importorskip("sklearn", reason="the CLI's default data set needs the cli extra (scikit-learn)")

from sse_sam_fast.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("all", "many", "medium", "few", "head", "tail")


def _accuracies(out: str) -> dict[str, float]:
    """The final table: ``<group>  <accuracy>%  <classes>  ...``, as fractions."""
    return {k: float(re.search(rf"^{k}\s+([0-9.]+)%", out, re.M).group(1)) / 100 for k in GROUPS}


def _train(tmp_path: Path, *argv: str) -> int:
    return main(["train", "--out", str(tmp_path / "run"), "--no-plot", *argv])


# ---- train ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "sam", "imbsam", "ssesam"])
def test_train_each_optimizer(opt, tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "2", "--opt", opt, "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^epoch\s+\d+/2\s+loss [0-9.]+\s+lr [0-9.e-]+\s+test acc [0-9.]+", out, re.M)) == 2
    assert "tail classes (count < eta=40): 5-9; head classes: 0-4" in out
    assert "groups: many (n > 54): 0-3; medium: 4-6; few (n < 25): 7-9" in out
    acc = _accuracies(out)
    assert all(0 <= v <= 1 for v in acc.values())
    assert math.isclose(acc["all"], (acc["head"] + acc["tail"]) / 2, abs_tol=1e-3)
    assert math.isclose(acc["all"], (4 * acc["many"] + 3 * acc["medium"] + 3 * acc["few"]) / 10, abs_tol=1e-3)
    assert re.search(r"^wall time [0-9.]+ s for 2 epochs", out, re.M)


@pytest.mark.parametrize(
    "argv",
    [
        ["--opt", "ssesam", "--adaptive", "--head-rho", "0.5", "--tail-rho", "1", "--max-grad-norm", "1"],
        ["--opt", "imbsam", "--imbsam-normalization", "group", "--adaptive"],
    ],
)
def test_train_takes_the_sam_family_options(argv, tmp_path, capsys):
    from sse_sam_fast.train import registry
    from sse_sam_fast.train.config import TrainConfig

    built = []
    real = dict(registry.METHODS)

    def keep(make):
        return lambda base, model, cfg: built.append(make(base, model, cfg)) or built[-1]

    for name in ("imbsam", "ssesam"):
        registry.METHODS[name] = keep(real[name])
    try:
        assert _train(tmp_path, "--epochs", "1", "--device", "cpu", *argv) == 0
    finally:
        registry.METHODS.update(real)
    opt = built[0]
    assert opt.adaptive is True
    if "--max-grad-norm" in argv:
        assert opt.max_grad_norm == 1.0
    else:
        assert opt.normalization == "group" and opt.max_grad_norm is None
    assert "test acc" in capsys.readouterr().out
    assert TrainConfig().imbsam_normalization == "batch"


def test_train_ssesam_switches_stage(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "4", "--gamma", "0.5", "--backend", "reference") == 0
    stages = re.findall(r"^epoch.*stage (\d)$", capsys.readouterr().out, re.M)
    assert stages == ["1", "1", "2", "2"]


def test_train_defaults_are_fast_and_learn_the_tail(tmp_path, capsys, monkeypatch):
    # measured with the defaults: tail accuracy 0.86-0.90 over seeds 0-4 (chance 0.1)
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    acc = _accuracies(out)
    assert acc["tail"] > 0.7 and acc["head"] > 0.9
    run = tmp_path / "runs" / "digits-lt-ssesam-seed0"  # the default --out
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "results.json", "results.png"}
    assert json.loads((run / "results.json").read_text())["wall_time_s"] < 10


def test_train_quiet_and_no_progress_bar_off_a_terminal(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "2", "--quiet") == 0
    captured = capsys.readouterr()
    assert "epoch " not in captured.out and "many " in captured.out
    assert captured.err == ""
    assert _train(tmp_path, "--epochs", "2") == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar


def test_train_on_synthetic_data_with_many_classes(tmp_path, capsys):
    argv = ["--dataset", "synthetic-lt", "--num-classes", "40", "--epochs", "1", "--opt", "imbsam"]
    assert _train(tmp_path, *argv) == 0
    out = capsys.readouterr().out
    assert "40 classes" in out and "tail classes (count < eta=20)" in out


def test_train_on_fake_cifar100(tmp_path, capsys):
    root = write_fake_cifar(tmp_path / "data", "cifar100-lt", per_class=6, test_per_class=1)
    base = ["--dataset", "cifar100-lt", "--data-dir", str(root), "--model", "mlp", "--hidden", "8"]
    base += ["--imb-factor", "3", "--epochs", "1", "--loss", "la"]
    # the literature's thresholds (100, 20) leave Many and Medium empty on 6 images per class
    with pytest.raises(SystemExit) as exc:
        _train(tmp_path, *base)
    assert exc.value.code == 2 and "argument --many-thr" in capsys.readouterr().err
    assert _train(tmp_path, *base, "--many-thr", "4", "--few-thr", "3", "--eta", "4") == 0
    out = capsys.readouterr().out
    assert "100 classes" in out and "loss: la" in out


@pytest.mark.parametrize("model", ["resnet32-gn", "vit"])
def test_train_image_models_the_parser_once_refused(model, tmp_path, capsys):
    root = write_fake_cifar(tmp_path / "data", per_class=8, test_per_class=1)
    argv = ["--dataset", "cifar10-lt", "--data-dir", str(root), "--imb-factor", "2", "--model", model]
    assert _train(tmp_path, *argv, "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet") == 0
    assert f"model: {model}, " in capsys.readouterr().out


def test_train_leaves_thread_count_alone(tmp_path):
    before = torch.get_num_threads()
    assert _train(tmp_path, "--epochs", "1", "--opt", "sgd", "--threads", "1") == 0
    assert torch.get_num_threads() == before


def test_stop_and_resume_through_the_cli_equals_one_run(tmp_path, capsys):
    common = ["--epochs", "3", "--gamma", "0.5", "--no-plot"]
    assert main(["train", "--out", str(tmp_path / "full"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "cut"), *common, "--stop-after", "1"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and re.findall(r"^epoch\s+(\d)/3", out, re.M) == ["2", "3"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--imb-factor", "0.5"], "--imb-factor"),
        (["--imb-factor", "500"], "--imb-factor"),
        (["--eta", "5"], "--eta"),  # every class has >= 12 samples: no tail class
        (["--eta", "1000"], "--eta"),  # no head class
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--gamma", "1.5"], "--gamma"),
        (["--tail-rho", "-0.1"], "--tail-rho"),
        (["--opt", "adam"], "--opt"),
        (["--dataset", "imagenet-lt"], "--dataset"),
        (["--model", "vit"], "--model"),
        (["--loss", "focal"], "--loss"),
        (["--schedule", "fastest"], "--schedule"),
        (["--seed", "-1"], "--seed"),
        (["--device", "nosuchdevice"], "--device"),
        (["--model", "resnet32"], "--model"),  # digits are feature vectors
        (["--num-classes", "5"], "--num-classes"),  # synthetic-lt only
        (["--drw-epoch", "3"], "--drw-epoch"),  # ldam only
        (["--many-thr", "500"], "--many-thr"),  # leaves Many empty
        (["--few-thr", "2"], "--few-thr"),  # leaves Few empty
        (["--dataset", "cifar10-lt", "--data-dir", "/nonexistent/cifar"], "--data-dir"),
        (["--max-grad-norm", "0"], "--max-grad-norm"),
        (["--opt", "sgd", "--adaptive"], "--adaptive"),
        (["--opt", "sgd", "--max-grad-norm", "1"], "--max-grad-norm"),
        (["--opt", "ssesam", "--imbsam-normalization", "group"], "--imbsam-normalization"),
        (["--imbsam-normalization", "mean"], "--imbsam-normalization"),
        # options the method does not read, even at their default values
        (["--opt", "sgd", "--head-rho", "0.3"], "--head-rho"),
        (["--opt", "ssesam", "--rho", "0.05"], "--rho"),
        (["--opt", "sam", "--gamma", "0.5"], "--gamma"),
        (["--opt", "imbsam", "--tail-rho", "0.1"], "--tail-rho"),
        (["--opt", "sgd", "--backend", "torch"], "--backend"),
        (["--opt", "sgd", "--schedule", "exact"], "--schedule"),
        (["--opt", "sgd", "--no-adaptive"], "--adaptive"),
    ],
)
def test_train_rejects_bad_arguments(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _train(tmp_path, *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # the error and where to look, not the 23 lines of usage above it
    first, *rest = err.splitlines()
    assert first.startswith(f"sse-sam-fast train: error: argument {option}")
    assert rest == ["(`sse-sam-fast train --help` lists the options)"]
    assert not (tmp_path / "run").exists()


def test_an_unread_option_names_the_methods_that_read_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(tmp_path, "--opt", "sgd", "--head-rho", "0.3")
    err = capsys.readouterr().err
    assert "argument --head-rho: applies to --opt ssesam only; --opt sgd ignores it" in err
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "sgd", "sam", "--gamma", "0.5", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "argument --gamma: applies to --opt ssesam only; --methods sgd sam ignore it" in err
    # an SGD run resumed with an option SGD does not read
    assert _train(tmp_path, "--opt", "sgd", "--epochs", "2", "--stop-after", "1") == 0
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path / "run"), "--rho", "0.05"])
    err = capsys.readouterr().err
    assert "argument --rho: applies to --opt sam, imbsam only; --opt sgd ignores it" in err


def test_rerun_into_a_finished_run_of_another_configuration(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    with pytest.raises(SystemExit) as exc:
        _train(tmp_path, "--epochs", "1", "--head-rho", "0.1")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "finished run with --head-rho 0.05 (this run: --head-rho 0.1)" in err
    assert _train(tmp_path, "--epochs", "1", "--head-rho", "0.1", "--overwrite") == 0
    assert _train(tmp_path, "--epochs", "1", "--head-rho", "0.1") == 0  # the same configuration
    assert "replacing the finished run" in capsys.readouterr().out


def test_missing_cifar_says_where_to_put_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(tmp_path, "--dataset", "cifar10-lt", "--data-dir", str(tmp_path / "d"))
    err = capsys.readouterr().err
    assert str((tmp_path / "d" / "cifar-10-batches-py").resolve()) in err
    assert "data_batch_1" in err and "test_batch" in err and "--download" in err


def test_download_without_torchvision(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(SystemExit):
        _train(tmp_path, "--dataset", "cifar10-lt", "--data-dir", str(tmp_path / "d"), "--download")
    err = capsys.readouterr().err
    assert "argument --download" in err and "pip install torchvision" in err


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("")
    with pytest.raises(SystemExit):
        main(["train", "--out", str(target)])
    assert "argument --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, option",
    [
        (lambda run: (run / "checkpoint.pt").write_bytes(b"\x00" * 100), "--resume"),
        (lambda run: (run / "checkpoint.pt").unlink(), "--resume"),
        (lambda run: None, "--lr"),  # a different --lr than the saved run's
    ],
)
def test_resume_errors(setup, option, tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "2", "--stop-after", "1") == 0
    setup(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.2"])
    assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_sklearn_missing_is_reported(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    assert _train(tmp_path, "--epochs", "1") == 1
    assert "sse_sam_fast[cli]" in capsys.readouterr().err


# ---- compare -------------------------------------------------------------------------------------


def test_compare_prints_and_writes_a_table(tmp_path, capsys):
    argv = ["compare", "--seeds", "2", "--methods", "sgd", "ssesam", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/4\] (sgd|ssesam)\s+seed \d", out, re.M)) == 4
    rows = re.findall(r"^\| (sgd|ssesam) \|(.*)\|$", out, re.M)
    assert [r[0] for r in rows] == ["sgd", "ssesam"]
    assert all(len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", r[1])) == 7 for r in rows)
    assert "head/tail at eta = 40 for every method" in out
    assert (tmp_path / "compare.md").read_text().strip() in out
    assert {"compare.json", "compare.png", "sgd-seed0", "ssesam-seed1"} <= {
        p.name for p in tmp_path.iterdir()
    }


def test_compare_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--methods", "adam"])
    assert exc.value.code == 2 and "--methods" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        main(["compare", "--out", str(tmp_path / "f")])
    assert "argument --out" in capsys.readouterr().err


# ---- the program ----------------------------------------------------------------------------------


def test_main_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sse_sam_fast", "train", "--epochs", "1", "--out", str(tmp_path), "--no-plot"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^tail\s+[0-9.]+%", proc.stdout, re.M)


def test_train_reuse_options_reach_the_optimizer_and_sgd_refuses_them(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1", "--reuse", "3", "--reuse-policy", "correction") == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert (saved["reuse"], saved["reuse_policy"]) == (3, "correction")
    for args, message in (
        (("--opt", "sgd", "--reuse", "2"), "argument --reuse: applies to --opt sam, imbsam, ssesam only"),
        (("--reuse", "0"), "argument --reuse: expected an integer >= 1"),
        (("--reuse-policy", "orthogonal"), "argument --reuse-policy: invalid choice"),
    ):
        with pytest.raises(SystemExit):
            _train(tmp_path / "bad", *args)
        assert message in capsys.readouterr().err
