"""Fine-tuning the chosen subnet: distillation from the largest subnet recovers accuracy the sharing cost."""

from __future__ import annotations

import pytest
import torch

from edgeprune import data
from edgeprune.pipeline import SUPERNET
from edgeprune.search import space as S
from edgeprune.search.evaluate import accuracy, subnet
from edgeprune.search.finetune import before_after
from edgeprune.search.train import load


@pytest.mark.slow
def test_finetune_recovers_a_damaged_subnet_from_the_teacher():
    """A small subnet whose classifier is re-initialised is at chance; 60 steps with the labels and the largest
    subnet as teacher bring it far above, and the report carries both figures."""
    supernet, ckpt = load(SUPERNET)
    ds = data.load(None, seed=0)
    res = tuple(ckpt["space"]["resolutions"])
    space = S.Space(resolutions=res)
    teacher_arch = space.largest(max(res))
    teacher = subnet(supernet, teacher_arch, ds.train[0])
    arch = space.smallest(min(res)).replace(last=S.channels(S.LAST, 0.5))
    student = subnet(supernet, arch, ds.train[0])
    torch.manual_seed(0)
    head = student.classifier if hasattr(student, "classifier") else list(student.modules())[-1]
    torch.nn.init.normal_(head.weight, std=0.5)
    student, figures = before_after(student, arch.resolution, teacher, teacher_arch.resolution, ds, 60)
    assert figures["steps"] == 60
    assert figures["before"]["val"] < 0.3
    assert figures["after"]["val"] > figures["before"]["val"] + 0.2
    assert figures["after"]["val"] == accuracy(student, *ds.val, arch.resolution)  # eval mode, BN recalibrated
