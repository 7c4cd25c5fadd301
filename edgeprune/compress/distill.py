"""Distillation of a fake-quantized network on its calibration images: FDDA's second half (methods.md section 5.4).

Activation ranges alone barely depend on where the calibration images come from: at W4A8 the loss is the weights'
rounding, which no range fixes. FDDA's paper fine-tunes the quantized network by knowledge distillation from the
full-precision one on its synthetic images, and that is where the images' quality shows. Here the float (BatchNorm
folded) weights and biases train through the quantizers with straight-through estimators:

  weights      fake-quantized per output channel on the grid `quantize.quantize_weight` picks (scales re-chosen
               every REFRESH steps, as the export will choose them), the gradient passed straight through;
  activations  each quantization point keeps the range calibration froze; the gradient passes inside it and is
               zero outside (the clamp), as in the paper's quantizer.

The loss is the KL divergence between temperature-softened outputs (the paper's KD loss) on randomly cropped images
(the paper's augmentation), with Adam and a cosine decay. The caller then exports the trained weights as
usual, so the integer program and the simulation are made exactly as without distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

LR = 1e-4
BATCH = 16  # the paper's
REFRESH = 10  # steps between re-choosing a weight's scales: their search is a third of a step's time, and a
#               learning rate this small moves the best clipping ratio slowly
MIN_AREA = 0.5  # the paper's RandomResizedCrop scale (0.5, 1)
TEMPERATURE = 4.0  # the paper's 20 is for 1000 classes; a few classes need less softening to keep a signal


class _FakeQuantWeight(nn.Module):
    """A weight's parametrization: its per-channel fake-quantized value forward, the identity backward. The scales
    are `quantize_weight`'s, re-chosen every REFRESH calls; the export re-chooses them once more."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits, self.calls, self.scale = bits, 0, None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from .quantize import quantize_weight, weight_levels

        if self.calls % REFRESH == 0:
            self.scale = quantize_weight(w, self.bits)[1].view(-1, *[1] * (w.dim() - 1))
        self.calls += 1
        q = weight_levels(self.bits)
        return w + ((w.detach() / self.scale).round().clamp(-q, q) * self.scale - w).detach()


@contextmanager
def _training_form(gm: fx.GraphModule, layer_bits: Mapping[str, int], points: Mapping[str, nn.Module]) -> Iterator:
    """The network with its weights fake-quantized and its quantization points passing gradients, restored to plain
    float weights (the trained values) and plain points on exit."""
    modules = dict(gm.named_modules())
    for name, bits in layer_bits.items():
        parametrize.register_parametrization(modules[name], "weight", _FakeQuantWeight(bits))
    for q in points.values():
        q.straight_through = True
    try:
        yield
    finally:
        for q in points.values():
            q.straight_through = False
        for name in layer_bits:
            if parametrize.is_parametrized(modules[name], "weight"):
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)


def augment(x: torch.Tensor, gen: torch.Generator, min_area: float = MIN_AREA) -> torch.Tensor:
    """Each image cropped at random (a square of `min_area` to all of its area, anywhere inside it) and resized back:
    the paper's RandomResizedCrop (without its flip, which would not keep a digit a digit). A few dozen calibration
    images become many, so distillation fits the network rather than the images."""
    n = len(x)
    scale = torch.empty(n).uniform_(min_area ** 0.5, 1.0, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def distill(gm: fx.GraphModule, teacher: nn.Module, images: torch.Tensor, layer_bits: Mapping[str, int],
            points: Mapping[str, nn.Module], steps: int, lr: float = LR, seed: int = 0,
            progress: Callable[[int, int, str, float], None] | None = None) -> list[float]:
    """Train `gm` (folded, its quantization points frozen) towards `teacher` on `images`, augmented; `layer_bits`
    gives each quantized layer's weight bits. Returns the loss of each step. `gm` is changed in place."""
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    gm.eval()  # BatchNorm is folded; nothing in the network changes between train and eval but the gradient
    with _training_form(gm, layer_bits, points), torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(len(images), (min(BATCH, len(images)),), generator=gen)
            x = augment(images[idx].float(), gen)
            with torch.no_grad():
                target = teacher(x)
            out = gm(x)
            loss = F.kl_div(F.log_softmax(out / TEMPERATURE, 1), F.softmax(target / TEMPERATURE, 1),
                            reduction="batchmean") * TEMPERATURE ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                progress(step + 1, steps, "distill", losses[-1])
    return losses
