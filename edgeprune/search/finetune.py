"""Fine-tuning the chosen subnet: the last step of the search, before compression and compile.

A subnet sliced out of the supernet shares its weights with every other subnet; a short training of its own, with
the labels and distillation from the supernet's largest subnet (OFA and BigNAS fine-tune the same way), recovers
what the sharing cost. The architecture does not change, so neither does the latency the search priced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from .evaluate import accuracy, recalibrate
from .train import batch_at, learning_rate, optimizer

LR = 1e-3  # a tenth of the supernet's: the weights are already good, this only adapts them to one architecture
BATCH = 32
KD_WEIGHT = 1.0  # the distillation term beside the labels' cross-entropy


def finetune(student: nn.Module, resolution: int, teacher: nn.Module, teacher_resolution: int, ds: data.Dataset,
             steps: int, seed: int = 0, progress: Callable[[int, int, str, float], None] | None = None) -> nn.Module:
    """`student` trained for `steps` on ds.train with label smoothing and distillation from `teacher`; BatchNorm
    statistics recalibrated after. Returns the student (trained in place), in eval mode."""
    if steps <= 0:
        return student.eval()
    torch.manual_seed(seed)
    teacher.eval()
    opt = optimizer(student, LR, 1e-5)  # the supernet's recipe, at a tenth of its rate
    for step in range(steps):
        xb, yb = batch_at(*ds.train, BATCH, seed, step)
        for g in opt.param_groups:
            g["lr"] = learning_rate(LR, step, steps)
        with torch.no_grad():
            soft = F.softmax(teacher(data.tensors(xb, teacher_resolution)), 1)
        student.train()
        out = student(data.tensors(xb, resolution))
        loss = F.cross_entropy(out, torch.from_numpy(yb), label_smoothing=0.1) + \
            KD_WEIGHT * F.kl_div(F.log_softmax(out, 1), soft, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress(step + 1, steps, "fine-tune", float(loss.detach()))
    return recalibrate(student, ds.train[0], resolution)


def before_after(student: nn.Module, resolution: int, teacher: nn.Module, teacher_resolution: int,
                 ds: data.Dataset, steps: int, seed: int = 0,
                 progress: Callable[[int, int, str, float], None] | None = None) -> tuple[nn.Module, dict]:
    """finetune(), with the validation and test accuracy before and after."""
    before = {"val": accuracy(student, *ds.val, resolution), "test": accuracy(student, *ds.test, resolution)}
    student = finetune(student, resolution, teacher, teacher_resolution, ds, steps, seed, progress)
    after = {"val": accuracy(student, *ds.val, resolution), "test": accuracy(student, *ds.test, resolution)}
    return student, {"steps": steps, "before": before, "after": after}
