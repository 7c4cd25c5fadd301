"""The dense fp32 kernel family: schedule rules for the fused TIR functions a channels-last network lowers to.

TVM 0.27 applies no schedule on CPU, so a legalized convolution runs ~100x slower than a tiled one. After the
network is converted to NHWC (weights HWIO) every heavy operator is the same loop nest,

    out[n, h, w, c] = epilogue( reduce_{r...} f(in[...], weight[..., c]) )

with the output channel innermost and contiguous in both the output and the weights: conv2d (any stride, padding,
dilation, groups), depthwise and pointwise convolutions, dense layers (h and w absent), pooling and global means.
One rule therefore covers them all: a register tile of ``tile_w`` output pixels by ``k`` SIMD vectors of output
channels, accumulated over the whole reduction, then the fused epilogue (bias, folded BatchNorm, activation,
residual add) applied to the tile while it is still in registers; the tile loops outside run in parallel.

Rules follow dlight's ScheduleRule interface so they plug into ``dl.ApplyDefaultSchedule`` like TVM's own. They
take only functions lowering tagged with this family (kernels/common.py): an int8 or block-sparse nest is the
same shape of loop nest and must not be scheduled as fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tvm import ir, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from ...artifacts import LayerCost, LayerPlan
from ...cost.rows import layer_cost
from . import dwpw, winograd
from .common import (
    FAMILY,
    OP,
    REDUCE,
    REDUCTION,
    CpuSpec,
    extent,
    is_reduction,
    pick_vector,
    schedule_injective,
    split_at_reduction,
    tag_of,
    vectorize_innermost,
)

NAME = "dense"
log = logging.getLogger(__name__)
_MAX_STACK_BYTES = 1024  # runtime::kMaxStackAlloca
_REDUCE_UNROLL = 8
_WINDOW_ONLY = ("depthwise", "pool")  # reductions over a window of one channel: no weights to reuse
# A convolution this short per output (a stem over 3 channels, a 1x1 over 16-48) has so few weights per channel
# tile that it is scheduled like a window reduction: rows outermost, padding inlined (measured on MobileNetV2).
_SHORT_REDUCTION = 49
# Tag (set by lower.schedule_module for C packages): inline every convolution's zero padding, so no kernel asks
# for a padded copy of its input as workspace.
INLINE_PADDING = "edgeprune.inline_padding"


def _window_only(func: tirx.PrimFunc) -> bool:
    return tag_of(func, OP) in _WINDOW_ONLY or int(tag_of(func, REDUCTION, 0)) <= _SHORT_REDUCTION


def _plain_copy(sch: s_tir.Schedule, block) -> bool:
    """A producer that only copies (a padding stage with no padding): inlining it costs no bounds test."""
    body = sch.get(block).body
    return isinstance(body, tirx.stmt.BufferStore) and isinstance(body.value, ir.TensorLoad)


def ours(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and tag_of(func, FAMILY, NAME) == NAME


def _pick_tile(w: int, c: int, vec: int, budget: int) -> tuple[int, int]:
    """(tile_w, k): a w-by-(k vectors) accumulator tile within the register budget.

    Each step of the reduction loads k weight vectors (from L2 once a layer's weights outgrow L1) and broadcasts
    tile_w inputs (from L1) for tile_w*k FMAs. Two FMAs and two loads issue per cycle; counting a weight load as
    two, a tile is FMA-bound when tile_w*k >= 2k + tile_w. Among FMA-bound tiles take the most accumulators,
    then the widest in w (fewer passes over the weights). Only exact divisors, so no loop needs a predicate.
    """
    best, best_key = (1, 1), (-1.0, 0, 0)
    for k in range(1, 9):
        if c % (vec * k):
            continue
        for tw in range(1, min(w, budget // k) + 1):
            if w % tw:
                continue
            fmas = tw * k
            key = (fmas / max(fmas, 2 * k + tw), fmas, tw)
            if key > best_key:
                best, best_key = (tw, k), key
    return best


def stack_vectors(vector_bytes: int) -> int:
    """How many vectors an accumulator tile may hold and stay on the stack, where LLVM keeps it in registers.

    TVM allocates a buffer on the stack only when it is strictly smaller than kMaxStackAlloca; a tile of exactly
    1 KiB (16 AVX-512 vectors) becomes a heap workspace. Such tiles ran at 49-86% of a smaller tile's speed
    (the 3->32 stem at 224: 340 against 206 us at one thread)."""
    return (_MAX_STACK_BYTES - 1) // vector_bytes


def _pick_window_tile(w: int) -> tuple[int, int]:
    """(tile_w, 1) for a window sliding along w (depthwise, pooling): up to 8 pixels of one channel vector.

    Here every FMA has its own input, so the tile has nothing to gain from more channel vectors (which _pick_tile
    would add to reuse broadcast inputs) and more accumulators only spill the window's inputs and taps. Measured
    on 13 of MobileNetV2's depthwise layers at one thread (Zen 4), both with the width taps unrolled: 424 us
    summed against 451 with _pick_tile's tiles (32x32x72: 76 against 52 GFLOP/s). A row with no divisor from 4
    to 8 (a 13-wide map) is one tile.
    """
    tw = max(d for d in range(1, 9) if w % d == 0)
    return (w, 1) if tw < 4 and w <= 16 else (tw, 1)


def unroll_reduction(sch: s_tir.Schedule, reduce: list, spec: CpuSpec) -> list:
    """The reduction loops with the innermost unrolled by 8 (its outer part then last): fewer loop branches between
    a tile's FMA bursts (ResNet-18: 14% faster at its best, measured against the rolled loop in the same run). Not
    on a microcontroller's scalar FPU (one lane), where flash is the budget: the unrolled copies made up most of a
    package's code."""
    if (reduce and spec.lanes > 1 and (extent(sch, reduce[-1]) or 1) % _REDUCE_UNROLL == 0
            and extent(sch, reduce[-1]) > _REDUCE_UNROLL):
        outer, inner = sch.split(reduce[-1], [None, _REDUCE_UNROLL])
        sch.unroll(inner)
        return [*reduce[:-1], outer]
    return reduce


def _pack_weights(sch: s_tir.Schedule, red, c: int, tile: int) -> None:
    """Store constant weights as [C/tile, ..., tile]: each channel tile's slice contiguous.

    In HWIO a tile's weights sit at a stride of C floats; with C a power of two that stride maps every row to a
    handful of cache sets, so a 512-channel layer's slice cannot stay in L1 or L2 however small it is. The copy is
    marked as layout-rewrite preprocessing: Relax splits it out and folds it into the constants at compile time.
    """
    func = sch.mod["main"]
    attrs = func.attrs or {}
    free = {int(i) for i in attrs.get("layout_free_buffers", [])}
    params = [func.params[i] for i in free if i < len(func.params)]
    for idx, region in enumerate(sch.get(red).reads):
        if not any(p.same_as(region.source) for p in params):
            continue
        shape = [int(d) for d in region.source.ty.shape]
        if shape[-1] != c or tile >= c or len(shape) not in (2, 4):
            continue
        if len(shape) == 4:
            def index_map(a, b, i, o):
                return (o // tile, a, b, i, o % tile)
        else:
            def index_map(i, o):
                return (o // tile, i, o % tile)
        copy = sch.cache_read(red, idx, "global")
        sch.transform_layout(red, ("read", idx), index_map)
        sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
        return


class ChannelsLastReduction(dl.base.ScheduleRule):
    """conv2d / depthwise / pointwise / dense / pooling / mean in NHWC, with a fused elementwise epilogue."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not ours(func) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(s_tir.Schedule(func), CpuSpec.of(target), _window_only(func),
                                  bool(tag_of(func, INLINE_PADDING, False)))
        except (s_tir.ScheduleError, ValueError) as e:
            log.debug("ChannelsLastReduction does not fit: %s", str(e).splitlines()[0])
            return None

    def _schedule(self, sch: s_tir.Schedule, spec: CpuSpec, window_only: bool, inline_padding: bool = False):
        # Epilogue: every elementwise stage inlined into the last one, which then writes the output.
        parts = split_at_reduction(sch)
        if parts is None:
            return None
        before, red, after = parts
        epilogue = after[-1] if after else sch.cache_write(red, 0, "global")
        if is_reduction(sch, epilogue):
            return None

        loops = sch.get_loops(red)
        kinds = [int(iv.iter_type) for iv in sch.get(red).iter_vars]
        if len(loops) != len(kinds) or any(extent(sch, lp) is None for lp in loops):
            return None
        spatial = [lp for lp, k in zip(loops, kinds) if k != REDUCE]
        reduce = [lp for lp, k in zip(loops, kinds) if k == REDUCE]
        if not spatial or kinds[: len(spatial)] != [0] * len(spatial):
            return None  # reduction loops interleaved with spatial ones: not the nest we know

        c_loop = spatial[-1]
        w_loop = spatial[-2] if len(spatial) >= 2 else None
        outer = spatial[:-2] if len(spatial) >= 2 else []
        c = extent(sch, c_loop)
        w = extent(sch, w_loop) if w_loop is not None else 1
        vec = pick_vector(c, spec.lanes)
        budget = min(spec.acc_regs, stack_vectors(vec * 4))  # a larger tile goes to the heap, not to registers
        # A window sliding along w over channels (depthwise, pooling; not a short convolution, whose taps also
        # run over input channels): its own tile, and its width taps inside the pixel tile (below).
        sliding = (spec.lanes > 1 and w_loop is not None and tag_of(sch.mod["main"], OP) in _WINDOW_ONLY)
        tw, k = _pick_window_tile(w) if sliding else _pick_tile(w, c, vec, budget)

        _pack_weights(sch, red, c, vec * k)
        co, ck, cv = sch.split(c_loop, [None, k, vec])
        # A reduction over input channels reads a slice of weights per channel tile: channel tiles outermost,
        # so the chunks a thread runs in a row share that slice in its cache. A window-only reduction
        # (depthwise, pooling) has next to no weights but reads each input pixel's channels once: rows
        # outermost, so a pixel's cache lines are used by all channel tiles while they are hot.
        order = [*outer, co] if window_only else [co, *outer]
        par = order
        if w_loop is not None:
            wo, wi = sch.split(w_loop, [None, tw])
            taps = [lp for lp in reduce if extent(sch, lp) > 1]
            if sliding and taps and extent(sch, taps[-1]) <= 8:
                # The width taps unrolled around the pixel tile: neighbouring outputs read the same input
                # vectors, and LLVM loads each once (tile_w + 2 loads for 3 * tile_w FMAs at stride 1, where the
                # taps outside the tile loaded one vector per FMA). Same 4-pixel tile: 56x56x144 75 -> 92 GFLOP/s.
                rx = taps[-1]
                sch.reorder(*order, wo, *[lp for lp in reduce if not lp.same_as(rx)], rx, wi, ck, cv)
                sch.unroll(rx)
            else:
                sch.reorder(*order, wo, *reduce, wi, ck, cv)
            tile_root = wo
        else:
            sch.reorder(*order, *reduce, ck, cv)
            tile_root = order[-1]
            wi = None
        # Epilogue: computed per tile, right after the tile's reduction, while it is still hot.
        sch.reverse_compute_at(epilogue, tile_root, preserve_unit_loops=True)
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        if (extent(sch, fused) or 1) > 1:
            sch.parallel(fused)

        reduce = unroll_reduction(sch, reduce, spec)
        # Loop kinds first: once the init is split off, the update block no longer counts as a reduction.
        if vec > 1:
            sch.vectorize(cv)
        sch.unroll(ck)
        if wi is not None:
            sch.unroll(wi)
        if reduce:
            init = sch.decompose_reduction(red, reduce[0])
            if vec > 1:
                sch.vectorize(sch.get_loops(init)[-1])

        # The epilogue's own loops under the tile: vectorize its innermost when it divides.
        vectorize_innermost(sch, epilogue, vec)

        # Producers (zero padding, layout copies). Inlined padding puts a bounds test on every load of the
        # reduction; a padded copy costs one pass over the input. Over a window alone (depthwise, pooling) the
        # copy is as large as the work, so inline; over input channels too the copy is cheap by comparison and
        # keeps tests out of the inner loop (2x on ResNet's 3x3 convolutions, measured). But a copy is a buffer
        # as large as the input: a C package (firmware, where RAM is the budget) inlines all padding, and a
        # copy that pads nothing (a pointwise conv's) is inlined everywhere.
        for b in reversed(before):
            if is_reduction(sch, b):
                return None
            if window_only or inline_padding or _plain_copy(sch, b):
                try:
                    sch.compute_inline(b)
                    continue
                except s_tir.ScheduleError:
                    pass
            schedule_injective(sch, b, spec.lanes)
        return sch


class Injective(dl.base.ScheduleRule):
    """Elementwise, broadcast, transpose, concat, padding: one parallel, vectorized pass per output."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not ours(func) or target.kind.name != "llvm":
            return None
        spec = CpuSpec.of(target)
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(dl.analysis.get_root_block(sch))
        except ValueError:
            return None
        if any(is_reduction(sch, b) for b in blocks):
            return None
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - stays a separate pass
                pass
        for b in sch.get_child_blocks(dl.analysis.get_root_block(sch)):
            size = 1
            for lp in sch.get_loops(b):
                size *= extent(sch, lp) or 1
            schedule_injective(sch, b, spec.lanes, parallel=size >= 4096)
        return sch


# Winograd's transforms first: Injective would take them, without the unrolling their constants need to fold
RULES: list[dl.base.ScheduleRule] = [
    winograd.Transforms(ours), dwpw.DepthwisePointwise(), ChannelsLastReduction(), Injective()]


def cost_row(op: str, inputs: Sequence[Sequence[int]], weights: Sequence[Sequence[int]],
             outputs: Sequence[Sequence[int]], reduction: int, kernel: str, sources: Sequence[str] = (),
             tags: dict | None = None) -> LayerCost:
    """The row a dense fp32 kernel reports: every weight kept, 32 bits everywhere. (`tags`, the kernel's
    attributes, tell other families their bits and density; dense needs none.)"""
    return layer_cost(op, inputs, weights, outputs, reduction=reduction, plan=LayerPlan(kernel), family=NAME,
                      kernel=kernel, sources=sources)
