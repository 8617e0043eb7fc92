"""The training loop: defaults, validation, checkpoints and resume, outputs, compare."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from test_data import write_fake_cifar

from sse_sam_fast import training
from sse_sam_fast.data import long_tail_counts
from sse_sam_fast.losses import NormedLinear
from sse_sam_fast.metrics import group_accuracy, mean_std
from sse_sam_fast.training import OptionError, TrainConfig, compare, resolve, resolve_groups, train

DIGITS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]
CIFAR100 = [int(500 * 100 ** (-c / 99)) for c in range(100)]


def _quiet(cfg: TrainConfig, out, **kw) -> dict:
    return train(cfg, out, quiet=True, plot=kw.pop("plot", False), log=lambda _: None, **kw)


def _digits(**kw) -> TrainConfig:
    pytest.importorskip("sklearn")
    return TrainConfig(**{"epochs": 2, "device": "cpu", **kw})


def _fake_cifar(tmp_path, **kw) -> TrainConfig:
    root = write_fake_cifar(tmp_path / "cifar", per_class=16, test_per_class=2)
    defaults = {
        "dataset": "cifar10-lt",
        "data_dir": str(root),
        "imb_factor": 4.0,
        "model": "mlp",
        "hidden": 16,
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
    }
    return TrainConfig(**{**defaults, **kw})


# ---- defaults and validation ----------------------------------------------------------------------


def test_published_defaults_on_cifar():
    cfg = resolve(TrainConfig(dataset="cifar100-lt", device="cpu"))
    assert (cfg.model, cfg.epochs, cfg.batch_size) == ("resnet32", 200, 64)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.imb_factor) == (0.01, 0.9, 1e-3, 100.0)
    assert (cfg.head_rho, cfg.tail_rho, cfg.gamma) == (0.05, 0.1, 0.7)
    assert resolve_groups(cfg, CIFAR100).eta == 100
    assert (resolve_groups(cfg, CIFAR100).many_thr, resolve_groups(cfg, CIFAR100).few_thr) == (100, 20)
    imbsam = resolve_groups(resolve(dataclasses.replace(cfg, opt="imbsam")), CIFAR100)
    assert (imbsam.rho, imbsam.eta) == (0.05, 20)
    ldam = resolve(dataclasses.replace(cfg, loss="ldam"))
    assert ldam.drw_epoch == 160  # LDAM-DRW: the last 40 of 200 epochs re-weighted


def test_digits_defaults_are_the_original_ones():
    cfg = resolve_groups(resolve(TrainConfig(device="cpu")), DIGITS)
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("mlp", 30, 64, 0.05, 5e-4)
    assert (cfg.imb_factor, cfg.eta, cfg.hidden, cfg.threads) == (10.0, 40.0, 128, 1)
    assert (cfg.many_thr, cfg.few_thr) == (54, 25)
    assert resolve(TrainConfig(model="resnet32", dataset="cifar10-lt")).threads is None


def test_profile_defaults_for_cifar10_lt():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    cfg = resolve_groups(resolve(TrainConfig(dataset="cifar10-lt", device="cpu")), counts)
    assert (cfg.many_thr, cfg.few_thr, cfg.eta) == (1000, 200, 1000)
    imbsam = resolve_groups(resolve(TrainConfig(dataset="cifar10-lt", opt="imbsam", device="cpu")), counts)
    assert imbsam.eta == 200


@pytest.mark.parametrize(
    "changes, option",
    [
        ({"dataset": "imagenet-lt"}, "--dataset"),
        ({"opt": "adam"}, "--opt"),
        ({"loss": "focal"}, "--loss"),
        ({"model": "vit"}, "--model"),
        ({"backend": "cuda"}, "--backend"),
        ({"schedule": "fast"}, "--schedule"),
        ({"num_classes": 5}, "--num-classes"),  # digits has 10
        ({"dataset": "synthetic-lt", "num_classes": 1}, "--num-classes"),
        ({"model": "resnet32"}, "--model"),  # digits are feature vectors
        ({"imb_factor": 0.5}, "--imb-factor"),
        ({"gamma": 1.5}, "--gamma"),
        ({"drw_epoch": 3}, "--drw-epoch"),  # the loss is ce
        ({"loss": "ldam", "drw_epoch": 31}, "--drw-epoch"),  # beyond --epochs 30
    ],
)
def test_resolve_names_the_bad_option(changes, option):
    with pytest.raises(OptionError) as exc:
        resolve(TrainConfig(**changes))
    assert exc.value.option == option


@pytest.mark.parametrize(
    "changes, option, words",
    [
        ({"many_thr": 200.0}, "--many-thr", "Many group (n > 200) is empty"),
        ({"few_thr": 5.0}, "--few-thr", "Few group (n < 5) is empty"),
        ({"many_thr": 30.0, "few_thr": 50.0}, "--few-thr", "exceeds the many threshold"),
        ({"many_thr": 40.0, "few_thr": 39.0}, "--many-thr/--few-thr", "Medium group"),
        ({"eta": 5.0}, "--eta", "no class a tail class"),
        ({"eta": 1000.0}, "--eta", "every class a tail class"),
    ],
)
def test_groups_that_would_be_empty_are_errors(changes, option, words):
    with pytest.raises(OptionError, match=re.escape(words)) as exc:
        resolve_groups(resolve(TrainConfig(device="cpu", **changes)), DIGITS)
    assert exc.value.option == option


def test_schedule_passes_through_when_step_takes_it():
    class Old:
        def step(self, closure, tail_mask=None):
            pass

    class New:
        def step(self, closure, tail_mask=None, schedule="exact"):
            pass

    assert training.step_kwargs(Old(), "exact") == {}
    with pytest.raises(OptionError, match="only 'exact'") as exc:
        training.step_kwargs(Old(), "split")
    assert exc.value.option == "--schedule"
    assert training.step_kwargs(New(), "split") == {"schedule": "split"}
    assert training.step_kwargs(None, "split") == {}  # plain SGD has no schedule


# ---- a run and its outputs ------------------------------------------------------------------------


def test_run_writes_results_checkpoint_and_plot(tmp_path):
    lines = []
    results = train(_digits(), tmp_path / "run", log=lines.append)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "results.json", "results.png"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["finished"] and saved["sessions"] == 1 and saved["wall_time_s"] > 0
    assert saved["versions"]["sse_sam_fast"] and saved["versions"]["torch"] == torch.__version__
    assert saved["config"]["eta"] == 40 and saved["config"]["opt"] == "ssesam"
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert saved["epochs"][1]["lr"] < saved["epochs"][0]["lr"] == 0.05  # cosine decay
    assert saved["data"]["train_counts"] == DIGITS
    groups = saved["data"]["groups"]
    assert groups["tail"] == [5, 6, 7, 8, 9] and groups["few"] == [7, 8, 9]
    final = saved["final"]
    assert len(final["per_class"]) == 10
    # the group columns are means of the per-class accuracies, head/tail under the run's eta
    expected = group_accuracy(final["per_class"], {k: groups[k] for k in groups})
    assert final["acc"] == pytest.approx(expected, abs=1e-6)
    assert final["acc"] == pytest.approx(saved["epochs"][-1]["acc"])
    text = "\n".join(lines)
    assert "tail classes (count < eta=40): 5-9" in text and "few" in text


@pytest.mark.parametrize("loss", ["ce", "ldam", "la", "vs"])
def test_every_loss_trains(tmp_path, loss):
    results = _quiet(_digits(loss=loss, opt="imbsam", epochs=3, lr=0.1), tmp_path)
    assert results["final"]["acc"]["all"] > 0.2  # chance is 0.1
    assert all(math.isfinite(e["loss"]) for e in results["epochs"])


def test_ldam_uses_a_cosine_classifier(tmp_path):
    cfg = resolve(_digits(loss="ldam"))
    data = training.load_data(cfg)
    assert isinstance(training.build_model(cfg, data)[-1], NormedLinear)
    cifar = resolve(TrainConfig(dataset="cifar10-lt", loss="ldam"))
    fake = write_fake_cifar(tmp_path, per_class=8)
    data = training.load_data(dataclasses.replace(cifar, data_dir=str(fake), imb_factor=2.0))
    assert isinstance(training.build_model(cifar, data).fc, NormedLinear)


def test_resnet32_on_fake_cifar(tmp_path):
    cfg = _fake_cifar(tmp_path, model="resnet32", opt="ssesam", epochs=1, batch_size=32, threads=1)
    results = _quiet(cfg, tmp_path / "run")
    assert results["finished"] and len(results["final"]["per_class"]) == 10
    assert results["data"]["train_counts"] == long_tail_counts(16, 10, 4)
    assert results["config"]["model"] == "resnet32" and results["config"]["threads"] == 1


def test_split_schedule_matches_exact_on_an_mlp(tmp_path):
    # no BatchNorm: the split schedule computes the same update, up to rounding
    exact = _quiet(_digits(epochs=1), tmp_path / "exact")
    split = _quiet(_digits(epochs=1, schedule="split"), tmp_path / "split")
    auto = _quiet(_digits(epochs=1, schedule="auto"), tmp_path / "auto")
    a = torch.load(tmp_path / "exact" / "checkpoint.pt", weights_only=True)["model"]
    for other in ("split", "auto"):
        b = torch.load(tmp_path / other / "checkpoint.pt", weights_only=True)["model"]
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (other, k)
    assert split["config"]["schedule"] == "split" and auto["epochs"][0]["loss"] == pytest.approx(
        exact["epochs"][0]["loss"], abs=1e-5
    )


# ---- checkpoints and resume -----------------------------------------------------------------------


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _assert_same_run(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    base_a = opt_a.get("base", opt_a)
    base_b = opt_b.get("base", opt_b)
    for i, state in base_a["state"].items():
        assert torch.equal(state["momentum_buffer"], base_b["state"][i]["momentum_buffer"])
    assert opt_a.get("stage") == opt_b.get("stage")
    assert a["scheduler"] == b["scheduler"]
    strip = [{k: v for k, v in e.items() if k != "time_s"} for e in a["history"]]
    assert strip == [{k: v for k, v in e.items() if k != "time_s"} for e in b["history"]]


def test_resume_after_a_kill_gives_the_same_weights_across_the_stage_switch(tmp_path):
    cfg = _digits(epochs=4, gamma=0.5)  # stage 2 from epoch 3
    _quiet(cfg, tmp_path / "full")
    stopped = _quiet(cfg, tmp_path / "cut", stop_after=1)
    assert not stopped["finished"] and len(stopped["epochs"]) == 1
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["finished"] is False
    ckpt = training.load_checkpoint(tmp_path / "cut")
    assert ckpt["optimizer"]["stage"]["epoch_count"] == 1
    resumed = _quiet(training.config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    assert resumed["finished"] and resumed["sessions"] == 2
    assert [e["stage"] for e in resumed["epochs"]] == [1, 1, 2, 2]
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert resumed["final"] == full["final"]


def test_resume_restores_augmentation_drw_and_imbsam(tmp_path):
    # images: shuffling and crops/flips from the saved generator; LDAM-DRW switches on after the cut
    cfg = _fake_cifar(tmp_path, opt="imbsam", loss="ldam", drw_epoch=2, epochs=3)
    _quiet(cfg, tmp_path / "full")
    _quiet(cfg, tmp_path / "cut", stop_after=2)
    ckpt = training.load_checkpoint(tmp_path / "cut")
    _quiet(training.config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_resume_of_plain_sgd(tmp_path):
    cfg = _digits(opt="sgd", epochs=3)
    _quiet(cfg, tmp_path / "full")
    _quiet(cfg, tmp_path / "cut", stop_after=2)
    ckpt = training.load_checkpoint(tmp_path / "cut")
    _quiet(training.config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_checkpoint_holds_only_plain_data(tmp_path):
    _quiet(_digits(epochs=1), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # raises on anything else
    assert set(ckpt["rng"]) == {"torch", "cuda", "python", "numpy", "data"}
    assert ckpt["epoch"] == 1 and ckpt["config"]["epochs"] == 1


def test_config_for_resume_keeps_the_saved_run(tmp_path):
    _quiet(_digits(epochs=2), tmp_path, stop_after=1)
    ckpt = training.load_checkpoint(tmp_path)
    cfg = training.config_for_resume(
        ckpt, {"device": "cpu", "threads": 2, "lr": 0.05, "backend": "reference"}
    )
    assert (cfg.threads, cfg.backend, cfg.epochs) == (2, "reference", 2)
    with pytest.raises(OptionError, match="--resume continues the saved run") as exc:
        training.config_for_resume(ckpt, {"lr": 0.1})
    assert exc.value.option == "--lr"


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(b"garbage"), "not a readable checkpoint"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable checkpoint"),
        (lambda p: torch.save({"format": "other"}, p), "not a sse_sam_fast.train/1 checkpoint"),
        (lambda p: torch.save(TrainConfig(), p), "not a readable checkpoint"),  # not weights-only
        (lambda p: p.unlink(), "no checkpoint.pt"),
    ],
)
def test_corrupt_checkpoints_are_reported(tmp_path, damage, words):
    _quiet(_digits(epochs=1), tmp_path)
    damage(tmp_path / "checkpoint.pt")
    with pytest.raises(OptionError, match=words) as exc:
        training.load_checkpoint(tmp_path)
    assert exc.value.option == "--resume"


def test_out_directory_rules(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OptionError, match="is a file") as exc:
        _quiet(_digits(epochs=1), target)
    assert exc.value.option == "--out"

    _quiet(_digits(epochs=2), tmp_path / "run", stop_after=1)
    with pytest.raises(OptionError, match="unfinished run"):
        _quiet(_digits(epochs=2), tmp_path / "run")
    _quiet(_digits(epochs=2), tmp_path / "run", overwrite=True)
    lines = []
    train(_digits(epochs=1), tmp_path / "run", quiet=True, plot=False, log=lines.append)  # finished: replaced
    assert any("replacing the finished run" in line for line in lines)


def test_resume_rejects_other_data(tmp_path):
    cfg = _fake_cifar(tmp_path, epochs=2)
    _quiet(cfg, tmp_path / "run", stop_after=1)
    other = write_fake_cifar(tmp_path / "other", per_class=24)
    ckpt = training.load_checkpoint(tmp_path / "run")
    moved = training.config_for_resume(ckpt, {"data_dir": str(other)})
    with pytest.raises(OptionError, match="the data differ") as exc:
        _quiet(moved, tmp_path / "run", resume=ckpt)
    assert exc.value.option == "--data-dir"


# ---- compare ------------------------------------------------------------------------------------


def test_compare_tabulates_mean_and_std(tmp_path):
    base = _digits(epochs=1)
    lines = []
    report = compare(base, tmp_path, seeds=2, methods=["sgd", "imbsam"], plot=True, log=lines.append)
    assert (tmp_path / "compare.png").exists() and (tmp_path / "compare.md").exists()
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert report["eta"] == 40 and len(report["runs"]) == 4
    for method in ("sgd", "imbsam"):
        alls = [json.loads((tmp_path / f"{method}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        values = [r["final"]["acc"]["few"] for r in alls]
        assert report["summary"][method]["few"] == pytest.approx(list(mean_std(values)))
    table = (tmp_path / "compare.md").read_text()
    assert "| method | Many | Medium | Few | All | Head | Tail |" in table
    assert table.count(" ± ") >= 2 * 7 and "| imbsam |" in table
    assert table in "\n".join(lines) + "\n"

    again = []
    compare(base, tmp_path, seeds=2, methods=["sgd", "imbsam"], plot=False, log=again.append)
    assert sum("(reused)" in line for line in again) == 4
    with pytest.raises(OptionError, match="holds a run with --lr") as exc:
        compare(dataclasses.replace(base, lr=0.2), tmp_path, seeds=1, methods=["sgd"], log=lambda _: None)
    assert exc.value.option == "--out"


def test_compare_reports_head_tail_under_one_eta(tmp_path):
    # each method trains with its own eta (20 vs 100 here), the table uses SSE-SAM's for all
    base = TrainConfig(dataset="synthetic-lt", epochs=1, device="cpu", num_classes=10)
    report = compare(base, tmp_path, seeds=1, methods=["imbsam"], plot=False, log=lambda _: None)
    run = json.loads((tmp_path / "imbsam-seed0" / "results.json").read_text())
    assert run["config"]["eta"] == 20 and report["eta"] == 100
    tail = [c for c, n in enumerate(run["data"]["train_counts"]) if n < 100]
    expected = sum(run["final"]["per_class"][c] for c in tail) / len(tail)
    assert report["runs"][0]["acc"]["tail"] == pytest.approx(expected)


def test_compare_resumes_an_unfinished_run(tmp_path):
    base = _digits(epochs=2)
    _quiet(dataclasses.replace(base, opt="sgd", seed=0), tmp_path / "sgd-seed0", stop_after=1)
    lines = []
    compare(base, tmp_path, seeds=1, methods=["sgd"], plot=False, log=lines.append)
    assert "(resumed)" in lines[0]
    _quiet(dataclasses.replace(base, opt="sgd", seed=0), tmp_path / "fresh")
    _assert_same_run(tmp_path / "fresh", tmp_path / "sgd-seed0")
