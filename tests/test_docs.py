"""The README and docs/: every python block runs as pasted or says it is a fragment,
and every link inside the repository leads somewhere.

A block whose first line is ``# fragment: <what it needs>`` is only compiled; any
other python block runs in a fresh interpreter and must exit 0.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "# fragment:"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def _cases():
    for page in PAGES:
        for i, code in enumerate(_blocks(page)):
            yield pytest.param(page, code, id=f"{page.relative_to(ROOT)}[{i}]")


@functools.cache
def _run(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` as a reader would paste it, once per session, in an empty folder.
    One thread: on a machine busy with the rest of the suite, torch's threads stall in
    OpenMP barriers (the quickstart took 19 s with two, 8 s with one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )


@pytest.mark.parametrize("page, code", list(_cases()))
def test_python_block_runs_as_pasted_or_is_a_marked_fragment(page, code):
    first = code.splitlines()[0] if code.strip() else ""
    if first.startswith(FRAGMENT):
        assert first[len(FRAGMENT) :].strip(), "a fragment says what it needs"
        compile(code, f"{page.name} fragment", "exec")  # a fragment is still Python
        return
    proc = _run(code)
    assert proc.returncode == 0, f"{page.name}: the block does not run as pasted:\n{proc.stderr[-3000:]}"


def test_readme_opens_with_a_complete_program_that_learns_the_tail():
    first = _blocks(ROOT / "README.md")[0]
    assert not first.startswith(FRAGMENT)
    assert "opt.step(" in first and "tail_mask(" in first and "update_rho()" in first
    assert 15 <= len(first.splitlines()) <= 30
    proc = _run(first)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"epoch {e}" for e in range(1, 11)]
    assert "stage 1" in lines[4] and "stage 2" in lines[5]  # gamma 0.5 of 10 epochs
    tail = [float(x) for x in re.findall(r"tail ([0-9.]+)%", proc.stdout)]
    assert tail[0] < 5 and tail[-1] > 50  # the tail classes are learnt


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_inside_the_repository_lead_somewhere(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"
