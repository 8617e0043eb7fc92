"""The split schedule: each group's passes run on that group's samples only."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.train.models import CifarResNet, small_bn_cnn


class TinyTransformer(nn.Module):
    """One LayerNorm transformer block over 4 tokens: per-sample losses independent."""

    def __init__(self, classes=6):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.block(self.embed(x.view(x.shape[0], 4, 4))).mean(1))


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 6)),
    "transformer": TinyTransformer,
    "gn_cnn": lambda: nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 1), CifarResNet(1, 6, "gn")),
}


def build(model_name, method, stage, backend="torch", dtype=torch.float64):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(dtype)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if method == "sam":
        return model, SAM(base, model, 0.07, backend=backend)
    if method == "imbsam":
        return model, ImbSAM(base, model, 0.06, backend=backend)
    opt = SSESAM(base, model, 0.05, 0.11, gamma=0.5, total_epochs=2, backend=backend)
    if stage == 2:
        opt.update_rho()
    return model, opt


def train(model_name, method, stage, schedule, backend="torch", steps=4, dtype=torch.float64):
    model, opt = build(model_name, method, stage, backend, dtype)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(20, 16, generator=g).to(dtype), torch.randint(0, 6, (20,), generator=g)
        tail = y >= 4

        def closure(idx=None):
            xs, ys = (x, y) if idx is None else (x[idx], y[idx])
            return F.cross_entropy(model(xs), ys, reduction="none")

        losses.append(opt.step(closure, tail, schedule=schedule))
    return [p.detach().clone() for p in model.parameters()], torch.stack(losses)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method,stage", [("sam", 1), ("imbsam", 1), ("ssesam", 1), ("ssesam", 2)])
def test_split_equals_exact_without_batchnorm(model_name, method, stage):
    exact, loss_exact = train(model_name, method, stage, "exact")
    split, loss_split = train(model_name, method, stage, "split")
    for a, b in zip(split, exact):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(loss_split, loss_exact, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_split_equals_exact_in_fp32_for_every_backend(backend):
    exact, _ = train("mlp", "ssesam", 1, "exact", "reference", dtype=torch.float32)
    split, _ = train("mlp", "ssesam", 1, "split", backend, dtype=torch.float32)
    for a, b in zip(split, exact):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 4)
        self.sizes, self.backwards = [], []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        out = self.net(x)
        out.register_hook(lambda g: self.backwards.append(g.shape[0]))
        return out


@pytest.mark.parametrize(
    "method,stage,sizes",
    [
        # 7 head and 3 tail samples: (F+B) + h(F+B) + t(F+B) in stage 1
        ("ssesam", 1, [7, 3, 7, 3]),
        ("ssesam", 2, [7, 3, 3]),  # (F+B) + t(F+B)
        ("imbsam", 1, [7, 3, 3]),
        ("sam", 1, [10, 10]),  # one group over the batch: split is exact
    ],
)
def test_split_pass_counts_and_batch_sizes(method, stage, sizes):
    torch.manual_seed(0)
    model = Recording()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = {"sam": lambda: SAM(base, model), "imbsam": lambda: ImbSAM(base, model)}.get(
        method, lambda: SSESAM(base, model, 0.05, 0.1, gamma=0.5, total_epochs=2)
    )()
    if stage == 2:
        opt.update_rho()
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    tail = torch.tensor([True, False, False, True, False, False, True, False, False, False])
    opt.step(
        lambda idx=None: F.cross_entropy(
            model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none"
        ),
        tail,
        schedule="split",
    )
    assert model.sizes == sizes and model.backwards == sizes


def test_auto_picks_split_only_when_it_is_exact():
    def index_closure(model, x, y):
        return lambda idx=None: F.cross_entropy(
            model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none"
        )

    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    tail = y >= 2
    for net, takes_index, expect_split in [
        (Recording(), True, True),
        (Recording(), False, False),
    ]:
        opt = SSESAM(torch.optim.SGD(net.parameters(), lr=0.1), net, 0.05, 0.1)
        closure = (
            index_closure(net, x, y)
            if takes_index
            else (lambda: F.cross_entropy(net(x), y, reduction="none"))
        )
        opt.step(closure, tail, schedule="auto")
        assert (sorted(set(net.sizes)) != [10]) == expect_split
    bn = small_bn_cnn(1, 4, 4)
    opt = SSESAM(torch.optim.SGD(bn.parameters(), lr=0.1), bn, 0.05, 0.1)
    assert opt._split("auto", lambda idx=None: None, opt._groups()) is False
    bn.eval()
    assert opt._split("auto", lambda idx=None: None, opt._groups()) is True


def test_split_needs_an_index_closure_and_a_known_schedule():
    net = Recording()
    opt = ImbSAM(torch.optim.SGD(net.parameters(), lr=0.1), net)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    with pytest.raises(TypeError, match="closure\\(idx\\)"):
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"), y >= 2, schedule="split")
    with pytest.raises(ValueError, match="schedule"):
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"), y >= 2, schedule="fast")


def test_split_on_batchnorm_is_a_documented_variant():
    """It runs, and it is not the published update (the batch statistics change)."""
    results = {}
    for schedule in ("exact", "split"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        opt = SSESAM(torch.optim.SGD(net.parameters(), lr=0.5), net, 0.05, 0.1)
        x, y = torch.randn(12, 8), torch.randint(0, 4, (12,))
        opt.step(
            lambda idx=None: F.cross_entropy(
                net(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none"
            ),
            y >= 2,
            schedule=schedule,
        )
        results[schedule] = net[0].weight.detach().clone()
    assert not torch.allclose(results["exact"], results["split"], atol=1e-6)


@pytest.mark.parametrize("schedule", ["split", "auto"])
@pytest.mark.parametrize("length", [8, 14], ids=["short", "long"])
def test_split_refuses_a_mask_of_another_length_before_any_forward(schedule, length):
    """A split closure never shows its batch: indexing with the sample indices
    checks the indexed tensor's length against the mask's, before reading."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, 0.05, 0.1)
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    mask = (torch.arange(length) % 3) == 2
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"tail_mask must have shape \(12,\)"):
        opt.step(
            lambda idx: F.cross_entropy(model(x[idx]), y[idx], reduction="none"), mask, schedule=schedule
        )
    assert forwards == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the closure may still do anything else with the indices
    opt.step(
        lambda idx: F.cross_entropy(model(x[idx.tolist()]), y[idx + 0], reduction="none"), y == 2, schedule
    )


@pytest.mark.parametrize(
    "index",
    [
        lambda t, idx: t.index_select(0, idx),
        lambda t, idx: torch.index_select(t, 0, idx),
        lambda t, idx: t.index_select(dim=0, index=idx),
        lambda t, idx: t[idx.to(t.device, copy=True)],
    ],
    ids=["Tensor.index_select", "torch.index_select", "keywords", "idx.to"],
)
def test_split_refuses_a_short_mask_whichever_way_the_closure_indexes(index):
    """index_select and a moved copy of the indices are checked as x[idx] is:
    a mask of 8 flags for 12 samples would otherwise train on part of the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = SSESAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, 0.05, 0.1)
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    before = [p.detach().clone() for p in model.parameters()]
    closure = lambda idx: F.cross_entropy(model(index(x, idx)), index(y, idx), reduction="none")
    with pytest.raises(ValueError, match=r"tail_mask must have shape \(12,\)"):
        opt.step(closure, (torch.arange(8) % 3) == 2, schedule="split")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step(closure, y == 2, schedule="split")  # the right mask trains
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
