"""examples/lightning_sse_sam.py end to end: Lightning's manual optimization
drives the same SSE-SAM update as a plain loop over the same batches."""

import importlib.util
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sse_sam_fast import SSESAM, tail_classes, tail_mask
from sse_sam_fast.verify import assert_close

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_sse_sam.py"


def _load():
    spec = importlib.util.spec_from_file_location("lightning_sse_sam", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracies(lines):
    return [float(re.search(r"test accuracy [^:]*: ([0-9.]+)%", line).group(1)) for line in lines]


def test_lightning_recipe_matches_a_plain_loop():
    example = _load()
    lines = []
    lit = example.main(epochs=2, batch_size=32, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["test accuracy before 2 epochs", "test accuracy after"]
    before, after = _accuracies(lines)
    assert after > before + 10  # the reader sees it learn
    opt = lit.trainer.optimizers[0]
    assert isinstance(opt, SSESAM)
    assert lit.trainer.global_step == 6  # 96 samples, batches of 32, two epochs: every step counted
    assert opt.epoch_count == 2 and opt.stage == 2  # update_rho() ran once per epoch

    torch.manual_seed(0)
    data = example.synthetic_data()
    tails = tail_classes(torch.bincount(data.tensors[1], minlength=6), eta=10)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    plain = SSESAM(base, model, head_rho=0.05, tail_rho=0.1, gamma=0.5, total_epochs=2)
    for _ in range(2):
        for x, y in DataLoader(data, batch_size=32):
            plain.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail_mask(y, tails))
        plain.update_rho()
    assert_close(list(lit.model.parameters()), list(model.parameters()), torch.float32, "lightning")
    assert tails.numel() > 0  # the data really has a tail group
