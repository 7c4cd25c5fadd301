"""Accuracy of a subnet: extract it, recalibrate its BatchNorm statistics on training images, score held-out ones.

Recalibration matters: the supernet's running statistics mix every subnet it trained, so they fit none (OFA,
`reset_running_statistics`, recomputes them on 2000 training images; PSS-Net does the same).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import data
from .space import Arch
from .supernet import Supernet, extract

CALIBRATION_IMAGES = 512
BATCH = 128


@torch.no_grad()
def recalibrate(net: nn.Module, x: np.ndarray, resolution: int, images: int = CALIBRATION_IMAGES) -> nn.Module:
    """Running BatchNorm statistics as the plain average over `images` training images (momentum None)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for i in range(0, min(images, len(x)), BATCH):
        net(data.tensors(x[i:i + BATCH], resolution))
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray, resolution: int) -> float:
    net.eval()
    right = 0
    for i in range(0, len(y), BATCH):
        right += int((net(data.tensors(x[i:i + BATCH], resolution)).argmax(1).numpy() == y[i:i + BATCH]).sum())
    return right / max(1, len(y))


def subnet(supernet: Supernet, arch: Arch, train_x: np.ndarray) -> nn.Module:
    """The deployable network for `arch`: sliced out of the supernet, BatchNorm recalibrated."""
    return recalibrate(extract(supernet, arch), train_x, arch.resolution)


def score(supernet: Supernet, arch: Arch, ds: data.Dataset, split: str = "val") -> float:
    x, y = getattr(ds, split)
    return accuracy(subnet(supernet, arch, ds.train[0]), x, y, arch.resolution)
