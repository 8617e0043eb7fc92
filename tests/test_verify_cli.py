"""`sse-sam-fast verify` and `bench`: exit codes and output."""

import os
import subprocess
import sys

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
    assert "ground truth: the published code" in out and "interpreter" not in out
    header, row = out.splitlines()[1:3]
    assert header.split()[-3:] == ["atol", "rtol", "result"]
    assert row.split()[-3:] == ["2e-06", "1e-05", "PASS"]  # the float32 "step" row of TOLERANCES


def test_verify_triton_passes_under_the_interpreter(capsys):
    pytest.importorskip("triton")
    assert (
        main(["verify", "--backend", "triton", "--device", "cpu", "--steps", "2", "--dtypes", "float32"]) == 0
    )
    assert "Triton interpreter on (TRITON_INTERPRET=1 was already set)" in capsys.readouterr().out


def test_verify_says_it_turned_the_interpreter_on():
    """A fresh process without TRITON_INTERPRET: verify sets it before triton
    loads and says so (one case, to keep the interpreter run short)."""
    pytest.importorskip("triton")
    args = ["verify", "--backend", "triton", "--device", "cpu", "--steps", "2", "--dtypes", "float32"]
    script = (
        "import sys\n"
        "import sse_sam_fast.verify as v\n"
        "cases = v.default_cases\n"
        "v.default_cases = lambda d: [c for c in cases(d) if c.name == 'sam-mlp-sgd-random-float32']\n"
        "from sse_sam_fast.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Triton interpreter turned on by verify (TRITON_INTERPRET=1)" in done.stdout
    assert done.stdout.splitlines()[-1] == "2 passed, 0 failed"


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
