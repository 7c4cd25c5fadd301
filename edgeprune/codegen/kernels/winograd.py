"""Schedules for the input and output transforms of Winograd convolutions (codegen/winograd.py legalizes them).

Both transforms select their constant coefficients by the position in the tile (a chain of selects on a loop
variable), so the tile loops must be unrolled: each unrolled copy then folds to a few additions and multiplies by
small constants, and the copies share their row sums. Channels, innermost and contiguous in every buffer, are the
SIMD lanes; tiles run in parallel. The GEMM between them is an ordinary dense-family nest (ChannelsLastReduction).
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import CpuSpec, extent, pick_vector, schedule_injective

INPUT, GEMM, OUTPUT = "winograd_input", "winograd_gemm", "winograd_output"


class Transforms(dl.base.ScheduleRule):
    """A fused function holding a Winograd input transform (V[a, b, p, c]) or output transform (its NHWC output
    with the fused epilogue, and whatever else fusion put after it: a concatenation)."""

    def __init__(self, ours: Callable[[tirx.PrimFunc], bool]):
        self.ours = ours  # the family's own test: only fp32 dense kernels

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not self.ours(func) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
        except ValueError:
            return None
        names = [sch.get(b).name_hint for b in blocks]
        lanes = CpuSpec.of(target).lanes
        try:
            if names[-1].startswith(INPUT):
                return _input(sch, blocks, lanes)
            if any(n.startswith(OUTPUT + "_rows") for n in names):
                return _output(sch, blocks, names, lanes)
        except s_tir.ScheduleError:
            return None
        return None


def _inline_producers(sch: s_tir.Schedule, blocks: list, keep) -> None:
    """Inline every block but the last and `keep` (the row stage): the padding and a layout transpose are read
    per tile, the epilogue is applied as each output is written."""
    for b in blocks[:-1]:
        if not sch.get(b).same_as(sch.get(keep)):
            sch.compute_inline(b)


def _rows_at(sch: s_tir.Schedule, rows, loop, vec: int) -> None:
    """The row stage (A^T M or B^T d, one row of it) computed per tile row, in registers: a few SIMD vectors."""
    sch.compute_at(rows, loop, preserve_unit_loops=True)
    sch.set_scope(rows, 0, "local")
    *_, j, c = sch.get_loops(rows)
    sch.unroll(j)
    if vec > 1:
        sch.vectorize(c)


def _find(sch: s_tir.Schedule, blocks: list, name: str):
    return next(b for b in blocks if sch.get(b).name_hint.startswith(name))


def _input(sch: s_tir.Schedule, blocks: list, lanes: int) -> s_tir.Schedule:
    rows = _find(sch, blocks, INPUT + "_rows")
    _inline_producers(sch, blocks, rows)
    block = blocks[-1]
    k, l_, p, c = sch.get_loops(block)
    vec = pick_vector(extent(sch, c), lanes)
    co, ci = sch.split(c, [None, vec])
    sch.reorder(p, co, k, l_, ci)
    sch.parallel(sch.fuse(p, co))
    _rows_at(sch, rows, k, vec)
    sch.unroll(k)
    sch.unroll(l_)
    if vec > 1:
        sch.vectorize(ci)
    return sch


def _output(sch: s_tir.Schedule, blocks: list, names: list[str], lanes: int) -> s_tir.Schedule:
    rows = _find(sch, blocks, OUTPUT + "_rows")
    at = [i for i, n in enumerate(names) if n.startswith(OUTPUT)][-1]  # after the row stage
    final = blocks[at]
    m = int(sch.get(rows).writes[0].source.ty.shape[0])
    rest = _fuse_epilogue(sch, final, blocks[at + 1:])
    n, h, w, c = sch.get_loops(final)
    vec = pick_vector(int(sch.get(final).writes[0].source.ty.shape[3]), lanes)
    ho, hi = sch.split(h, [None, m])
    wo, wi = sch.split(w, [None, m])
    co, ci = sch.split(c, [None, vec])
    sch.reorder(n, ho, wo, co, hi, wi, ci)
    sch.parallel(sch.fuse(n, ho, wo, co))
    _rows_at(sch, rows, hi, vec)
    sch.unroll(hi)
    sch.unroll(wi)
    if vec > 1:
        sch.vectorize(ci)
    for b in rest:
        schedule_injective(sch, b, lanes)
    return sch


def _fuse_epilogue(sch: s_tir.Schedule, final, after: list) -> list:
    """Fold the elementwise stages after the transform (bias, activation, residual add) into it, so each output
    is finished in registers; return the stages that do not fold (a concatenation, a layout transpose)."""
    for i, b in enumerate(after):
        try:
            sch.reverse_compute_inline(b)
        except s_tir.ScheduleError:
            rest = after[i:]
            for r in rest[:-1]:
                sch.compute_inline(r)
            return rest[-1:]
    return []

