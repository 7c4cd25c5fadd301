"""Fine-tuning the chosen subnet: the last step of the search, before compression and compile.

A subnet sliced out of the supernet shares its weights with every other subnet; a short training of its own, with
the labels and distillation from the supernet's largest subnet (OFA and BigNAS fine-tune the same way), recovers
what the sharing cost. The architecture does not change, so neither does the latency the search priced.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import data
from ..training import accuracy, distill

LR = 1e-3  # a tenth of the supernet's: the weights are already good, this only adapts them to one architecture
BATCH = 32
KD_WEIGHT = 1.0  # the distillation term beside the labels' cross-entropy


def finetune(student: nn.Module, resolution: int, teacher: nn.Module, teacher_resolution: int, ds: data.Dataset,
             steps: int, seed: int = 0, progress: Callable[[int, int, str, float], None] | None = None) -> nn.Module:
    """`student` trained for `steps` on ds.train with label smoothing and distillation from `teacher`; BatchNorm
    statistics recalibrated after. Returns the student (trained in place), in eval mode."""
    return distill(student, resolution, teacher, teacher_resolution, ds, steps, lr=LR, batch=BATCH,
                   weight_decay=1e-5, kd_weight=KD_WEIGHT, seed=seed, progress=progress, label="fine-tune")


def before_after(student: nn.Module, resolution: int, teacher: nn.Module, teacher_resolution: int,
                 ds: data.Dataset, steps: int, seed: int = 0,
                 progress: Callable[[int, int, str, float], None] | None = None) -> tuple[nn.Module, dict]:
    """finetune(), with the validation and test accuracy before and after."""
    before = {"val": accuracy(student, *ds.val, resolution), "test": accuracy(student, *ds.test, resolution)}
    student = finetune(student, resolution, teacher, teacher_resolution, ds, steps, seed, progress)
    after = {"val": accuracy(student, *ds.val, resolution), "test": accuracy(student, *ds.test, resolution)}
    return student, {"steps": steps, "before": before, "after": after}
