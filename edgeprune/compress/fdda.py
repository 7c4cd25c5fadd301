"""Calibration images for post-training quantization when the user has (almost) no data.

Three synthetic sources, all optimizing pixels directly against a network that still has its BatchNorm layers (the
statistics are what the images are aligned to, so BatchNorm is folded only after this):

    fdda     FDDA (Zhong et al., ECCV 2022; methods.md section 5): per-class BN-statistics centres from a few real
             images per class; synthetic images of each class pulled towards their class's centres (BNS-centralized
             loss) and towards freshly jittered centres (BNS-distorted loss) on the deeper half of the BN layers,
             plus cross-entropy on the class label and the global BN-statistics loss.
    zeroq    ZeroQ-style (Cai et al., CVPR 2020): the whole batch aligned to the running (global) BN statistics, no
             classes; the ablation FDDA compares against.
    noise    Gaussian noise in the network's input space: the floor.

The paper trains a conditional generator for hundreds of GPU epochs; here the images themselves are optimized with
Adam for a few dozen steps (DeepInversion/ZeroQ style), which fits in a minute or two on two cores: calibration only
needs activation ranges and a short distillation signal, not an image generator that generalizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..errors import UserError

Progress = Callable[[int, int, str, float], None]

# The paper's weights (methods.md 5.3): CE terms 0.5, global BNS 0.2, centralized 0.01, distorted 0.9; the distortion's
# standard deviations for means and variances.
CE_WEIGHT, BNS_WEIGHT, CENTRAL_WEIGHT, DISTORT_WEIGHT = 0.5, 0.2, 0.01, 0.9
EPS_MEAN, EPS_VAR = 0.5, 1.0
PER_CLASS = 4  # real images per class for the centres (the issue's `--per-class 4`)
IMAGES_PER_CLASS = 4  # synthetic images per class
STEPS = 40
LR = 0.2
# The valid range of a normalized input (uint8 pixels through data.tensors): synthetic pixels are kept inside it.
BOUNDS = ((0 - data.MEAN) / data.STD, (255 - data.MEAN) / data.STD)


@dataclass
class Synthetic:
    """Synthetic calibration images (normalized, N,3,r,r), their labels (-1 when the source has no classes) and the
    per-step loss terms, kept so tests and reports can see the optimization converge."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    history: list[dict[str, float]] = field(default_factory=list)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorm2d layers in registration order (the forward order for sequential CNNs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


class _Inputs:
    """Forward hooks that keep every BatchNorm layer's input of the last forward pass."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise UserError("FDDA and ZeroQ align images to BatchNorm statistics, and this network has no "
                            "BatchNorm2d layer; synthesize before folding BatchNorm, or calibrate with real data")
        self.seen: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def keep(_m: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
            self.seen[i] = inputs[0]
        return keep

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _stats(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), for `groups` equal consecutive slices of the batch:
    (groups, C) each."""
    x = x.reshape(groups, -1, *x.shape[1:]).transpose(1, 2).flatten(2)  # groups, C, n*H*W
    return x.mean(2), x.var(2, unbiased=False)


def start_layer(count: int) -> int:
    """The first BN layer the class terms act on: the deeper half, from floor((L+1)/2) - 2 (the paper's code)."""
    return max(0, (count + 1) // 2 - 2)


@dataclass
class Centres:
    """Per-class BN-statistics centres: for each BN layer, (classes, C) means and variances of its input."""

    means: list[torch.Tensor]
    variances: list[torch.Tensor]
    classes: int
    correct: list[bool]  # whether the network classified at least one of the class's real images right


@torch.no_grad()
def class_centres(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: int,
                  per_class: int = PER_CLASS) -> Centres:
    """BNS centres from `per_class` real images of each class (methods.md 5.2: eval mode, each BN layer's input
    statistics). The paper has one image per class; with a few, a class's centre is the statistics of its images
    taken together, the same statistic a single-class synthetic batch is judged by. Images the network misclassifies
    are left out of their class's centre unless all of them are (then all are used: the class still needs one)."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    labels = torch.as_tensor(labels)
    missing = [c for c in range(classes) if int((labels == c).sum()) == 0]
    if missing:
        raise UserError(f"FDDA needs real images of every class for its BN-statistics centres; none of class(es) "
                        f"{missing[:10]} among the {len(labels)} given")
    model.eval()
    hooks = _Inputs(model)
    try:
        means: list[list[torch.Tensor]] = [[] for _ in hooks.layers]
        variances: list[list[torch.Tensor]] = [[] for _ in hooks.layers]
        correct = []
        for c in range(classes):
            x = images[(labels == c).nonzero().flatten()[:per_class]]
            right = model(x).argmax(1) == c
            correct.append(bool(right.any()))
            if right.any() and not right.all():
                model(x[right])
            for i, seen in enumerate(hooks.seen):
                m, v = _stats(seen)
                means[i].append(m[0])
                variances[i].append(v[0])
    finally:
        hooks.close()
    return Centres([torch.stack(m) for m in means], [torch.stack(v) for v in variances], classes, correct)


def _optimize(model: nn.Module, x: torch.Tensor, steps: int, lr: float, loss_of: Callable[[torch.Tensor], dict],
              label: str, progress: Progress | None) -> list[dict[str, float]]:
    """Adam on the pixels with a cosine rate, kept inside the valid input range; returns each step's terms."""
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # gradients for the pixels only
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.999))  # the paper's generator betas
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        terms = loss_of(x)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(*BOUNDS)
        history.append({k: float(v.detach()) for k, v in terms.items()})
        if progress:
            progress(step + 1, steps, label, history[-1]["loss"])
    x.requires_grad_(False)
    for p, flag in frozen:
        p.requires_grad_(flag)
    return history


