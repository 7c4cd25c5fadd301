"""1xN block pruning: block scores, masks that keep whole blocks, and filter rearrangement that keeps the network's
function (checked against the unpermuted network in PyTorch) across residual adds, concats and depthwise layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.compress import block1xn
from edgeprune.models.reference import MobileNetV2, randomize_bn


class Coupled(nn.Module):
    """A stem, a depthwise + pointwise branch added back to its input, and a concat of both into a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(24, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU())
        self.project = nn.Conv2d(24, 24, 1)
        self.head = nn.Conv2d(48, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        z = self.project(self.dw(self.expand(y))) + y
        return self.fc(self.head(torch.cat([z, y], 1)).mean((2, 3)))


def test_block_scores_are_the_l1_norms_of_n_output_kernels_on_one_input_channel():
    w = torch.randn(10, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    s = block1xn.block_scores(w, 4)
    ref = np.abs(w.numpy()).sum((2, 3))  # [10, 3]
    assert s.shape == (3, 3)  # 10 channels: blocks of 4, 4 and the last 2
    np.testing.assert_allclose(s.numpy(), [ref[0:4].sum(0), ref[4:8].sum(0), ref[8:10].sum(0)], rtol=1e-6)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_a_mask_keeps_whole_blocks_and_the_strongest_ones(n):
    w = torch.randn(64, 32, 1, 1, generator=torch.Generator().manual_seed(n))
    mask = block1xn.block_mask(w, n, 0.75)
    blocks = mask[:, :, 0, 0].view(64 // n, n, 32)
    assert torch.all(blocks.amin(1) == blocks.amax(1))  # all or nothing within a block
    kept = blocks[:, 0, :]
    assert int(kept.sum()) == round(0.25 * kept.numel())
    scores = block1xn.block_scores(w, n)
    assert scores[kept.bool()].min() >= scores[~kept.bool()].max()


def test_rearrangement_keeps_the_function_through_residuals_concats_and_depthwise_layers():
    torch.manual_seed(0)
    nets = ((randomize_bn(Coupled()), (1, 3, 16, 16)), (randomize_bn(MobileNetV2(0.35, 10)), (1, 3, 64, 64)))
    for model, shape in nets:
        model.eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            before = model(x)
        assert block1xn.rearrange(model, x) > 0
        with torch.no_grad():
            np.testing.assert_allclose(model(x).numpy(), before.numpy(), rtol=1e-4, atol=1e-5)
    # The stem's channels are tied to the projection's by the residual add, and through the concat to half of the
    # head's inputs and through the depthwise layer: the group was sorted by both convolutions' filters, not undone.
    coupled = nets[0][0]
    norms = (coupled.stem[0].weight.abs().flatten(1).sum(1) + coupled.project.weight.abs().flatten(1).sum(1))
    assert torch.all(norms[:-1] >= norms[1:])


def test_rearrangement_sorts_filters_and_keeps_more_weight_in_the_kept_blocks():
    torch.manual_seed(1)
    model = randomize_bn(MobileNetV2(0.5, 10)).eval()
    x = torch.randn(1, 3, 64, 64)

    def kept_mass(m):
        return sum(float((c.weight.detach().abs() * block1xn.block_mask(c.weight, 4, 0.5)).sum())
                   for c in block1xn.prunable(m).values())

    before = kept_mass(model)
    block1xn.rearrange(model, x)
    assert kept_mass(model) > before
    last = model.features[-1][0]  # a conv whose outputs are coupled to nothing else: sorted by its own norms
    norms = last.weight.abs().flatten(1).sum(1)
    assert torch.all(norms[:-1] >= norms[1:])


def test_pruning_zeroes_blocks_and_plans_the_layers_block_sparse():
    torch.manual_seed(2)
    model = Coupled().eval()
    pruned = block1xn.apply_masks(model, 0.5, 8)
    assert set(pruned.masks) == {"expand.0", "project", "head"}  # not the stem on the image, not depthwise
    plan = pruned.plan()["head"]
    assert plan.scheme == "bsr" and plan.block == 8 and plan.density == pytest.approx(0.5)
    w = model.head.weight[:, :, 0, 0].view(2, 8, 48)
    assert float((w.abs().sum(1) == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="block size"):
        block1xn.apply_masks(model, 0.5, 3)
    with pytest.raises(ValueError, match="sparsity"):
        block1xn.apply_masks(model, 1.0, 4)
    schedule = block1xn.cubic_schedule(0.8, 100)
    assert schedule(0) == 0 and schedule(100) == pytest.approx(0.8) and schedule(50) > 0.4


# ---------------------------------------------------------------- gradual pruning, linear layers, compress()


class Headed(Coupled):
    """Coupled with a hidden linear layer before the classifier: a linear layer 1xN pruning must cover."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


PRUNED = {"expand.0", "project", "head", "fc.0"}  # not the stem (reads the image), depthwise, 3x3 or the classifier


def tiny_data(images: int = 64, size: int = 16):
    """Random images whose label is the brightest of three colour channels (learnable, seconds to train)."""
    from edgeprune.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    y = x.reshape(images, -1, 3).mean(1).argmax(1).astype(np.int64)
    return Dataset("tiny", ["r", "g", "b"], (x, y), (x[:16], y[:16]), (x[16:32], y[16:32]))


def zero_blocks_by_hand(model: nn.Module, names: set[str], n: int, sparsity: float) -> None:
    """The reference: in each layer, zero the round(sparsity * blocks) blocks of N output channels x 1 input channel
    with the smallest L1 norms, one block at a time."""
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight.data
        a = w.abs().reshape(w.shape[0], w.shape[1], -1).sum(2).numpy()  # [Cout, Cin]
        blocks = [(a[j * n:(j + 1) * n, i].sum(), j, i) for j in range(w.shape[0] // n) for i in range(w.shape[1])]
        for _, j, i in sorted(blocks)[:round(sparsity * len(blocks))]:
            w[j * n:(j + 1) * n, i] = 0


def test_the_pruned_network_computes_the_rearranged_dense_network_with_its_pruned_blocks_zeroed():
    torch.manual_seed(3)
    model = randomize_bn(Headed())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        dense = model(x)
    reference = copy.deepcopy(model)
    assert block1xn.rearrange(reference, x) > 0
    zero_blocks_by_hand(reference, PRUNED, 4, 0.5)

    pruned = block1xn.prune(model, None, 16, 0.5, n=4, steps=0)
    assert set(pruned.masks) == PRUNED
    with torch.no_grad():
        out, ref = model(x), reference(x)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5, rtol=0)
    assert float((out - dense).abs().max()) > 1e-2  # the blocks zeroed did change the function
    modules = dict(model.named_modules())
    for name in PRUNED:  # the same weights: rearranged alike, and the same blocks zeroed
        np.testing.assert_array_equal(modules[name].weight.detach().numpy(),
                                      dict(reference.named_modules())[name].weight.detach().numpy())


def blocks_of(weight: torch.Tensor, n: int) -> torch.Tensor:
    """[Cout/N, N, Cin]: each block's N weights (|w| summed over the kernel)."""
    w = weight.detach().abs().reshape(weight.shape[0], weight.shape[1], -1).sum(2)
    return w.view(-1, n, weight.shape[1])


def test_gradual_pruning_reaches_the_target_in_whole_blocks_and_prunes_linear_layers(monkeypatch):
    torch.manual_seed(4)
    model = randomize_bn(Headed())
    before = copy.deepcopy(model)
    asked: list[float] = []
    apply = block1xn.apply_masks

    def recording(m, sparsity, n, layers=None):
        asked.append(sparsity)
        return apply(m, sparsity, n, layers)

    monkeypatch.setattr(block1xn, "apply_masks", recording)
    steps: list[int] = []
    pruned = block1xn.prune(model, tiny_data(), 16, 0.75, n=4, steps=24, progress=lambda s, *_: steps.append(s))
    assert steps == list(range(1, 25))
    # the sparsity rose along the schedule: from 0, through values between, to the target, never down
    assert asked[0] == 0 and asked[-1] == pytest.approx(0.75) and len(asked) > 4
    assert all(b >= a for a, b in zip(asked, asked[1:])) and any(0.1 < s < 0.7 for s in asked)
    modules = dict(model.named_modules())
    assert set(pruned.masks) == PRUNED and isinstance(modules["fc.0"], nn.Linear)
    for name in PRUNED:
        b = blocks_of(modules[name].weight, 4)
        zero = b.amax(1) == 0
        assert torch.all((b.amin(1) > 0) | zero), name  # every block all zero, or kept whole
        assert int(zero.sum()) == round(0.75 * zero.numel()), name
        assert torch.equal(zero, pruned.masks[name].reshape(*modules[name].weight.shape[:2], -1)[::4, :, 0] == 0)
    # fine-tuned: the layers left dense changed too
    assert not torch.equal(model.stem[0].weight, before.stem[0].weight)
    assert not torch.equal(model.fc[2].weight, before.fc[2].weight)


def test_prunable_layers_follow_the_paper_and_take_k_by_k_convolutions_only_when_asked():
    class Late(nn.Module):  # the classifier registered first, run last
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(16, 10)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.mid = nn.Conv2d(8, 16, 3, padding=1)
            self.point = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            return self.classifier(self.point(self.mid(self.stem(x))).mean((2, 3)))

    model, x = Late(), torch.randn(1, 3, 8, 8)
    assert set(block1xn.prunable(model, example=x)) == {"point"}
    assert set(block1xn.prunable(model, kernels=(1, 3), example=x)) == {"mid", "point"}
    # without an example, the first and last registered are taken for the first layer and the classifier
    assert set(block1xn.prunable(Headed())) == PRUNED
    with pytest.raises(ValueError, match="steps"):
        block1xn.prune(model, None, 8, 0.5, steps=-1)
    with pytest.raises(ValueError, match="training data"):
        block1xn.prune(model, None, 8, 0.5, steps=5)


def test_compress_prunes_a_copy_and_plans_the_pruned_layers_block_sparse():
    from edgeprune.artifacts import Network
    from edgeprune.compress import compress
    from edgeprune.errors import UserError

    torch.manual_seed(5)
    net = Network(randomize_bn(Headed()), (1, 3, 16, 16), name="headed")
    state = copy.deepcopy(net.module.state_dict())
    same = compress(net)  # no sparsity: the identity, every weighted layer dense
    assert same.module is net.module and {p.scheme for p in same.plan.values()} == {"dense"}
    assert len(same.plan) == 7

    out = compress(net, tiny_data(), sparsity=0.75, block=8, steps=4)
    assert out.module is not net.module
    for k, v in net.module.state_dict().items():  # the input network is untouched
        assert torch.equal(v, state[k]), k
    modules = dict(out.module.named_modules())
    assert {n for n, p in out.plan.items() if p.scheme == "bsr"} == PRUNED
    for name in PRUNED:
        p, w = out.plan[name], modules[name].weight
        blocks = w.shape[0] // 8 * w.shape[1]
        assert p.block == 8 and p.density == pytest.approx(1 - round(0.75 * blocks) / blocks)
        assert float((blocks_of(w, 8).amax(1) > 0).float().mean()) == pytest.approx(p.density)
    assert out.plan["stem.0"].scheme == out.plan["dw.0"].scheme == out.plan["fc.2"].scheme == "dense"
    assert out.accuracy is not None and 0 <= out.accuracy <= 1
    with pytest.raises(UserError, match="training data"):
        compress(net, None, sparsity=0.5)
    with pytest.raises(UserError, match="block 3"):
        compress(net, tiny_data(), sparsity=0.5, block=3)
    with pytest.raises(UserError, match="sparsity 1.5"):
        compress(net, tiny_data(), sparsity=1.5)
