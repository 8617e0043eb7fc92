"""The shape of the package: what the architecture promises a maintainer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 100


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("folder", ["sse_sam_fast", "kernels"])
def test_no_function_is_longer_than_a_screenful(folder):
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, line, n in _functions(path)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, "split these: " + ", ".join(long)


def test_kernels_install_under_the_package_only(tmp_path):
    """A top-level `kernels` would clash with an unrelated package of that name."""
    code = (
        "import importlib.util, sse_sam_fast.kernels as k; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(k.__file__); print(spec.origin if spec else None)"
    )
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, top = out.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert top == "None" or Path(top).resolve().parent != ROOT / "kernels"
