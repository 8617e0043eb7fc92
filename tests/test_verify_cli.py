"""`sse-sam-fast verify` and `bench`: exit codes and output."""

import pytest
import torch

from sse_sam_fast import verify as verify_mod
from sse_sam_fast.cli import main


def test_verify_torch_passes_and_prints_a_table(capsys):
    assert (
        main(["verify", "--backend", "torch", "--device", "cpu", "--steps", "3", "--dtypes", "float32"]) == 0
    )
    out = capsys.readouterr().out
    assert "ssesam-bn_cnn-sgd-random-float32" in out and "FAIL" not in out
    assert out.splitlines()[-1].endswith("0 failed")


def test_verify_triton_passes_under_the_interpreter(capsys):
    pytest.importorskip("triton")
    assert (
        main(["verify", "--backend", "triton", "--device", "cpu", "--steps", "2", "--dtypes", "float32"]) == 0
    )


def test_verify_exits_1_on_a_mismatch(capsys, monkeypatch):
    monkeypatch.setitem(verify_mod.TOLERANCES, ("step", torch.float32), (0.0, 0.0))
    assert (
        main(["verify", "--backend", "torch", "--device", "cpu", "--steps", "2", "--dtypes", "float32"]) == 1
    )
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_bad_device_is_an_argument_error(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--device", "nonsense"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err


def test_bench_runs_and_writes_json_and_chart(capsys, monkeypatch, tmp_path):
    import sse_sam_fast.bench as bench

    tiny = lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, n))  # noqa: E731
    with_bn = lambda n: torch.nn.Sequential(tiny(n), torch.nn.BatchNorm1d(n))  # noqa: E731
    monkeypatch.setitem(bench.MODELS, "vit", tiny)
    monkeypatch.setitem(bench.MODELS, "resnet32", with_bn)
    out_dir = tmp_path / "bench"
    args = [
        "bench",
        "--device",
        "cpu",
        "--batch",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--models",
        "vit",
        "resnet32",
        "--methods",
        "ssesam",
        "sam",
        "--out",
        str(out_dir),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "vit stage 1" in out and "vit stage 2" in out and "split/torch" in out and "exact/torch" in out
    assert "Optimizer side" in out and "× reference" in out
    import json

    saved = json.loads((out_dir / "bench.json").read_text())
    cases = {f"{m} {c}" for m in ("vit", "resnet32") for c in ("stage 1", "stage 2", "sam")}
    assert set(saved["whole_step"]) == cases
    assert "split/torch" not in saved["whole_step"]["resnet32 stage 1"]  # BatchNorm: split is not exact
    assert saved["whole_step"]["vit stage 1"]["captured/torch"]["graphed"] is False  # eager on a CPU
    assert (out_dir / "bench.png").stat().st_size > 1000
