"""Accuracy of a subnet: extract it, recalibrate its BatchNorm statistics on training images, score held-out ones.

Recalibration matters: the supernet's running statistics mix every subnet it trained, so they fit none (OFA,
`reset_running_statistics`, recomputes them on 2000 training images; PSS-Net does the same).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .. import data
from ..training import accuracy, recalibrate
from .space import Arch
from .supernet import Supernet, extract


def subnet(supernet: Supernet, arch: Arch, train_x: np.ndarray) -> nn.Module:
    """The deployable network for `arch`: sliced out of the supernet, BatchNorm recalibrated."""
    return recalibrate(extract(supernet, arch), train_x, arch.resolution)


def score(supernet: Supernet, arch: Arch, ds: data.Dataset, split: str = "val") -> float:
    x, y = getattr(ds, split)
    return accuracy(subnet(supernet, arch, ds.train[0]), x, y, arch.resolution)
