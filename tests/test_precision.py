"""The precision CUDA-against-reference comparisons assume: fp32, no TF32."""

import torch

from sse_sam_fast.verify import Case, fp32_precision, run


def test_verification_runs_compute_in_fp32_and_leave_the_settings_as_they_were(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # a user's choice
    seen = []

    @fp32_precision
    def inside():
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    inside()
    assert seen == [(False, False)]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    # verify's runs (and the CUDA-against-CPU tests built on them) are pinned
    def batches(case):
        seen.append(torch.backends.cudnn.allow_tf32)
        return []

    monkeypatch.setattr(Case, "batches", batches)
    run(Case(method="sam", steps=1), "reference", "step")
    assert seen[-1] is False