def fdda(model: nn.Module, centres: Centres, resolution: int, images_per_class: int = IMAGES_PER_CLASS,
         steps: int = STEPS, lr: float = LR, seed: int = 0, progress: Progress | None = None,
         eps_mean: float = EPS_MEAN, eps_var: float = EPS_VAR) -> Synthetic:
    """FDDA's synthetic images: `images_per_class` of every class, optimized `steps` times with
    0.5 CE + 0.2 global BNS + 0.01 BNS-centralized + 0.9 BNS-distorted (methods.md 5.3). All classes share one
    batch (one forward pass), and the class terms use each class's slice of it: the paper's single-class batch."""
    if images_per_class < 1 or steps < 1:
        raise ValueError(f"images_per_class and steps must be at least 1, got {images_per_class} and {steps}")
    gen = torch.Generator().manual_seed(seed)
    k, n = centres.classes, images_per_class
    x = torch.randn(k * n, 3, resolution, resolution, generator=gen).clamp_(*BOUNDS)
    y = torch.arange(k).repeat_interleave(n)
    hooks = _Inputs(model)
    first = start_layer(len(hooks.layers))

    def loss_of(x: torch.Tensor) -> dict:
        out = model(x)
        ce = F.cross_entropy(out, y)
        bns = central = distort = out.new_zeros(())
        for i, ((_, bn), seen) in enumerate(zip(hooks.layers, hooks.seen)):
            m, v = _stats(seen)
            bns = bns + F.mse_loss(m[0], bn.running_mean) + F.mse_loss(v[0], bn.running_var)
            if i < first:
                continue
            mc, vc = _stats(seen, k)
            tm, tv = centres.means[i], centres.variances[i]
            central = central + F.mse_loss(mc, tm) + F.mse_loss(vc, tv)
            distort = distort + F.mse_loss(mc, tm + eps_mean * torch.randn(tm.shape, generator=gen)) + \
                F.mse_loss(vc, tv + eps_var * torch.randn(tv.shape, generator=gen))
        deep = len(hooks.layers) - first
        bns, central, distort = bns / len(hooks.layers), central / deep, distort / deep
        loss = CE_WEIGHT * ce + BNS_WEIGHT * bns + CENTRAL_WEIGHT * central + DISTORT_WEIGHT * distort
        return {"loss": loss, "ce": ce, "bns": bns, "centralized": central, "distorted": distort}

    try:
        history = _optimize(model, x, steps, lr, loss_of, "fdda", progress)
    finally:
        hooks.close()
    return Synthetic(x.detach(), y, "fdda", history)


def zeroq(model: nn.Module, count: int, resolution: int, steps: int = STEPS, lr: float = LR, seed: int = 0,
          progress: Progress | None = None) -> Synthetic:
    """ZeroQ's distilled data: `count` images whose batch statistics match every BN layer's running mean and
    standard deviation (ZeroQ's loss: the sum over layers of ||mu - mu_r||_2 + ||sigma - sigma_r||_2). No labels."""
    if count < 1 or steps < 1:
        raise ValueError(f"count and steps must be at least 1, got {count} and {steps}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, resolution, resolution, generator=gen).clamp_(*BOUNDS)
    hooks = _Inputs(model)

    def loss_of(x: torch.Tensor) -> dict:
        model(x)
        loss = x.new_zeros(())
        for (_, bn), seen in zip(hooks.layers, hooks.seen):
            m, v = _stats(seen)
            loss = loss + torch.linalg.vector_norm(m[0] - bn.running_mean) + \
                torch.linalg.vector_norm((v[0] + bn.eps).sqrt() - (bn.running_var + bn.eps).sqrt())
        return {"loss": loss}

    try:
        history = _optimize(model, x, steps, lr, loss_of, "zeroq", progress)
    finally:
        hooks.close()
    return Synthetic(x.detach(), torch.full((count,), -1), "zeroq", history)


def noise(count: int, resolution: int, seed: int = 0) -> Synthetic:
    """Standard Gaussian noise in the normalized input space (pixels of mean 127.5 and deviation 64): the floor."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, resolution, resolution, generator=gen).clamp_(*BOUNDS)
    return Synthetic(x, torch.full((count,), -1), "noise")


@torch.no_grad()
def centre_distance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, centres: Centres) -> list[float]:
    """Per BN layer, the mean squared distance of each class's batch statistics of `images` from its centres
    (means and variances together): how far synthetic images are from the real ones' statistics."""
    model.eval()
    hooks = _Inputs(model)
    try:
        model(images)
        out = []
        for i, seen in enumerate(hooks.seen):
            d = 0.0
            for c in range(centres.classes):
                m, v = _stats(seen[labels == c])
                d += float(F.mse_loss(m[0], centres.means[i][c]) + F.mse_loss(v[0], centres.variances[i][c]))
            out.append(d / centres.classes)
    finally:
        hooks.close()
    return out
