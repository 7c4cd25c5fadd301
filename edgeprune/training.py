"""Training helpers every stage that trains shares: the search (supernet, fine-tuning) and compress (gradual
pruning, quantization-aware steps, binary layers). They sit below the stages so compress need not import search.

    optimizer / learning_rate    AdamW without decay on BatchNorm, biases and depthwise kernels; warm-up + cosine
    batch_at                     the step-th batch of seeded shuffled epochs (a resumed run sees the same data)
    kd                           Hinton's distillation loss
    distill                      label + distillation training of a student for a number of steps, with a hook
                                 after every optimizer step (a pruner re-applies its masks there)
    recalibrate / accuracy       BatchNorm statistics from training images; top-1 on held-out ones
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data

CALIBRATION_IMAGES = 512
EVAL_BATCH = 128


def kd(student: torch.Tensor, teacher: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    # t^2 keeps the gradient's scale independent of the temperature (Hinton et al.)
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def optimizer(net: nn.Module, lr: float, weight_decay: float,
              no_decay: Callable[[str, nn.Parameter], bool] | None = None) -> torch.optim.AdamW:
    """AdamW with decay on dense conv and classifier weights only: none on BatchNorm, biases, depthwise kernels and
    kernel transforms (OFA, BigNAS: decaying them hurts small subnets). `no_decay(name, p)` exempts more (SiMaN:
    no decay on binary layers)."""
    decay = [p for n, p in net.named_parameters()
             if ((p.ndim == 4 and p.shape[1] > 1) or n == "classifier.weight") and not (no_decay and no_decay(n, p))]
    ids = {id(p) for p in decay}
    other = [p for p in net.parameters() if id(p) not in ids]
    # Adam, not the papers' SGD: from scratch, SGD needs far more steps than a CPU budget allows (on the digit
    # scenes, MobileNetV2 with SGD at lr 0.1 was still at chance after 300 steps; Adam reached 53%).
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr)


def learning_rate(cfg_lr: float, step: int, steps: int) -> float:
    warmup = max(1, steps // 40)
    return cfg_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def batch_at(x: np.ndarray, y: np.ndarray, batch: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The step-th batch of shuffled epochs: a function of the step alone, so a resumed run sees the same data."""
    per_epoch = -(-len(y) // batch)
    epoch, i = divmod(step, per_epoch)
    order = _permutation(len(y), seed, epoch + 1)[i * batch:(i + 1) * batch]
    return x[order], y[order]


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


@torch.no_grad()
def recalibrate(net: nn.Module, x: np.ndarray, resolution: int, images: int = CALIBRATION_IMAGES) -> nn.Module:
    """Running BatchNorm statistics as the plain average over `images` training images (momentum None)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for i in range(0, min(images, len(x)), EVAL_BATCH):
        net(data.tensors(x[i:i + EVAL_BATCH], resolution))
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray, resolution: int) -> float:
    net.eval()
    right = 0
    for i in range(0, len(y), EVAL_BATCH):
        pred = net(data.tensors(x[i:i + EVAL_BATCH], resolution)).argmax(1).numpy()
        right += int((pred == y[i:i + EVAL_BATCH]).sum())
    return right / max(1, len(y))


def distill(student: nn.Module, resolution: int, teacher: nn.Module | None, teacher_resolution: int,
            ds: data.Dataset, steps: int, *, lr: float, batch: int = 32, weight_decay: float = 1e-5,
            kd_weight: float = 1.0, seed: int = 0, opt: torch.optim.Optimizer | None = None,
            after_step: Callable[[int], None] | None = None,
            progress: Callable[[int, int, str, float], None] | None = None, label: str = "train") -> nn.Module:
    """`student` trained in place for `steps` on ds.train: label-smoothed cross-entropy plus `kd_weight` x
    distillation from `teacher` (none: labels only), warm-up + cosine rate. `after_step(step)` runs after each
    optimizer step. BatchNorm statistics are recalibrated after; returns the student in eval mode."""
    if steps <= 0:
        return student.eval()
    torch.manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    opt = opt or optimizer(student, lr, weight_decay)
    for step in range(steps):
        xb, yb = batch_at(*ds.train, batch, seed, step)
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step, steps)
        student.train()
        out = student(data.tensors(xb, resolution))
        loss = F.cross_entropy(out, torch.from_numpy(yb), label_smoothing=0.1)
        if teacher is not None and kd_weight:
            with torch.no_grad():
                soft = teacher(data.tensors(xb, teacher_resolution))
            loss = loss + kd_weight * kd(out, soft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step:
            after_step(step)
        if progress:
            progress(step + 1, steps, label, float(loss.detach()))
    return recalibrate(student, ds.train[0], resolution)
