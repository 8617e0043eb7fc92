"""Fixtures of the optimizer tests."""

import pytest


@pytest.fixture
def fake_graphs(monkeypatch):
    """Everything of opt.capture but the CUDA graph itself runs on the CPU:
    warm-ups, keys, recording (the step runs once and the state is put back, as
    a recording runs nothing), the first-replay check and the replays. A
    recording fails where a CUDA capture would (tests/optim/cuda_standin.py);
    a test that expects no such fault gets none."""
    from tests import triton_launches
    from tests.optim import cuda_standin

    launches = triton_launches.Launches()
    standin = cuda_standin.Standin(launches)
    standin.install(monkeypatch)
    with launches.watching():
        yield standin
    assert not standin.faults, f"a recording did what a CUDA capture cannot: {standin.faults}"
