"""The schedule of a depthwise + pointwise kernel (codegen/dwpw.py merges the two; dense family, op "dwpw").

Rows of the output map are the parallel jobs. For each row, the depthwise outputs of the whole row, every channel,
are computed first into a buffer of W x C floats (the size of L1 for MobileNetV2's widest rows, 56 x 144), with
the depthwise epilogue (bias, activation) applied per channel vector while the accumulators are in registers; then
the pointwise layer runs over the row, tiled as the dense rule tiles a pointwise layer (tile_w pixels by k vectors of
output channels), reading its inputs from that buffer. The expanded tensor between the two layers never exists in
memory. A row rather than a tile of pixels: one workspace buffer per row instead of one per tile, and longer runs
of the depthwise loop (3-6% faster alone and 1.3-6% in MobileNetV2 at two threads, measured against 8-pixel tiles).
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import FAMILY, OP, REDUCE, CpuSpec, extent, is_reduction, pick_vector, tag_of, vectorize_innermost

log = logging.getLogger(__name__)
OP_NAME = "dwpw"
_REDUCE_UNROLL = 8


def _loops(sch: s_tir.Schedule, block) -> tuple[list, list]:
    """(spatial, reduction) loops of a block: the innermost loops, one per iteration variable."""
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    loops = loops[len(loops) - len(ivs):]
    kinds = [int(iv.iter_type) for iv in ivs]
    return [lp for lp, k in zip(loops, kinds) if k != REDUCE], [lp for lp, k in zip(loops, kinds) if k == REDUCE]


class DepthwisePointwise(dl.base.ScheduleRule):
    """A merged depthwise + pointwise kernel, row by row (the module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or tag_of(func, OP) != OP_NAME or tag_of(func, FAMILY) != "dense" \
                or target.kind.name != "llvm":
            return None
        try:
            return _schedule(s_tir.Schedule(func), CpuSpec.of(target))
        except (s_tir.ScheduleError, ValueError) as e:
            log.debug("DepthwisePointwise does not fit: %s", str(e).splitlines()[0])
            return None


def _schedule(sch: s_tir.Schedule, spec: CpuSpec) -> s_tir.Schedule | None:
    from . import dense  # its tile helpers; dense lists this rule among its own, so not at import time

    blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
    reds = [b for b in blocks if is_reduction(sch, b)]
    if len(reds) != 2:
        return None
    d_red, p_red = reds
    names = [sch.get(b).name_hint for b in blocks]
    i_d, i_p = names.index(sch.get(d_red).name_hint), names.index(sch.get(p_red).name_hint)
    before, between, after = blocks[:i_d], blocks[i_d + 1:i_p], blocks[i_p + 1:]
    # Between the two: the depthwise tail (bias, activation) and the pointwise's copy of its input (a pad stage
    # that pads nothing). The copy goes; the tail collapses into its last stage, which writes the buffer the
    # pointwise reads.
    if between and dense._plain_copy(sch, between[-1]):
        sch.compute_inline(between[-1])
        between = between[:-1]
    for b in between[:-1]:
        sch.compute_inline(b)
    d_epi = between[-1] if between else None
    for b in after[:-1]:
        sch.compute_inline(b)
    p_epi = after[-1] if after else sch.cache_write(p_red, 0, "global")

    # Pointwise: tiles of tile_w pixels by k vectors of channels, within a row; rows parallel.
    spatial, reduce = _loops(sch, p_red)
    if len(spatial) != 4:
        return None
    c, w = extent(sch, spatial[3]), extent(sch, spatial[2])
    vec = pick_vector(c, spec.lanes)
    tw, k = dense._pick_tile(w, c, vec, min(spec.acc_regs, dense.stack_vectors(vec * 4)))
    dense._pack_weights(sch, p_red, c, vec * k)
    (n_, h_, w_, c_), reduce = _loops(sch, p_red)
    wo, wi = sch.split(w_, [None, tw])
    co, ck, cv = sch.split(c_, [None, k, vec])
    sch.reorder(n_, h_, wo, co, *reduce, wi, ck, cv)
    sch.reverse_compute_at(p_epi, co, preserve_unit_loops=True)
    row = sch.fuse(n_, h_)
    sch.parallel(row)
    last = reduce[-1]
    if (extent(sch, last) or 1) % _REDUCE_UNROLL == 0 and extent(sch, last) > _REDUCE_UNROLL:
        outer, inner = sch.split(last, [None, _REDUCE_UNROLL])
        sch.unroll(inner)
        reduce = [*reduce[:-1], outer]
    if vec > 1:
        sch.vectorize(cv)
    sch.unroll(ck)
    sch.unroll(wi)
    init = sch.decompose_reduction(p_red, reduce[0])
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    vectorize_innermost(sch, p_epi, vec)

    # Depthwise: the row's outputs, computed at the row, in the dense rule's sliding-window tiles (up to 8 pixels
    # of one channel vector, the width taps unrolled around them), its epilogue per tile.
    if d_epi is not None:
        sch.compute_at(d_epi, row, preserve_unit_loops=True)
    sch.compute_at(d_red, row, preserve_unit_loops=True)
    spatial, reduce = _loops(sch, d_red)
    cd = extent(sch, spatial[-1])
    dvec = pick_vector(cd, spec.lanes)
    dense._pack_weights(sch, d_red, cd, dvec)
    spatial, reduce = _loops(sch, d_red)
    dwo, dwi = sch.split(spatial[-2], [None, dense._pick_window_tile(extent(sch, spatial[-2]))[0]])
    dco, dcv = sch.split(spatial[-1], [None, dvec])
    taps = [lp for lp in reduce if (extent(sch, lp) or 1) > 1]
    rx = taps[-1] if taps and extent(sch, taps[-1]) <= 8 else None
    rest = [lp for lp in reduce if rx is None or not lp.same_as(rx)]
    sch.reorder(dwo, dco, *rest, *([rx] if rx is not None else []), dwi, dcv)
    if rx is not None:
        sch.unroll(rx)
    sch.unroll(dwi)
    if dvec > 1:
        sch.vectorize(dcv)
    if d_epi is not None:
        sch.reverse_compute_at(d_epi, dco, preserve_unit_loops=True)
        vectorize_innermost(sch, d_epi, dvec)
    first = rest[0] if rest else rx
    if first is not None:
        dinit = sch.decompose_reduction(d_red, first)
        if dvec > 1:
            sch.vectorize(sch.get_loops(dinit)[-1])
    # The depthwise padding: inlined (a padded copy would be as large as the work, and workspace).
    for b in reversed(before):
        if is_reduction(sch, b):
            return None
        sch.compute_inline(b)
    return sch
