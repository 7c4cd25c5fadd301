"""Channels-first (CHW) runs of sparse layers: a depthwise kernel, transposes, and the pass that makes the runs.

Where a network's pointwise layers run block-sparse, the sparse kernel wants each channel's map contiguous (one
vector load per block and tile of pixels, XNNPACK's SpMM); channels-last data must be transposed in and out of every
sparse kernel instead (kernels/bsr.py, "pixels"). A run of layers kept channels-first pays that once, at its edges
(`segments`, the last step of bsr.sparsify when asked). Its depthwise convolutions must then read and write
channels-first too: `depthwise_kernel`.

It is made from the fused channels-last kernel TVM legalized (its padding, stride, weights and elementwise tail are
read off it, as kernels/bsr.py reads a pointwise one), so it computes the same function with [1, C, H, W] tensors:
  * one channel per parallel job, a vector of L output pixels of a row at a time, read straight from the input:
    no padded copy. A load that would leave the row is moved inside it and its lanes shuffled against zeros (the
    padding); kernel rows above or below the map are left out of the first and last output rows' code;
  * stride 1: the row's vectors loaded once at the output vectors' places, the taps shifted from them by shuffles
    (rows of three vectors or more; `_from_grid`); stride 2: a load of 2L pixels and a shuffle of its even or odd
    lanes, not a gather, the tap past its end finished from the next load;
  * one accumulation per kernel row, so a vector's FMAs are kh independent chains, and several vectors (rows of
    a small map together) unrolled;
  * the last vector of a row that L does not divide is moved back to end at the row's last pixel (it recomputes a
    few outputs rather than masking);
  * rows shorter than the CPU's vector at stride 1 (7x7 and 14x14 maps at 16 lanes): vectors over the map's pixels
    in row-major order, each tap a shift of the flat index, the lanes it would wrap or leave the map by zeroed
    (`flat_rows`), not rows at 4 or 8 lanes. MobileNetV2's three 7x7 depthwise layers, 2 threads, Zen 5: 0.035 ms
    by rows, 0.011 ms so, where channels-last takes 0.018.

Against our channels-last depthwise kernel (one thread, Zen 4, MobileNetV2's shapes): 0.7-0.85x at stride 1 on
14x14 and larger maps, 0.5-0.7x at stride 2, 0.4x at 7x7 (4-lane vectors). On Zen 5 (16 lanes, 2026-12-02, after
the shifted taps): 0.84x at 56x56, 0.75x at 28x28 and 0.6x at 14x14 stride 1; 0.9x (112x112), 0.7x (56x56) and
0.35x (28x28, 14x14, rows of 8 or 4 lanes) at stride 2. In MobileNetV2 at 50% 1x4 sparsity,
one thread, the run's sparse kernels took 3.6 ms where the "pixels" ones took 4.3, its depthwise ones 1.0 where the
channels-last ones took 0.8: the network 7% faster at one thread, as fast at two, where the largest pointwise
layers are bound by writing their outputs (bench/sparse.py times both builds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import tvm
import tvm.sym
from tvm import relax, s_tir, tirx

from .bsr import VARIANT, _loads, layout_free_epilogue, operands_and_epilogue, pixel_lanes, rebuild, to_chw
from .bsr import kernel as bsr_kernel
from .common import FAMILY, FLOPS, OP, REDUCTION, CpuSpec, split_at_reduction, tag_of

UNITS = 4  # output vectors computed together: 4 x kh independent accumulations


@dataclass
class Depthwise:
    """What the channels-first kernel needs from a fused depthwise kernel (channels-last, HWIO weights)."""

    x: tirx.Buffer  # [1, H, W, C]
    weight: int  # the weight's parameter index: [kh, kw, 1, C]
    out: tirx.Buffer  # [1, OH, OW, C]
    extras: list[int]  # parameter indices the epilogue reads, in order
    acc: tirx.Buffer
    iters: list[tirx.Var]
    value: tirx.PrimExpr
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left (bottom and right follow from the shapes)
    flat: list = field(default_factory=list)  # (the fused kernel's buffer, this kernel's channels-first one)


def _coefficient(index, var) -> tuple[int, int | None] | None:
    """(a, b) where index = a * var + b, a a constant; b too, or None where it is an expression of other variables;
    None where the index is not linear in var."""
    found = tvm.sym.detect_linear_equation(index, [var])
    if len(found) != 2 or not isinstance(found[0], tirx.IntImm):
        return None
    return int(found[0]), int(found[1]) if isinstance(found[1], tirx.IntImm) else None


def read_depthwise(func: tirx.PrimFunc) -> Depthwise | None:
    """The parts of a fused depthwise kernel: an optional padding copy of its input, a reduction over a kh x kw
    window of one channel (dilation 1, the same stride for every output), then elementwise stages; None for
    anything else."""
    try:
        sch = s_tir.Schedule(func)
        parts = split_at_reduction(sch)
    except Exception:  # noqa: BLE001 - not a single-nest function
        return None
    if parts is None or len(parts[0]) > 1:
        return None
    before, red_rv, after = parts
    params = list(func.params)
    red = sch.get(red_rv)
    acc = red.writes[0].source
    source, offsets = None, (0, 0)
    if before:  # the padding stage: pad[n, h, w, c] = x[n, h - top, w - left, c] inside, 0 outside
        blk = sch.get(before[0])
        reads = [ld for ld in _loads(blk.body.value) if any(ld.source.same_as(p) for p in params)]
        if not isinstance(blk.body, tirx.BufferStore) or len(reads) != 1 or len(blk.iter_vars) != 4:
            return None
        coeffs = [_coefficient(i, v.var) for i, v in zip(reads[0].indices, blk.iter_vars)]
        if any(c is None or c[0] != 1 or c[1] is None for c in coeffs) or coeffs[0][1] or coeffs[3][1]:
            return None
        source, padded, offsets = reads[0].source, blk.body.buffer, (-coeffs[1][1], -coeffs[2][1])
    spatial = [iv.var for iv in red.iter_vars if int(iv.iter_type) != 2]
    window = [iv.var for iv in red.iter_vars if int(iv.iter_type) == 2]
    if len(spatial) != 4 or len(window) != 3 or not isinstance(red.body, tirx.BufferStore):
        return None
    x_load = w_load = None
    for ld in _loads(red.body.value):
        if ld.source.same_as(acc):
            continue
        if before and ld.source.same_as(padded) or not before and any(ld.source.same_as(p) for p in params) \
                and len(ld.source.shape) == 4 and int(ld.source.shape[2]) != 1:
            x_load = ld
        else:
            w_load = ld
    if x_load is None or w_load is None:
        return None
    source = source if before else x_load.source
    rows, cols = _coefficient(x_load.indices[1], spatial[1]), _coefficient(x_load.indices[2], spatial[2])
    taps = _coefficient(x_load.indices[1], window[0]), _coefficient(x_load.indices[2], window[1])
    if rows is None or cols is None or any(t is None or t[0] != 1 for t in taps):
        return None  # dilated, or not a window of the input
    wshape = [int(d) for d in w_load.source.shape]
    xshape, oshape = [int(d) for d in source.shape], [int(d) for d in acc.shape]
    if len(wshape) != 4 or wshape[2] != 1 or xshape[0] != 1 or xshape[3] != oshape[3] or wshape[3] != oshape[3]:
        return None
    found = operands_and_epilogue(sch, after, acc, params, source, w_load.source)
    if found is None:
        return None
    x_index, w_index, (iters, value, out_index, extras) = found
    return Depthwise(params[x_index], w_index, params[out_index], extras, acc, iters, value,
                     (wshape[0], wshape[1]), (rows[0], cols[0]), offsets)


def lanes_for(dw: Depthwise, spec: CpuSpec) -> int:
    """L output pixels a vector: the widest of the CPU's vector, 8 and 4 that the output row holds and whose input
    (L * stride pixels) the input row holds (not 7 lanes for a 7x7 map: 4, and 4 moved back)."""
    _, _, w, _ = (int(d) for d in dw.x.shape)
    ow, sw = int(dw.out.shape[2]), dw.stride[1]
    return next((v for v in (pixel_lanes(spec), 8, 4, 2) if v <= ow and v * sw <= w), 1)


def capable(dw: Depthwise, params: Sequence[tirx.Buffer], spec: CpuSpec) -> bool:
    """Whether the kernel computes `dw`: rows of two outputs at least, and every tensor the epilogue reads of the
    output's shape or a per-channel constant (the kernel reads the first channels-first and the second at its
    channel)."""
    return lanes_for(dw, spec) > 1 and layout_free_epilogue(dw.out, params, dw.extras)


def depthwise_kernel(dw: Depthwise, params: Sequence[tirx.Buffer], spec: CpuSpec, threads: int = 2) -> tirx.PrimFunc:
    """The channels-first kernel computing what `dw` computes, with the fused kernel's parameters in its order:
    the input, the output and tensors of the output's shape [1, C, H, W], the weights and constants as they were."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    if not capable(dw, params, spec):
        raise NotImplementedError("a channels-first depthwise kernel takes rows of two outputs or more, and "
                                  "per-channel constants and tensors of the output's shape in its epilogue only")
    c = int(dw.x.shape[3])
    lanes = lanes_for(dw, spec)
    shape = [int(d) for d in dw.out.shape]

    def layout(b: tirx.Buffer) -> tirx.Buffer:
        mine = b.same_as(dw.x) or [int(d) for d in b.shape] == shape
        return T.buffer(to_chw([int(d) for d in b.shape]), b.dtype) if mine else b

    with IRBuilder() as ib:
        with T.prim_func():
            bufs = [T.arg(p.name, layout(p)) for p in params]
            T.func_attr({"tirx.noalias": True})
            x, weight, out = bufs[_index(params, dw.x)], bufs[dw.weight], bufs[-1]
            flat = [(p, bufs[i]) for i, p in enumerate(params) if i == len(params) - 1 or i in dw.extras
                    and [int(d) for d in p.shape] == shape]
            dw = replace(dw, flat=flat)
            flat_l = flat_lanes(dw, spec) if per_channel(dw, params) else 0
            with T.sblock("root"), T.sblock("depthwise_chw"):
                if flat_l:  # whole maps as [C, H * W]
                    _, h, w, _ = (int(d) for d in dw.x.shape)
                    xf = T.decl_buffer((c, h * w), "float32", data=x.data)
                    of = T.decl_buffer((c, h * w), "float32", data=out.data)
                with T.parallel(0, c) as ch:
                    if flat_l:
                        flat_rows(T, dw, xf, broadcast_weights(weight, ch, dw.kernel, flat_l), ch, 0, h, flat_l,
                                  lambda value, at: store_per_channel(T, dw, of, value, ch, at, flat_l))
                    else:
                        _rows(T, dw, x, weight, out, ch, lanes)
    return ib.get()


