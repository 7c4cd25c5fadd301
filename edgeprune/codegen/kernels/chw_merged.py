"""A channels-first run's depthwise layer and the sparse pointwise layer that alone reads it, as one kernel.

The dense build merges such pairs (codegen/dwpw.py): the expanded tensor between them, the largest of an
inverted-residual block, is never written. A sparse pointwise layer is its own kernel, so without this the sparse
build writes and reads back that tensor where the dense one does not. Here, in a run (kernels/chw.py), the pair
runs by tiles of R output rows, the parallel jobs:
  1. the depthwise outputs of the tile's rows, every channel, into a buffer of C x (R * OW) floats (kernels/chw.py's
     row code, its epilogue applied as the rows are stored), which is the channels-first input the sparse kernel
     wants: each channel's pixels contiguous;
  2. the sparse pointwise layer over those pixels (kernels/bsr.py's channels-first tile: per kept block, G vector
     loads, N broadcast weights, G*N FMAs), its epilogue (bias, residual) applied as the outputs are stored.
R is chosen for the threads (`tile_rows`); a last tile that R does not divide is moved back to end at the map's
last row (it recomputes a few rows rather than masking). Maps under dwpw.MIN_PIXELS stay two kernels, as in the
dense build.

Before a stride-2 depthwise layer, the sparse expanding layer that alone feeds it joins too (`expand_capable`):
  0. the tile's window of the expanded map (its rows the tile's depthwise rows read, 2R + 1 of them) is computed
     first, every channel, into a buffer kept in L2 (EXPAND_BYTES), and step 1 reads it in place of its input.
The rows two tiles share are computed twice (5 for 4 at R = 2), but the expanded tensor, the largest of the network
(MobileNetV2's 96 x 112 x 112, 4.8 MB), is neither written nor read back: at 75% 1x4 its sparse expanding layer was
bound by writing it. MobileNetV2 at 75%, 2 threads, Zen 5: that block 0.107-0.120 ms as two kernels, 0.093-0.099
as one; the network 2.01x its dense build before, 2.07x after (one process, builds interleaved).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tvm import tirx

from .bsr import Bsr, Fused, _accumulate, _shape, _store_chw, pixel_accumulators, pixel_lanes, register_room, to_chw
from .chw import (
    Depthwise,
    _row,
    broadcast_weights,
    flat_lanes,
    flat_rows,
    inner_rows,
    kernel_rows_at,
    lanes_for,
    per_channel,
    row_vectors,
    store_per_channel,
)
from .common import CpuSpec

TILE_VECTORS = 4  # a tile's pixels fill at least this many vectors of the pointwise layer
BUFFER_BYTES = 256 * 1024  # a tile's depthwise outputs stay in L2
MAX_FLAT_TILES = 4  # tiles given code of their own for the depthwise part over their pixels
MAX_RECOMPUTE = 1.5  # the expanding layer's work in a tile against its share of the map, at most
EXPAND_PIXELS = 56 * 56  # maps under this keep the expanded tensor in cache anyway
EXPAND_BYTES = 256 * 1024  # a tile's rows of the expanded map


def capable(dw: Depthwise, dw_params: Sequence[tirx.Buffer], pw: Fused, spec: CpuSpec, min_pixels: int) -> bool:
    """Whether the pair merges here: a map of min_pixels or more, the depthwise epilogue reading per-channel
    constants only (its output is never a tensor, so nothing of its shape can be read), the pointwise layer
    reading the depthwise output as it is."""
    oshape = _shape(dw.out)
    shape_ok = list(_shape(pw.x)) == list(oshape) and oshape[1] * oshape[2] >= min_pixels
    return shape_ok and per_channel(dw, dw_params) and lanes_for(dw, spec) > 1


def tile_rows(oh: int, ow: int, lanes: int, threads: int, channels: int) -> int:
    """R, the rows of a tile: the R whose busiest thread computes the fewest pixel vectors (a tile's pixels
    rounded up to whole vectors, tiles shared out evenly), among those whose tile fills TILE_VECTORS vectors and
    whose buffer stays within BUFFER_BYTES; the fewest rows among equals. MobileNetV2 at 8 lanes and 2 threads:
    56 x 56 maps 1 row, 28 x 28 2, 14 x 14 7 (two tiles, one a thread, where 3 rows made 5 tiles: 3 and 2)."""
    def busiest(r: int) -> int:
        tiles = -(-oh // r)
        return -(-tiles // max(1, threads)) * -(-r * ow // lanes)

    fits = [r for r in range(1, oh + 1) if r * ow >= min(oh * ow, TILE_VECTORS * lanes)
            and (r == 1 or channels * r * ow * 4 <= BUFFER_BYTES)]
    return min(fits or [1], key=lambda r: (busiest(r), r))  # none: a row a tile, the smallest buffer


def vector_groups(p: int, lanes: int, n: int, budget: int, room: int) -> tuple[list[list[int]], int]:
    """The vectors over a tile's p pixels, in as few groups as `budget` accumulators allow, of even sizes (7
    vectors at 6 a group ran as 6 and 1, the 1 waiting on its FMAs' latency): (the groups' vector starts, spare).
    Spare pixels, fewer than N past the last whole vector, join the last group as N-lane accumulators (one FMA a
    block each, where a vector moved back to end at the last pixel takes N), if `room` has registers for them."""
    full, rest = divmod(p, lanes)
    spare = rest if full and rest < n else 0
    starts = [v * lanes for v in range(full)] if spare or not rest else row_vectors(p, lanes)
    count = -(-len(starts) // max(1, budget // n))
    if spare and -(-len(starts) // count) * n + spare > room:
        count += 1
    sizes = [len(starts) // count + (i < len(starts) % count) for i in range(count)]
    bounds = [sum(sizes[:i]) for i in range(count + 1)]
    return [starts[a:b] for a, b in zip(bounds, bounds[1:])], spare


def expand_rows(dw: Depthwise, r: int) -> int:
    """The input rows a tile of r depthwise output rows reads (its window's rows, all inside the map)."""
    return min(_shape(dw.x)[1], (r - 1) * dw.stride[0] + dw.kernel[0])


def expand_capable(ex: Fused, ex_params: Sequence[tirx.Buffer], dw: Depthwise, spec: CpuSpec, threads: int) -> bool:
    """Whether the merged kernel takes in `ex`, the sparse pointwise layer its depthwise layer reads: a 1x1
    convolution with per-channel constants in its epilogue, computed again for the rows two tiles share, at most
    MAX_RECOMPUTE times its own work (a stride-2 depthwise layer at a row a tile: 3 rows for 2; stride 1 there
    would be 3 for 1)."""
    r = expand_tile_rows(dw, spec, threads)
    per_tile = expand_rows(dw, r) / (r * dw.stride[0])
    constants = all(all(d == 1 for d in _shape(ex_params[i])[:-1]) for i in ex.extras)
    return (len(_shape(ex.out)) == 4 and constants and per_tile <= MAX_RECOMPUTE and not flat_lanes(dw, spec)
            and _shape(ex.out)[1] * _shape(ex.out)[2] >= EXPAND_PIXELS)


def expand_tile_rows(dw: Depthwise, spec: CpuSpec, threads: int) -> int:
    """R with the expanding layer taken in: tile_rows' R, fewer where the tile's rows of the expanded map would
    not stay in L2 (EXPAND_BYTES; MobileNetV2's 28x28 stride-2 layer: 14 rows, 29 rows of 56 x 144 expanded)."""
    c, w = _shape(dw.x)[3], _shape(dw.x)[2]
    _, oh, ow, _ = _shape(dw.out)
    lanes = pixel_lanes(spec)
    r = tile_rows(oh, ow, lanes, threads, c)
    least = -(-min(oh * ow, TILE_VECTORS * lanes) // ow)  # the pointwise part's vectors, as tile_rows keeps them
    while r > least and c * expand_rows(dw, r) * w * 4 > EXPAND_BYTES:
        r -= 1
    return r


class _Window:
    """The rows [first, first + count) of a channels-first map, kept as [C, count * W], indexed as the whole map
    [1, C, H, W] is (the depthwise row code reads it by the map's own rows)."""

    def __init__(self, buf, first, width: int) -> None:
        self.buf, self.first, self.width = buf, first, width

    def __getitem__(self, index):
        _, ch, row, cols = index
        at = (row - self.first) * self.width
        if isinstance(cols, tirx.Ramp):  # stays a Ramp (a vector load), not a sum of a scalar and a Ramp
            return self.buf[ch, tirx.Ramp(at + cols.base, cols.stride, cols.lanes)]
        return self.buf[ch, at + cols]


def kernel(dw: Depthwise, dw_params: Sequence[tirx.Buffer], pw: Fused, pw_params: Sequence[tirx.Buffer], bsr: Bsr,
           spec: CpuSpec, threads: int = 2, expand: tuple | None = None) -> tirx.PrimFunc:
    """The merged kernel, with parameters (the depthwise kernel's inputs in its order, data, indices, indptr, the
    pointwise epilogue's inputs, out): the activations channels-first, the constants as they were.

    expand: (Fused, its parameters, Bsr) of the sparse pointwise layer the depthwise one reads (expand_capable).
    Each tile then first computes the rows of it that its depthwise rows read, into a buffer the depthwise part
    reads in place of its input, and the parameters begin with that layer's (its input, data, indices, indptr,
    its epilogue's constants), the depthwise kernel's input left out of its own."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    c = _shape(dw.x)[3]
    h, w = _shape(dw.x)[1:3]
    _, oh, ow, _ = _shape(dw.out)
    kh, kw = dw.kernel
    out_shape = _shape(pw.out)
    rows, nnz = pw.m // bsr.n, max(1, len(bsr.indices))
    dlanes = lanes_for(dw, spec)
    dbases = row_vectors(ow, dlanes)  # where a depthwise row's vectors start
    lanes = pixel_lanes(spec)
    r = expand_tile_rows(dw, spec, threads) if expand else tile_rows(oh, ow, lanes, threads, c)
    rows_in = expand_rows(dw, r)
    p_tile = r * ow
    first, last = inner_rows(dw)
    # rows too short for a vector (14x14 at 16 lanes): the depthwise part over each tile's pixels (chw.flat_rows),
    # its code specialized to each tile's first row, while there are few tiles
    flat_l = flat_lanes(dw, spec)
    flat_starts = sorted({min(t * r, oh - r) for t in range(-(-oh // r))}) if flat_l else []
    flat_starts = flat_starts if len(flat_starts) <= MAX_FLAT_TILES else []
    edges = [*range(first), *range(last, oh)]

    def chw(b: tirx.Buffer) -> tirx.Buffer:
        return T.buffer(to_chw(_shape(b)), b.dtype)

    with IRBuilder() as ib:
        with T.prim_func():
            if expand is not None:
                ex, ex_params, ex_bsr = expand
                ex_x = T.arg("ex_x", chw(ex.x))
                ex_nnz = max(1, len(ex_bsr.indices))
                ex_data = T.arg("ex_data", T.buffer((ex_nnz, ex_bsr.n), "float32"))
                ex_indices = T.arg("ex_indices", T.buffer((ex_nnz,), "int32"))
                ex_indptr = T.arg("ex_indptr", T.buffer((ex.m // ex_bsr.n + 1,), "int32"))
                for i in ex.extras:  # its epilogue's constants, read by the buffers it names
                    T.arg(ex_params[i].name, ex_params[i])
            dw_bufs = {i: T.arg(p.name, chw(p) if p.same_as(dw.x) else p) for i, p in enumerate(dw_params[:-1])
                       if expand is None or not p.same_as(dw.x)}
            data = T.arg("data", T.buffer((nnz, bsr.n), "float32"))
            indices = T.arg("indices", T.buffer((nnz,), "int32"))
            indptr = T.arg("indptr", T.buffer((rows + 1,), "int32"))
            extras = {i: T.arg(pw_params[i].name, chw(pw_params[i]) if _shape(pw_params[i]) == out_shape
                               else pw_params[i]) for i in pw.extras}
            out = T.arg("out", chw(pw.out))
            T.func_attr({"tirx.noalias": True})
            x = None if expand else next(b for i, b in dw_bufs.items() if dw_params[i].same_as(dw.x))
            weight = dw_bufs[dw.weight]
            with T.sblock("root"), T.sblock("dwpw_chw"):
                pairs = [(pw.out, out), *((pw_params[i], extras[i]) for i in pw.extras)]
                pw = replace(pw, flat=[(b, T.decl_buffer((pw.m, oh * ow), "float32", data=mine.data))
                                       for b, mine in pairs if _shape(b) == out_shape])
                if flat_starts:
                    xf = T.decl_buffer((c, _shape(dw.x)[1] * _shape(dw.x)[2]), "float32", data=x.data)
                with T.parallel(0, -(-oh // r)) as t:
                    r0 = tirx.Min(t * r, oh - r)
                    buf = T.alloc_buffer((c, p_tile), "float32", scope="global")
                    if expand is not None:  # the rows of the expanded map the tile's window reads
                        first_in = tirx.Max(tirx.Min(r0 * dw.stride[0] - dw.pad[0], h - rows_in), 0)
                        ex_buf = T.alloc_buffer((c, rows_in * w), "float32", scope="global")
                        ex_xf = T.decl_buffer((ex.k, h * w), "float32", data=ex_x.data)
                        _pointwise(T, replace(ex, flat=[(ex.out, ex_buf)]), ex_bsr.n, ex_xf, ex_data, ex_indices,
                                   ex_indptr, first_in * w, rows_in * w, 0, spec)
                        x = _Window(ex_buf, first_in, w)
                    for s0 in flat_starts:  # each tile's rows known, so is which lanes of each tap lie outside
                        with T.If(r0 == s0), T.Then(), T.serial(0, c) as ch:
                            weights = broadcast_weights(weight, ch, dw.kernel, flat_l)
                            flat_rows(T, dw, xf, weights, ch, s0, r, flat_l, lambda value, at, ch=ch: (
                                store_per_channel(T, dw, buf, value, ch, at, flat_l)))
                    if not flat_starts:
                        with T.serial(0, c) as ch:
                            weights = broadcast_weights(weight, ch, dw.kernel, dlanes)
                            for i in range(r):
                                def store(value, base, i=i, ch=ch):
                                    store_per_channel(T, dw, buf, value, ch, i * ow + base, dlanes)

                                def one_row(row, taps, ch=ch, weights=weights, store=store):
                                    _row(T, dw, x, weights, None, ch, row, taps, dbases, dlanes, store)

                                _any_row(T, one_row, r0 + i, first, last, edges, dw, kh)
                    _pointwise(T, pw, bsr.n, buf, data, indices, indptr, 0, p_tile, r0 * ow, spec)
    return ib.get()


def _pointwise(T, pw: Fused, n: int, xf, data, indices, indptr, first, p: int, out_at, spec: CpuSpec) -> None:
    """A sparse pointwise layer over p pixels, every channel, with its epilogue: inputs read at [channel, first +
    pixel] of xf, outputs stored at [channel, out_at + pixel] of its flat alias (`pw.flat`). Its vectors run in the
    groups `vector_groups` makes (a last vector moved back ends at the last pixel; spare pixels in the last group)."""
    lanes = pixel_lanes(spec)
    groups, spare = vector_groups(p, lanes, n, pixel_accumulators(spec, n), register_room(spec, n))
    vec = tirx.Ramp(0, 1, lanes)
    for gi, starts in enumerate(groups):
        extra = spare if gi == len(groups) - 1 else 0
        with T.serial(0, pw.m // n) as ob:
            def at(g, start=starts[0]):
                return tirx.Min(start + g * lanes, p - lanes)

            acc, more = _accumulate(T, n, len(starts), lanes, data, indptr, ob,
                                    lambda e, g, at=at: xf[indices[e], tirx.Ramp(first + at(g), 1, lanes)],
                                    extra, lambda e, q: xf[indices[e], first + p - spare + q])
            for g, start in enumerate(starts):
                with T.unroll(0, n) as j:
                    _store_chw(T, pw, tirx.Ramp(out_at + start, 1, lanes), ob * n + j, acc[g * n + j, vec])
            if extra:
                with T.unroll(0, extra) as q, T.unroll(0, n) as j:
                    _store_chw(T, pw, out_at + p - spare + q, ob * n + j, more[q, j])


def _any_row(T, one_row, row, first: int, last: int, edges: list[int], dw: Depthwise, kh: int) -> None:
    """Output row `row` (a runtime value): the whole window where it lies inside the map, else the code of the
    edge row it is, without the kernel rows outside the map."""
    if not edges:
        one_row(row, range(kh))
        return
    with T.If(tirx.And(row >= first, row < last)):
        with T.Then():
            one_row(row, range(kh))
        with T.Else():
            for e in edges:
                with T.If(row == e), T.Then():
                    one_row(e, kernel_rows_at(dw, e))
