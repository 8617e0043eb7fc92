"""A pytest plugin that records every kernel specialization the CPU suite launches
into tests/kernels/launches.json, the input of tests/kernels/test_offline_compile.py:

    PYTHONPATH=tests python -m pytest -q -p record_launches

Run it again when a kernel's parameters or a launcher's choices change (the
offline compile test says when the record no longer fits the kernels)."""

import os

import pytest

RECORD = os.path.join(os.path.dirname(__file__), "kernels", "launches.json")


@pytest.fixture(autouse=True, scope="session")
def _record_launches():
    import triton_launches

    launches = triton_launches.Launches()
    with launches.watching():
        yield
    launches.dump(RECORD)