def _index(params: Sequence[tirx.Buffer], buf: tirx.Buffer) -> int:
    return next(i for i, p in enumerate(params) if p.same_as(buf))


def _rows(T, dw: Depthwise, x, weight, out, ch, lanes: int) -> None:
    """Every output vector of one channel. The rows whose window lies inside the map run in a loop, a group of
    rows at a time with each row's vectors unrolled: the vectors' places are constants (the last one moved back to
    end at the row's last pixel), and a group holds at least UNITS vectors, so a 7x7 map (one vector a row) still
    gives independent accumulations; a group past the last such row repeats it (the same values, stored again).
    The rows whose window reaches into the padding are their own code, without the kernel rows outside the map."""
    _, oh, ow, _ = (int(d) for d in dw.out.shape)
    kh, kw = dw.kernel
    bases = row_vectors(ow, lanes)
    first, last = inner_rows(dw)
    weights = broadcast_weights(weight, ch, dw.kernel, lanes)
    inner = last - first
    if inner:
        group = min(inner, -(-UNITS // len(bases)))
        with T.serial(0, -(-inner // group)) as step:
            for g in range(group):
                row = first + (tirx.Min(step * group + g, inner - 1) if inner % group else step * group + g)
                _row(T, dw, x, weights, out, ch, row, range(kh), bases, lanes)
    for row in [*range(first), *range(last, oh)]:
        _row(T, dw, x, weights, out, ch, row, kernel_rows_at(dw, row), bases, lanes)


def broadcast_weights(weight, ch, kernel: tuple[int, int], lanes: int) -> list[list]:
    """Channel ch's kh x kw weights (HWIO), each broadcast to L lanes."""
    return [[tirx.Broadcast(weight[i, j, 0, ch], lanes) for j in range(kernel[1])] for i in range(kernel[0])]


def row_vectors(width: int, lanes: int) -> list[int]:
    """Where each vector of a row of `width` pixels starts, the last moved back to end at the row's end."""
    return sorted({min(v * lanes, width - lanes) for v in range(-(-width // lanes))})


def inner_rows(dw: Depthwise) -> tuple[int, int]:
    """[first, last): the output rows whose whole kernel window lies inside the map."""
    h, oh = int(dw.x.shape[1]), int(dw.out.shape[1])
    kh, sh, top = dw.kernel[0], dw.stride[0], dw.pad[0]
    first = min(oh, -(-top // sh))
    return first, max(first, min(oh, (h - kh + top) // sh + 1))


def kernel_rows_at(dw: Depthwise, row: int) -> list[int]:
    """The kernel rows of output row `row` that read inside the map."""
    h, kh, sh, top = int(dw.x.shape[1]), dw.kernel[0], dw.stride[0], dw.pad[0]
    return [i for i in range(kh) if 0 <= row * sh + i - top < h]


def _row(T, dw: Depthwise, x, weights, out, ch, row, kernel_rows, bases: list[int], lanes: int,
         store=None) -> None:
    """One output row: each vector the sum over `kernel_rows` (those inside the map) of its taps times weights,
    one accumulation per kernel row (independent chains), then the epilogue; `store(value, base)` in place of
    storing it to out (a merged kernel keeps the row to itself)."""
    _, _, w, _ = (int(d) for d in dw.x.shape)
    (_, kw), (sh, sw), (top, left) = dw.kernel, dw.stride, dw.pad
    for base in bases:
        value = None
        for i in kernel_rows:
            taps = _taps(x, ch, row * sh + (i - top), base * sw - left, kw, sw, w, lanes)
            total = taps[0] * weights[i][0]
            for j in range(1, kw):
                total = total + taps[j] * weights[i][j]
            value = total if value is None else value + total
        if value is None:  # a row whose window misses the map entirely (padding wider than the kernel)
            value = tirx.Broadcast(tirx.FloatImm("float32", 0.0), lanes)
        if store is None:
            _store(T, dw, out, value, ch, row, base, lanes)
        else:
            store(value, base)


def _taps(x, ch, row, start: int, kw: int, stride: int, w: int, lanes: int) -> list:
    """The kw taps of a kernel row for L outputs whose first input column is `start` (negative in the left
    padding): tap j lane q reads column start + j + q * stride, 0 outside the map. Stride 1: a load per tap
    (unaligned), moved inside the row and shuffled against zeros where it would leave it. Larger strides: one load
    of the span of all taps, each tap its lanes of it."""
    if stride == 1:
        return [_from_grid(x, ch, row, start + j, w, lanes) for j in range(kw)]
    # one load of stride * L pixels serves the taps it covers (tap j lane q at j + q * stride); a tap past its
    # end takes its last lanes from the span after it, which the next output vector loads anyway
    span = lanes * stride
    spans = {at: x[0, ch, row, tirx.Ramp(at, 1, span)]
             for at in sorted({min(max(s, 0), w - span) for s in (start, start + span)})}
    taps = []
    for j in range(kw):
        cols = [start + j + q * stride for q in range(lanes)]
        tap = _lanes_of(spans, [c if 0 <= c < w else None for c in cols], span)
        if tap is None:  # lanes from two spans and the padding: one load of its own
            loaded, moved = _load(x, ch, row, start + (j // stride) * stride, span, w)
            tap = _pick(loaded, [c - moved if 0 <= c < w else None for c in cols], span)
        taps.append(tap)
    return taps


def _from_grid(x, ch, row, start: int, w: int, lanes: int):
    """L consecutive pixels of a row from `start`, 0 outside it, as lanes of the row's own vectors (those at
    `row_vectors`, the places the output vectors take): a tap shifted from an output vector's place is a shuffle of
    it and its neighbour, not a load of its own. Each loaded vector then serves every tap that needs it (the
    compiler merges the identical loads), where the shifted loads were mostly split across cache lines (a 56-pixel
    row is 3.5 lines): 9 loads a vector of a 3x3 window became 3. 56x56, 144 channels, one thread, Zen 5: 1.25x;
    the 56x56 merged layer of MobileNetV2 at 75% 1.2x. Rows of fewer than three vectors load each tap."""
    if w < 3 * lanes:  # rows of two vectors overlap by most of one: the shuffles cost more than the loads
        return _window(x, ch, row, start, w, lanes)
    grid = row_vectors(w, lanes)
    order = ([start] if start in grid else []) + [g for g in grid if g != start]  # its own vector first
    vectors = {g: x[0, ch, row, tirx.Ramp(g, 1, lanes)] for g in order}
    tap = _lanes_of(vectors, [p if 0 <= p < w else None for p in range(start, start + lanes)], lanes)
    return tap if tap is not None else _window(x, ch, row, start, w, lanes)  # three sources: one load is cheaper


def _lanes_of(vectors: dict, pixels: list, span: int):
    """A vector whose lane q is pixel pixels[q] (0 where None), each from the first of `vectors` ({first pixel:
    its loaded vector of `span` pixels}) holding it: one vector's lanes (zeros allowed), or a shuffle of two;
    None where that takes more, or two and zeros, or a pixel no vector holds."""
    used: list[int] = []
    picks = []
    for p in pixels:
        at = None if p is None else next((a for a in vectors if a <= p < a + span), None)
        if p is not None and at is None:
            return None
        if at is not None and at not in used:
            used.append(at)
        picks.append(None if at is None else (used.index(at), p - at))
    if len(used) == 1:
        return _pick(vectors[used[0]], [None if pk is None else pk[1] for pk in picks], span)
    if len(used) == 2 and None not in picks:
        return tirx.Shuffle([vectors[a] for a in used], [tirx.IntImm("int32", pk[0] * span + pk[1]) for pk in picks])
    return None


def _window(x, ch, row, start: int, w: int, lanes: int):
    """L consecutive pixels of a row from `start`, 0 outside it."""
    loaded, at = _load(x, ch, row, start, lanes, w)
    return _pick(loaded, [start + q - at if 0 <= start + q < w else None for q in range(lanes)], lanes)


def _load(x, ch, row, start: int, span: int, w: int):
    """`span` pixels of a row from `start`, moved to lie inside it: (the vector, the column it starts at)."""
    at = min(max(start, 0), w - span)
    return x[0, ch, row, tirx.Ramp(at, 1, span)], at


def _pick(loaded, lanes_at: list, span: int):
    """Lanes of `loaded` by index, None for a zero; the vector itself where that is all of it in order."""
    if lanes_at == list(range(span)):
        return loaded
    zero = tirx.Broadcast(tirx.FloatImm("float32", 0.0), span)
    return tirx.Shuffle([loaded, zero], [tirx.IntImm("int32", span if k is None else k) for k in lanes_at])


def flat_lanes(dw: Depthwise, spec: CpuSpec) -> int:
    """L where a map's rows are too short for the CPU's vector (7x7 and 14x14 at 16 lanes) and the convolution
    keeps the map's shape (stride 1, the padding on both sides): the kernel then runs vectors over the map's
    pixels in row-major order, each tap a shift of the flat index, rather than row by row at 4 or 8 lanes; 0 where
    the rows are used."""
    _, h, w, _ = (int(d) for d in dw.x.shape)
    _, oh, ow, _ = (int(d) for d in dw.out.shape)
    lanes = pixel_lanes(spec)
    same = dw.stride == (1, 1) and (h, w) == (oh, ow)
    return lanes if same and lanes_for(dw, spec) < lanes <= oh * ow else 0


def flat_rows(T, dw: Depthwise, xf, weights, ch, first: int, count: int, lanes: int, store) -> None:
    """Output rows [first, first + count) of one channel, as vectors over their pixels in row-major order (the last
    moved back to end at the last pixel): tap (i, j) of output pixel o reads input pixel o + (i - top) * W +
    (j - left), its lanes outside the map, or wrapped into the row before or after, zero. `xf` is the input as
    [C, H * W]; store(value, o) takes each vector, o its first pixel counted from the first row's."""
    _, h, w, _ = (int(d) for d in dw.x.shape)
    (kh, kw), (top, left) = dw.kernel, dw.pad
    pixels = count * w
    for start in row_vectors(pixels, lanes):
        value = None
        at = [first * w + start + q for q in range(lanes)]  # each lane's output pixel
        for i in range(kh):
            row_sum = None
            for j in range(kw):
                src = [o + (i - top) * w + (j - left) for o in at]
                ok = [0 <= o // w + i - top < h and 0 <= o % w + j - left < w for o in at]
                if not any(ok):
                    continue
                lo = min(max(src[0], 0), h * w - lanes)  # the load moved inside the map
                loaded = xf[ch, tirx.Ramp(lo, 1, lanes)]
                tap = _pick(loaded, [s - lo if good else None for s, good in zip(src, ok)], lanes)
                term = tap * weights[i][j]
                row_sum = term if row_sum is None else row_sum + term
            if row_sum is not None:
                value = row_sum if value is None else value + row_sum
        store(value if value is not None else tirx.Broadcast(tirx.FloatImm("float32", 0.0), lanes), start)


def store_per_channel(T, dw: Depthwise, buf, value, ch, at, lanes: int) -> None:
    """buf[ch, at:at+L] = the depthwise epilogue of `value`, its constants read at their channel (an epilogue reading
    per-channel constants only: `per_channel`)."""
    i64 = "int64"
    zero = tirx.IntImm(i64, 0)
    env = dict(zip(dw.iters, [zero, zero, zero, tirx.Cast(i64, ch)]))
    T.buffer_store(buf, rebuild(dw.value, dw.acc, value, env), [ch, tirx.Ramp(at, 1, lanes)])


def per_channel(dw: Depthwise, params: Sequence[tirx.Buffer]) -> bool:
    """Whether the epilogue reads per-channel constants only (no tensor of the output's shape)."""
    return all(all(int(d) == 1 for d in params[i].shape[:-1]) for i in dw.extras)


def _store(T, dw: Depthwise, out, value, ch, row, base, lanes: int) -> None:
    """out[0, ch, row, base:base+L] = the epilogue of `value`: constants read at their channel, tensors of the
    output's shape channels-first at the same place."""
    i64 = "int64"
    zero = tirx.IntImm(i64, 0)
    where = [zero, tirx.Cast(i64, row), zero, tirx.Cast(i64, ch)]
    index = [0, ch, row, tirx.Ramp(base, 1, lanes)]
    value = rebuild(dw.value, dw.acc, value, dict(zip(dw.iters, where)), dw.flat, dw.iters, index)
    T.buffer_store(out, value, index)



# ---------------------------------------------------------------- the pass: channels-first runs


def segments(builder: relax.BlockBuilder, main: relax.Function, replace: list, chosen: list, spec: CpuSpec,
             threads: int, merge: bool = True) -> tvm.IRModule:
    """bsr.sparsify's last step with channels-first runs. `replace` are its (call, BSR kernel, arguments) swaps and
    `chosen` what made each. A sparse pointwise layer whose kernel transposes its tiles ("pixels") runs its "chw"
    kernel instead where it joins a run: a depthwise layer between two such layers (its input from one, its output
    read by them alone) joins too, as may one read by them alone that keeps its map's size at the start of a run,
    and a pointwise one stays in a run only with a neighbour in it (alone it would pay two whole transposes for the
    two in-cache ones it saves). Tensors entering a run are transposed to
    [1, C, H, W] once, tensors leaving it back once; everything else is as `replace` has it."""
    mod = builder.get()
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    blocks = main.body.blocks
    plan: dict = {}
    if len(blocks) == 1 and isinstance(blocks[0], relax.DataflowBlock):
        plan = _plan(list(blocks[0].bindings), replace, chosen, funcs, spec)
    kernels: dict[str, tvm.ir.GlobalVar] = {}
    calls = []
    merged = _merges(plan, list(blocks[0].bindings), funcs, spec) if plan and merge else {}
    expands = _expands(plan, merged, list(blocks[0].bindings), spec, threads)
    gone = [*merged.values(), *expands.values()]
    for var, (kind, info, call) in plan.items():
        if any(var.same_as(g) for g in gone):
            continue  # merged into the pointwise layer that reads it
        dw_var = next((d for p, d in merged.items() if p.same_as(var)), None)
        if dw_var is not None:
            ex_var = next((e for d, e in expands.items() if d.same_as(dw_var)), None)
            calls.append(_merged_call(builder, kernels, var, info, call, plan[dw_var], funcs, replace, spec,
                                      threads, None if ex_var is None else plan[ex_var]))
            continue
        if kind == "pointwise":
            made = info.name + "_chw"
            if made not in kernels:
                func = bsr_kernel(info.fused, info.params, info.bsr, "chw", spec, threads)
                kernels[made] = builder.add_func(func.with_attrs({**info.attrs, VARIANT: "chw"}), made)
            args = [call.args[1][0], *_bsr_constants(replace, call), *[call.args[1][i] for i in info.fused.extras]]
            out = to_chw([int(d) for d in info.fused.out.shape])
        else:
            name = call.args[0].name_hint
            made = name + "_chw"
            if made not in kernels:
                func = depthwise_kernel(info, list(funcs[name].params), spec, threads)
                attrs = {**dict(funcs[name].attrs), VARIANT: "chw", "tirx.is_scheduled": True, "tirx.noalias": True}
                kernels[made] = builder.add_func(func.with_attrs(attrs), made)
            args = list(call.args[1])
            out = to_chw([int(d) for d in info.out.shape])
        calls.append((var, kernels[made], args, out))
    mod = builder.get()
    if not calls:
        from .bsr import _Rewriter

        mod["main"] = _Rewriter(replace).visit_expr(main)
        return relax.transform.DeadCodeElimination()(mod)
    rewriter = _Segments(mod, calls, replace, pixel_lanes(spec), gone)
    new_main = rewriter.visit_expr(main)
    mod = rewriter.builder_.get()
    mod["main"] = new_main
    return relax.transform.DeadCodeElimination()(mod)


def _merges(plan: dict, bindings: list, funcs: dict, spec: CpuSpec) -> dict:
    """{pointwise var: depthwise var} for the run's pairs that run as one kernel (kernels/chw_merged.py): the
    pointwise layer is the depthwise layer's only reader."""
    from ..dwpw import MIN_PIXELS
    from . import chw_merged

    readers = _readers(bindings)
    pairs = {}
    for var, (kind, info, call) in plan.items():
        source = call.args[1][0]
        if kind != "pointwise" or source not in plan or plan[source][0] != "depthwise" or len(readers[source]) != 1:
            continue
        _, dw, dw_call = plan[source]
        if chw_merged.capable(dw, list(funcs[dw_call.args[0].name_hint].params), info.fused, spec, MIN_PIXELS):
            pairs[var] = source
    return pairs


def _merged_call(builder: relax.BlockBuilder, kernels: dict, var, info, call, dw_entry, funcs: dict, replace: list,
                 spec: CpuSpec, threads: int, ex_entry=None) -> tuple:
    """(var, kernel, arguments, output shape) of a depthwise + sparse pointwise pair's merged kernel, with the
    sparse expanding layer before them where `ex_entry` (its plan entry) is given."""
    from ..dwpw import OP_NAME, PART_ARGS, PART_BLOCKS, PART_OPS, PART_REDUCTIONS
    from . import chw_merged

    _, dw, dw_call = dw_entry
    dw_func = funcs[dw_call.args[0].name_hint]
    made = info.name + ("_expand_dwpw_chw" if ex_entry else "_dwpw_chw")
    dw_args = list(dw_call.args[1])
    extras = [call.args[1][i] for i in info.fused.extras]
    ex_args: list = []
    if ex_entry is not None:
        _, ex, ex_call = ex_entry
        ex_args = [ex_call.args[1][0], *_bsr_constants(replace, ex_call),
                   *[ex_call.args[1][i] for i in ex.fused.extras]]
        dw_args = [a for i, a in enumerate(dw_args) if not dw_func.params[i].same_as(dw.x)]
    if made not in kernels:
        expand = None if ex_entry is None else (ex.fused, ex.params, ex.bsr)
        func = chw_merged.kernel(dw, list(dw_func.params), info.fused, info.params, info.bsr, spec, threads, expand)
        kh, kw = dw.kernel
        flops = int(tag_of(dw_func, FLOPS, 0)) + int(info.attrs[FLOPS])
        ops, parts = ["depthwise", "pointwise"], [len(dw_args), 3 + len(extras)]
        reductions = [kh * kw, int(info.fused.k)]
        if ex_entry is not None:
            flops += int(ex.attrs[FLOPS])
            ops, parts, reductions = ["pointwise", *ops], [len(ex_args), *parts], [int(ex.fused.k), *reductions]
        attrs = {**info.attrs, OP: OP_NAME, VARIANT: "chw", FLOPS: flops, PART_OPS: ops, PART_ARGS: parts,
                 PART_REDUCTIONS: reductions}
        if ex_entry is not None:  # two sparse parts: each its own N and density
            attrs[PART_BLOCKS] = [[ex.bsr.n, round(ex.bsr.density, 6)], [1, 1.0],
                                  [info.bsr.n, round(info.bsr.density, 6)]]
        kernels[made] = builder.add_func(func.with_attrs(attrs), made)
    args = [*ex_args, *dw_args, *_bsr_constants(replace, call), *extras]
    return var, kernels[made], args, to_chw([int(d) for d in info.fused.out.shape])


def _expands(plan: dict, merged: dict, bindings: list, spec: CpuSpec, threads: int) -> dict:
    """{depthwise var: pointwise var} for the merged pairs whose depthwise layer reads a sparse pointwise layer
    of the run that nothing else reads, and which take it in (chw_merged.expand_capable): the expanded tensor, the
    largest of an inverted-residual block, is then never written."""
    from . import chw_merged

    readers = _readers(bindings)
    found = {}
    for dw_var in merged.values():
        _, dw, dw_call = plan[dw_var]
        source = dw_call.args[1][0]
        if source not in plan or plan[source][0] != "pointwise" or len(readers[source]) != 1:
            continue
        ex = plan[source][1]
        if chw_merged.expand_capable(ex.fused, ex.params, dw, spec, threads):
            found[dw_var] = source
    return found


def _bsr_constants(replace: list, call: relax.Call) -> list:
    """The BSR constants (data, indices, indptr) `replace` gives this call."""
    return next(list(args[1:4]) for site, _, args in replace if site.same_as(call))


def _plan(bindings: list, replace: list, chosen: list, funcs: dict, spec: CpuSpec) -> dict:
    """{binding var: (kind, what makes its kernel, its original call)} for the layers that run channels-first."""
    from .bsr import chw_capable

    candidates: dict = {}
    for b in bindings:
        call = b.value
        if not (isinstance(b.var, relax.DataflowVar) and isinstance(call, relax.Call)
                and getattr(call.op, "name", "") == "relax.call_tir"):
            continue
        sparse = next((c for c in chosen if c.site.same_as(call)), None)
        if sparse is not None:
            if sparse.attrs.get(VARIANT) == "pixels" and chw_capable(sparse.fused, sparse.params):
                candidates[b.var] = ("pointwise", sparse, call)
            continue
        func = funcs.get(call.args[0].name_hint)
        if func is not None and tag_of(func, OP) == "depthwise" and tag_of(func, FAMILY) == "dense":
            dw = read_depthwise(func)
            if dw is not None and capable(dw, list(func.params), spec):
                candidates[b.var] = ("depthwise", dw, call)
    if not candidates:
        return {}
    producer = {b.var: b for b in bindings}
    readers = _readers(bindings)
    chosen_set = dict(candidates)
    changed = True
    while changed:
        changed = False
        for var, (kind, _, call) in list(chosen_set.items()):
            source = call.args[1][0]
            fed = isinstance(source, relax.Var) and source in producer and source in chosen_set
            read_by = readers.get(var, [])
            if kind == "depthwise":
                # a depthwise layer may also start a run where it keeps the map's size: the transpose into the
                # run moves from its output to its input, no larger, and it merges with the sparse layer it feeds
                dw = chosen_set[var][1]
                keeps_size = [int(d) for d in dw.x.shape[1:3]] == [int(d) for d in dw.out.shape[1:3]]
                keep = (fed or keeps_size) and bool(read_by) and all(
                    r in chosen_set and chosen_set[r][0] == "pointwise" for r in read_by)
            else:
                keep = fed or any(r in chosen_set for r in read_by)
            if not keep:
                del chosen_set[var]
                changed = True
    return chosen_set


def _readers(bindings: list) -> dict:
    """{var: the binding vars whose values read it}."""
    readers: dict = {}
    for b in bindings:
        for v in _vars(b.value):
            readers.setdefault(v, []).append(b.var)
    return readers


def _vars(expr) -> list:
    found: list = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _activation(arg: relax.Expr, shapes: tuple) -> bool:
    """Whether a run layer's argument is a tensor of its input's or output's shape (channels-first in the run)."""
    return isinstance(arg, relax.Var) and [int(d) for d in arg.ty.shape] in shapes


def transpose_kernel(shape: Sequence[int], to_first: bool, lanes: int) -> tirx.PrimFunc:
    """[1, H, W, C] -> [1, C, H, W] (to_first) or back, as the [R, C] -> [C, R] transpose of its flat view: L x L
    tiles, each L vector loads, the shuffle network of kernels/bsr.py and L vector stores; the last tile of a side
    that L does not divide moved back (its overlap stored twice, the same values). Sides shorter than L: scalar."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    from .bsr import _transpose

    n, a, b, c = (int(d) for d in shape)  # [1, H, W, C] to_first, [1, C, H, W] otherwise
    rows, cols = (a * b, c) if to_first else (a, b * c)
    out_shape = (n, c, a, b) if to_first else (n, b, c, a)
    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer(tuple(shape), "float32"))
            out = T.arg("out", T.buffer(out_shape, "float32"))
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"), T.sblock("transpose"):
                xf = T.decl_buffer((rows, cols), "float32", data=x.data)
                of = T.decl_buffer((cols, rows), "float32", data=out.data)
                if rows < lanes or cols < lanes:
                    with T.parallel(0, rows) as r, T.serial(0, cols) as q:
                        T.buffer_store(of, xf[r, q], [q, r])
                else:
                    with T.parallel(0, -(-rows // lanes)) as rb, T.serial(0, -(-cols // lanes)) as cb:
                        r0, c0 = tirx.Min(rb * lanes, rows - lanes), tirx.Min(cb * lanes, cols - lanes)
                        tile = [xf[r0 + q, tirx.Ramp(c0, 1, lanes)] for q in range(lanes)]
                        for col, vec in _transpose(tile, lanes):
                            T.buffer_store(of, vec, [c0 + col, tirx.Ramp(r0, 1, lanes)])
    return ib.get()


@relax.expr_functor.mutator
class _Segments(relax.PyExprMutator):
    """Main with the runs channels-first: each run layer's binding becomes a call of its channels-first kernel on
    channels-first inputs, tensors crossing into a run are transposed once, out of it once."""

    def __init__(self, mod: tvm.IRModule, calls: list, replace: list, lanes: int, gone: list) -> None:
        super().__init__(mod)
        self.calls, self.replace, self.lanes, self.gone = calls, replace, lanes, gone
        self.chw: dict = {}  # a run layer's original output var -> its channels-first var
        self.into: dict = {}  # an outside var -> its channels-first copy
        self.back: dict = {}  # a run layer's original output var -> its channels-last copy
        self.kernels: dict = {}

    def _kernel(self, shape, to_first: bool) -> tvm.ir.GlobalVar:
        key = (tuple(shape), to_first)
        if key not in self.kernels:
            func = transpose_kernel(shape, to_first, self.lanes).with_attrs(
                {OP: "data", FAMILY: "dense", FLOPS: 0, REDUCTION: 0, "tirx.is_scheduled": True})
            name = "to_channels_first" if to_first else "to_channels_last"
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _as_chw(self, arg: relax.Expr) -> relax.Expr:
        if not isinstance(arg, relax.Var):
            return arg
        for var, new in self.chw.items():
            if var.same_as(arg):
                return new
        shape = [int(d) for d in arg.ty.shape]
        if len(shape) != 4:
            return self.visit_expr(arg)  # a constant-like input of another shape (per-channel): as it is
        for var, new in self.into.items():
            if var.same_as(arg):
                return new
        gv = self._kernel(shape, True)
        new = self.builder_.emit(relax.call_tir(gv, [self.visit_expr(arg)], relax.TensorType(to_chw(shape), "float32")))
        self.into[arg] = new
        return new

    def _as_hwc(self, var: relax.Var) -> relax.Var:
        for old, new in self.back.items():
            if old.same_as(var):
                return new
        chw_var = next(new for old, new in self.chw.items() if old.same_as(var))
        n, c, h, w = (int(d) for d in chw_var.ty.shape)
        gv = self._kernel((n, c, h, w), False)
        new = self.builder_.emit(relax.call_tir(gv, [chw_var], relax.TensorType((n, h, w, c), "float32")))
        self.back[var] = new
        return new

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if any(binding.var.same_as(v) for v in self.gone):
            return  # a depthwise layer merged into its reader
        for var, gv, args, out in self.calls:
            if binding.var.same_as(var):
                x_shape = [int(d) for d in args[0].ty.shape]
                out_hwc = [int(d) for d in var.ty.shape]
                ins = [self._as_chw(a) if _activation(a, (x_shape, out_hwc)) else self.visit_expr(a) for a in args]
                self.chw[var] = self.builder_.emit(relax.call_tir(gv, ins, relax.TensorType(out, "float32")))
                return
        for v in _vars(binding.value):
            if any(old.same_as(v) for old in self.chw):
                self.set_var_remap(v, self._as_hwc(v))
        for site, gv, args in self.replace:
            if binding.value.same_as(site):
                call = relax.call_tir(gv, [self.visit_expr(a) for a in args],
                                      site.ty_args[0] if site.ty_args else site.ty)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))
                return
        super().visit_var_binding_(binding)
