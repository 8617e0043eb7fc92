"""The wheel a user installs: typed, licensed, described, and built without leaving build/ behind."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_version() -> tuple[int, ...]:
    setuptools = pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


def test_wheel_is_typed_licensed_and_described(tmp_path):
    if _setuptools_version() < (77,):
        pytest.skip("pyproject.toml's build-system needs setuptools >= 77 (the [test] extra installs it)")
    had_build = (ROOT / "build").exists()
    # no build isolation: the test must not need the network to fetch setuptools
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*cmd, "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("sse_sam_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sse_sam_fast/py.typed" in names
    assert "sse_sam_fast/kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names)
    licenses = [n for n in names if ".dist-info/" in n and Path(n).name.startswith("LICENSE")]
    assert licenses, names
    assert b"MIT License" in zipfile.ZipFile(wheel).read(licenses[0])
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    urls = meta.get_all("Project-URL") or []
    assert urls and all(", https://" in u for u in urls), urls
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier") or []
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers)
    assert meta["Requires-Python"] and any(r.startswith("torch") for r in meta.get_all("Requires-Dist"))
    # pip builds in the source tree; setup.py sends setuptools' build folder elsewhere
    assert had_build or not (ROOT / "build").exists()
