"""1xN block pruning: block scores, masks that keep whole blocks, and filter rearrangement that keeps the network's
function (checked against the unpermuted network in PyTorch) across residual adds, concats and depthwise layers."""

from __future__ import annotations

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
