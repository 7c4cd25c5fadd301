"""Kernel families: one file each. A family owns what it matches (the `edgeprune.family` tag lowering puts on a
fused function, kernels/common.py), its schedule rules and the cost row it reports for each kernel call.

    dense.py   fp32: conv, depthwise, pointwise, dense, pooling, means, and data movement
               (winograd.py: its rule for the transforms of Winograd convolutions, codegen/winograd.py;
               dwpw.py: its rule for a depthwise and a pointwise convolution merged by codegen/dwpw.py)
    bsr.py     1xN block-sparse pointwise and dense layers, swapped in for dense kernels by `bsr.sparsify`
    int8.py    quantized convolutions and dense layers (VNNI on x86, widening multiply-adds elsewhere), called by
               the modules codegen/integer.py builds from an integer program
    binary.py  bit-packed binary convolutions (xnor / and + popcount), called by the modules codegen/binarized.py
               makes from a network's binary layers
    (adding a family is adding a file and a line below)
"""

from __future__ import annotations

from types import ModuleType

from . import binary, bsr, dense, int8
from .common import CpuSpec, tag_kernels

FAMILIES: dict[str, ModuleType] = {dense.NAME: dense, bsr.NAME: bsr, int8.NAME: int8, binary.NAME: binary}

__all__ = ["FAMILIES", "CpuSpec", "family", "rules", "tag_kernels"]


def family(name: str) -> ModuleType:
    return FAMILIES[name]


def rules() -> list:
    """Every family's schedule rules, for dlight's ApplyDefaultSchedule: each takes only its own tagged kernels."""
    return [rule for fam in FAMILIES.values() for rule in fam.RULES]
