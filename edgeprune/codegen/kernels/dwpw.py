"""The schedule of a depthwise + pointwise kernel (codegen/dwpw.py merges the two; dense family, op "dwpw").

Rows of the output map are the parallel jobs. For each row, the depthwise outputs of the whole row, every channel,
are computed first into a buffer of W x C floats (the size of L1 for MobileNetV2's widest rows, 56 x 144), with
the depthwise epilogue (bias, activation) applied per channel vector while the accumulators are in registers; then
the pointwise layer runs over the row, tiled as the dense rule tiles a pointwise layer (tile_w pixels by k vectors of
output channels), reading its inputs from that buffer. The expanded tensor between the two layers never exists in
memory. A row rather than a tile of pixels: one workspace buffer per row instead of one per tile, and longer runs
of the depthwise loop (3-6% faster alone and 1.3-6% in MobileNetV2 at two threads, measured against 8-pixel tiles).

In a C package the expanding pointwise layer before a stride-2 depthwise one is merged too: its three rows that an
output row reads are computed at that row (one of them again for the next row: 1.5x the layer's work), so the
expanded map, the largest tensor of such a block and MobileNetV2's peak, never exists.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import FAMILY, OP, REDUCE, CpuSpec, extent, is_reduction, pick_vector, tag_of, vectorize_innermost

log = logging.getLogger(__name__)
OP_NAME = "dwpw"


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
    if len(reds) not in (2, 3):
        return None
    e_red, e_epi = None, None
    if len(reds) == 3:  # an expanding pointwise layer first (codegen/dwpw.py merges one before a stride-2 depthwise)
        e_red = reds[0]
        names = [sch.get(b).name_hint for b in blocks]
        i_e, i_d = names.index(sch.get(e_red).name_hint), names.index(sch.get(reds[1]).name_hint)
        for b in blocks[:i_e]:  # its input copy (a pad stage that pads nothing)
            sch.compute_inline(b)
        tail, pad = blocks[i_e + 1:i_d - 1], blocks[i_d - 1]  # its epilogue stages; the depthwise's zero padding
        for b in tail[:-1]:
            sch.compute_inline(b)
        e_epi = tail[-1] if tail else sch.cache_write(e_red, 0, "global")
        sch.compute_inline(pad)  # the depthwise reads the expanded rows in place, the border as zeros
        blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
        reds = reds[1:]
    d_red, p_red = reds
    names = [sch.get(b).name_hint for b in blocks]
    i_d, i_p = names.index(sch.get(d_red).name_hint), names.index(sch.get(p_red).name_hint)
    before, between, after = blocks[:i_d], blocks[i_d + 1:i_p], blocks[i_p + 1:]
    if e_red is not None:
        before = []  # the expanding layer's blocks: scheduled below
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
    if len(_loops(sch, p_red)[0]) != 4:
        return None
    row = _tile_pointwise(sch, p_red, p_epi, spec, dense, parallel=True)

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
    if e_red is not None:
        _expand_at(sch, e_red, e_epi, row, spec, dense)
    # The depthwise padding: inlined (a padded copy would be as large as the work, and workspace).
    for b in reversed(before):
        if is_reduction(sch, b):
            return None
        sch.compute_inline(b)
    return sch


def _tile_pointwise(sch: s_tir.Schedule, red, epi, spec: CpuSpec, dense, parallel: bool = False):
    """A pointwise layer's loops over a row (or rows) of its map as the dense rule tiles them: tile_w pixels by k
    vectors of output channels, accumulated over the whole reduction, its epilogue applied per tile. With
    `parallel`, the loops outside the row (batch, rows) fused into one parallel loop, which is returned. (Fused
    only after the reduction is decomposed, the depthwise rows computed at it ran 26x slower.)"""
    spatial, reduce = _loops(sch, red)
    c, w = extent(sch, spatial[-1]), extent(sch, spatial[-2])
    vec = pick_vector(c, spec.lanes)
    tw, k = dense._pick_tile(w, c, vec, min(spec.acc_regs, dense.stack_vectors(vec * 4)))
    dense._pack_weights(sch, red, c, vec * k)
    spatial, reduce = _loops(sch, red)
    outer = spatial[:-2]
    wo, wi = sch.split(spatial[-2], [None, tw])
    co, ck, cv = sch.split(spatial[-1], [None, k, vec])
    sch.reorder(*outer, wo, co, *reduce, wi, ck, cv)
    sch.reverse_compute_at(epi, co, preserve_unit_loops=True)
    row = None
    if parallel:
        row = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(row)
    reduce = dense.unroll_reduction(sch, reduce, spec)
    if vec > 1:
        sch.vectorize(cv)
    sch.unroll(ck)
    sch.unroll(wi)
    init = sch.decompose_reduction(red, reduce[0])
    if vec > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    vectorize_innermost(sch, epi, vec)
    return row


def _expand_at(sch: s_tir.Schedule, red, epi, row, spec: CpuSpec, dense) -> None:
    """The expanding pointwise layer's rows that the row's depthwise reads (three at stride 2, one of them read by
    the next row too), computed at the row into their own buffer, tiled as a pointwise layer."""
    sch.compute_at(epi, row, preserve_unit_loops=True)
    sch.compute_at(red, row, preserve_unit_loops=True)
    if (extent(sch, _loops(sch, red)[0][-3]) or 0) > 3:  # the whole map again for every row: refuse that
        raise ValueError("the expanding layer's rows did not narrow to the depthwise window")
    _tile_pointwise(sch, red, epi, spec, dense)
