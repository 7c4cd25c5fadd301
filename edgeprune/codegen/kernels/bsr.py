"""The block-sparse kernel family: 1xN BSR pointwise convolutions and dense layers.

A 1xN block is N consecutive output channels' weights for one input channel (Lin et al., methods.md section 1).
In HWIO (our layout) output channels are innermost, so a block is N contiguous floats of the weight [K, M]. Storage
is BSR over block rows: ``data[nnz, N]``, ``indices[nnz]`` (the input channel of each kept block) and
``indptr[M/N + 1]``; the constants replace the dense weight at the call site.

TVM 0.27 has no sparse operator, so the kernels are written here as TIR with their schedule in the loops, and a
module pass (`sparsify`) swaps them in for fused dense kernels after fusion: the fused epilogue (bias, folded
BatchNorm, activation, residual add) is read off the dense kernel's last block and applied to the accumulators
before they are stored, so the sparse kernel writes its output once, as the dense one does.

Two ways to vectorize, each faster somewhere (measured in bench/sparse.py; the choice is per layer):
  channels  one SIMD vector holds a block's N outputs; a tile of pixels is broadcast against it. Channels-last
            data is read as it lies. Full rate where N fills a vector (N=16 on AVX-512, N=4 on NEON: one q
            register per block), a fraction of it where N is narrower than the vector.
  pixels    XNNPACK's way: one vector holds a tile of pixels of one channel, N accumulators per block. A
            channels-last tile is transposed into a scratch buffer once and reused by every block row; the
            stores transpose back. Full rate at any N, at the price of the two transposes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from ...artifacts import LayerCost, LayerPlan
from ...cost.rows import layer_cost
from . import dense
from .common import FAMILY, FLOPS, OP, REDUCTION, CpuSpec, split_at_reduction, tag_of

NAME = "bsr"
BLOCKS = (16, 8, 4)  # the block sizes the kernels take, widest first
VARIANTS = ("pixels", "channels")
BLOCK, DENSITY, VARIANT = "edgeprune.block", "edgeprune.density", "edgeprune.variant"
MAX_DENSITY = 0.9  # a weight with fewer zero blocks than this is not looked at as sparse
RULES: list = []  # the kernels come scheduled: nothing for dlight to do
FMA_CHAINS = 8  # independent accumulators that keep two FMA pipes of 4-cycle latency busy
MAX_SPLIT = 4  # the most sets of accumulators a block row's kept blocks are split among


@dataclass(frozen=True)
class Bsr:
    """A [K, M] weight (K input channels, M outputs) in 1xN block-sparse rows."""

    data: np.ndarray  # [nnz, N] float32
    indices: np.ndarray  # [nnz] int32: each kept block's input channel
    indptr: np.ndarray  # [M / N + 1] int32
    n: int
    k: int
    m: int

    @property
    def density(self) -> float:
        return len(self.indices) / max(1, self.k * (self.m // self.n))


def to_bsr(w: np.ndarray, n: int) -> Bsr:
    """The BSR form of a [K, M] weight with 1xN blocks along M (M a multiple of N); all-zero blocks dropped."""
    k, m = w.shape
    blocks = w.reshape(k, m // n, n).transpose(1, 0, 2)  # [M/N, K, N]
    keep = np.abs(blocks).sum(-1) != 0  # [M/N, K]
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype("int32")
    rows, cols = np.nonzero(keep)
    return Bsr(np.ascontiguousarray(blocks[rows, cols], dtype="float32"), cols.astype("int32"), indptr, n, k, m)


def block_densities(w: np.ndarray) -> dict[int, float]:
    """Kept-block density of a [K, M] weight for each N of BLOCKS that divides M."""
    k, m = w.shape
    nz = w != 0
    return {n: float(nz.reshape(k, m // n, n).any(-1).mean()) for n in BLOCKS if m % n == 0}


def candidates(w: np.ndarray) -> list[tuple[int, float]]:
    """(N, density) choices worth pricing for a weight: each block size whose density is within 2 points of the
    narrowest block's (a wider block with the same zeros is faster), when that is sparse enough to matter."""
    dens = block_densities(w)
    if not dens:
        return []
    floor = min(dens.values())
    if floor > MAX_DENSITY:
        return []
    return [(n, d) for n, d in sorted(dens.items(), reverse=True) if d <= floor + 0.02]


# ---------------------------------------------------------------- reading a fused dense kernel


@dataclass
class Fused:
    """What the sparse kernel needs from a fused dense pointwise / dense-layer kernel."""

    x: tirx.Buffer  # the activation input, [1, H, W, K] or [B, K]
    weight: int  # the weight's parameter index
    out: tirx.Buffer  # [1, H, W, M] or [B, M]
    extras: list[int]  # parameter indices the epilogue reads (bias, residual), in order
    acc: tirx.Buffer  # the reduction's output, which the epilogue reads
    iters: list[tirx.Var]  # the epilogue's block iteration variables, one per output axis
    value: tirx.PrimExpr  # the epilogue: the output element as a function of acc[iters] and iters
    k: int
    m: int
    pixels: int  # P: H * W, or the batch of a dense layer
    width: int  # W (1 for a dense layer)
    flat: list = field(default_factory=list)  # (buffer, its [P, M] alias) for the output and residuals


def read_fused(func: tirx.PrimFunc) -> Fused | None:
    """The fused kernel's parts, if it is a stride-1 1x1 convolution or a dense layer reading a [K, M] constant
    through one plain (unpadded) copy at most, followed by elementwise stages; None otherwise."""
    try:
        sch = s_tir.Schedule(func)
        parts = split_at_reduction(sch)  # the tail inlined into its last stage, as the dense rule does
    except Exception:  # noqa: BLE001 - not a single-nest function
        return None
    if parts is None:
        return None
    before, red_rv, after = parts
    params = list(func.params)
    red = sch.get(red_rv)
    out_buf = red.writes[0].source
    # The input: a parameter, or a copy of one with the same shape (TVM's pad stage with nothing to pad).
    copies = {}
    for b in before:
        blk = sch.get(b)
        store = blk.body
        if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, _LOAD)
                and len(blk.reads) == 1 and list(store.value.source.shape) == list(store.buffer.shape)
                and all(i.same_as(v.var) for i, v in zip(store.value.indices, blk.iter_vars))
                and all(i.same_as(v.var) for i, v in zip(store.indices, blk.iter_vars))):
            return None
        copies[store.buffer] = store.value.source
    if sum(not r.source.same_as(out_buf) for r in red.reads) != 2:
        return None
    red_vars = [iv.var for iv in red.iter_vars if int(iv.iter_type) == 2]
    spatial = [iv.var for iv in red.iter_vars if int(iv.iter_type) != 2]
    body = red.body
    if not isinstance(body, tirx.BufferStore):
        return None
    loads = _loads(body.value)
    x_buf = w_buf = None
    for ld in loads:
        if ld.source.same_as(out_buf):
            continue
        last = ld.indices[-1]
        if isinstance(last, tirx.Var) and last.same_as(spatial[-1]) and len(ld.indices) >= 2 \
                and isinstance(ld.indices[-2], tirx.Var) and any(ld.indices[-2].same_as(v) for v in red_vars):
            w_buf = ld.source
        else:
            x_buf = ld.source
    if x_buf is None or w_buf is None:
        return None
    x_buf = next((src for dst, src in copies.items() if dst.same_as(x_buf)), x_buf)
    wshape = [int(d) for d in w_buf.shape]
    if any(d != 1 for d in wshape[:-2]):
        return None  # a k x k window: not a pointwise kernel
    k, m = wshape[-2:]
    xshape = [int(d) for d in x_buf.shape]
    oshape = [int(d) for d in out_buf.shape]
    if xshape[:-1] != oshape[:-1] or xshape[-1] != k or oshape[-1] != m or xshape[0] != 1 and len(xshape) == 4:
        return None  # strided, batched or not the shapes of x @ W
    found = operands_and_epilogue(sch, after, out_buf, params, x_buf, w_buf)
    if found is None:
        return None
    x_index, w_index, (iters, value, out_index, extras) = found
    pixels = int(np.prod(oshape[:-1]))
    width = oshape[-2] if len(oshape) == 4 else 1
    return Fused(params[x_index], w_index, params[out_index], extras, out_buf, iters, value, k, m, pixels, width)


def operands_and_epilogue(sch: s_tir.Schedule, after: list, acc: tirx.Buffer, params: Sequence[tirx.Buffer],
                          x_buf: tirx.Buffer, w_buf: tirx.Buffer
                          ) -> tuple[int, int, tuple[list, tirx.PrimExpr, int, list[int]]] | None:
    """The parameter indices of a kernel's input `x_buf` and weight `w_buf`, and its `epilogue`; None where either
    is not a parameter or the tail is not one output per accumulator."""
    x_index = next((i for i, p in enumerate(params) if p.same_as(x_buf)), None)
    w_index = next((i for i, p in enumerate(params) if p.same_as(w_buf)), None)
    if x_index is None or w_index is None:
        return None
    tail = epilogue(sch, after, acc, params, (x_index, w_index))
    return None if tail is None else (x_index, w_index, tail)


def epilogue(sch: s_tir.Schedule, after: list, acc: tirx.Buffer, params: Sequence[tirx.Buffer],
             inputs: Sequence[int]) -> tuple[list, tirx.PrimExpr, int, list[int]] | None:
    """The elementwise tail of a fused kernel whose reduction writes `acc` and reads the parameters `inputs`: (its
    iteration variables, the output element as an expression of acc[iters] and iters, the output's parameter
    index, the other parameters it reads), or None where it is not one output per accumulator."""
    shape = [int(d) for d in acc.shape]
    if after:  # the last stage, which stores the output parameter
        last = sch.get(after[-1])
        store = last.body
        if not isinstance(store, tirx.BufferStore) or not all(
                i.same_as(v.var) for i, v in zip(store.indices, last.iter_vars)):
            return None
        iters, value, out_param = [v.var for v in last.iter_vars], store.value, store.buffer
    else:
        iters = [tirx.Var(f"i{d}", "int64") for d in range(len(shape))]
        value, out_param = tirx.BufferLoad(acc, iters), acc
    out_index = next((i for i, p in enumerate(params) if p.same_as(out_param)), None)
    if out_index != len(params) - 1 or [int(d) for d in out_param.shape] != shape:
        return None  # the tail broadcasts the result (a squeeze-excite gate times its map): not one output per MAC
    extras = [i for i, p in enumerate(params) if i not in (*inputs, out_index)]
    if any(not any(ld.source.same_as(params[i]) for ld in _loads(value)) for i in extras):
        return None  # a parameter the epilogue does not read: something we did not follow
    return iters, value, out_index, extras


_LOAD = tvm.ir.TensorLoad  # what tirx.BufferLoad builds in 0.27: the buffer is `.source`


def _loads(expr) -> list:
    found: list = []

    def walk(e):
        if isinstance(e, _LOAD):
            found.append(e)
            for i in e.indices:
                walk(i)
        elif isinstance(e, tvm.ir.Call):
            for a in e.args:
                walk(a)
        elif isinstance(e, tirx.Cast):
            walk(e.value)
        elif isinstance(e, tirx.Select):
            walk(e.condition), walk(e.true_value), walk(e.false_value)
        elif isinstance(e, tirx.Not):
            walk(e.a)
        elif hasattr(e, "a") and hasattr(e, "b"):
            walk(e.a), walk(e.b)

    walk(expr)
    return found


def _lanes(e) -> int:
    return int(e.ty.dtype.lanes)


def _same_lanes(*exprs) -> list:
    """Scalars broadcast to the vectors beside them (a per-channel bias added to a vector of pixels)."""
    lanes = max(_lanes(e) for e in exprs)
    return [tirx.Broadcast(e, lanes) if _lanes(e) == 1 < lanes else e for e in exprs]


_BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max,
           tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or)


def rebuild(expr, acc: tirx.Buffer, acc_value, env: dict, flat: Sequence = (), iters: Sequence = (),
            flat_index: Sequence = ()) -> tirx.PrimExpr:
    """`expr` with loads of `acc` replaced by `acc_value` and variables by env[var] (TVM 0.27 exposes no
    expression substitution to Python; an epilogue is a handful of node kinds, and anything else raises).
    A load of a buffer that has a flat alias in `flat` ((buffer, alias) pairs), at exactly `iters`, reads the alias
    at `flat_index` instead: [pixel, channel] rather than [0, pixel // W, pixel % W, channel]."""
    def go(e):
        if isinstance(e, _LOAD):
            if e.source.same_as(acc):
                return acc_value
            alias = next((a for b, a in flat if b.same_as(e.source)), None)
            if alias is not None and len(e.indices) == len(iters) and all(
                    i.same_as(v) for i, v in zip(e.indices, iters)):
                return tirx.BufferLoad(alias, list(flat_index))
            return tirx.BufferLoad(e.source, [go(i) for i in e.indices])
        if isinstance(e, tirx.Var):
            for var, value in env.items():
                if var.same_as(e):
                    return value
            return e
        if isinstance(e, (tirx.IntImm, tirx.FloatImm, tvm.ir.StringImm)):
            return e
        if isinstance(e, _BINARY):
            return type(e)(*_same_lanes(go(e.a), go(e.b)))
        if isinstance(e, tirx.Not):
            return tirx.Not(go(e.a))
        if isinstance(e, tirx.Cast):
            return tirx.Cast(str(e.ty), go(e.value))
        if isinstance(e, tirx.Select):
            cond, a, b = _same_lanes(go(e.condition), go(e.true_value), go(e.false_value))
            return tirx.Select(cond, a, b)
        if isinstance(e, tvm.ir.Call):
            return tvm.ir.Call(e.op, [go(a) for a in e.args], attrs=e.attrs, ret_ty=e.ty)
        raise NotImplementedError(type(e).__name__)

    return go(expr)


# ---------------------------------------------------------------- the kernels


def kernel(fused: Fused, params: Sequence[tirx.Buffer], bsr: Bsr, variant: str, spec: CpuSpec,
           threads: int = 2) -> tirx.PrimFunc:
    """The BSR kernel computing what `fused` computes, as a scheduled PrimFunc with parameters
    (x, data, indices, indptr, *epilogue inputs, out)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    rows, nnz = fused.m // bsr.n, max(1, len(bsr.indices))
    chw = variant == "chw"
    if chw and not chw_capable(fused, params):
        raise NotImplementedError("a channels-first kernel takes a 1x1 convolution whose epilogue reads per-channel "
                                  "constants and tensors of the output's shape only")
    shape = _shape(fused.out)

    def layout(b: tirx.Buffer) -> tirx.Buffer:
        """Channels-first, the input, the output and the tensors of the output's shape are [1, C, H, W]."""
        return T.buffer(to_chw(_shape(b)), b.dtype) if chw and (b.same_as(fused.x) or _shape(b) == shape) else b

    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", layout(fused.x))
            data = T.arg("data", T.buffer((nnz, bsr.n), "float32"))
            indices = T.arg("indices", T.buffer((nnz,), "int32"))
            indptr = T.arg("indptr", T.buffer((rows + 1,), "int32"))
            args = {i: T.arg(params[i].name, layout(params[i])) for i in fused.extras}
            out = T.arg("out", layout(fused.out))
            T.func_attr({"tirx.noalias": True})
            # A root block with one block inside, around plain loops: Relax's layout-rewrite split expects both.
            with T.sblock("root"), T.sblock("bsr"):
                flat = (fused.m, fused.pixels) if chw else (fused.pixels, fused.m)
                xf = T.decl_buffer((fused.k, fused.pixels) if chw else (fused.pixels, fused.k), "float32",
                                   data=x.data)
                # a copy: `fused` is read once per kernel and shared by every call of it. The flat aliases are
                # keyed by the fused kernel's buffers (the epilogue reads those) and alias this kernel's.
                pairs = [(fused.out, out), *((params[i], args[i]) for i in fused.extras)]
                fused = replace(fused, flat=[(b, T.decl_buffer(flat, "float32", data=mine.data))
                                             for b, mine in pairs if _shape(b) == shape])
                body = {"pixels": _pixels, "channels": _channels, "chw": _chw}[variant]
                lanes = pixel_lanes(spec) if variant != "channels" else spec.lanes
                regs = spec.acc_regs if variant == "channels" else pixel_accumulators(spec, bsr.n)
                body(T, fused, bsr.n, xf, data, indices, indptr, lanes, regs, threads)
    return ib.get()


def to_chw(shape: Sequence[int]) -> tuple[int, ...]:
    """[1, H, W, C] -> [1, C, H, W]."""
    n, h, w, c = shape
    return (n, c, h, w)


def chw_capable(fused: Fused, params: Sequence[tirx.Buffer]) -> bool:
    """Whether the channels-first kernel computes what `fused` does: a 1x1 convolution (not a dense layer) whose
    epilogue reads tensors of the output's shape (a residual: channels-first too) and per-channel constants (bias,
    folded BatchNorm: read at their channel alone) and nothing else."""
    return len(_shape(fused.out)) == 4 and layout_free_epilogue(fused.out, params, fused.extras)


def layout_free_epilogue(out: tirx.Buffer, params: Sequence[tirx.Buffer], extras: Sequence[int]) -> bool:
    """Whether every tensor an epilogue reads is of the output's shape (it changes layout with the output) or a
    per-channel constant (read at its channel whatever the layout)."""
    shape = _shape(out)
    return all(_shape(params[i]) == shape or all(d == 1 for d in _shape(params[i])[:-1]) for i in extras)


def pixel_lanes(spec: CpuSpec) -> int:
    """The pixels kernel's vector width in floats. Where 512-bit operations are split in two (Zen 4), 256-bit
    vectors run the FMAs at the same rate and their transposes take fewer shuffles: 1.1-1.3x faster there than
    512-bit ones (1x4, MobileNetV2's pointwise shapes at 50, 75 and 90%)."""
    return 8 if spec.split_512 else spec.lanes


def register_room(spec: CpuSpec, n: int) -> int:
    """The registers a pixels / channels-first tile's accumulators can have beside its block's N weights: on x86
    each weight is broadcast into a register of its own (NEON multiplies by a lane of one weight register), and the
    input vectors need two more."""
    regs = spec.acc_regs * 4 // 3 if spec.lanes > 1 else spec.acc_regs  # acc_regs is 3/4 of the register file
    weights = n if spec.lanes >= 8 else -(-n // spec.lanes)
    return max(1, regs - weights - 2)


def pixel_accumulators(spec: CpuSpec, n: int) -> int:
    """The accumulator registers a pixels / channels-first tile takes: the target's budget, within the room its
    weights leave. At 1x8 on AVX-512, 24 accumulators and 8 weights spilled the accumulators to the stack in the
    inner loop (channels-first 0.87x dense at 50%)."""
    return min(spec.acc_regs, register_room(spec, n))


def _zero():
    return tirx.FloatImm("float32", 0.0)


def _store(T, fused: Fused, px, ch, value) -> None:
    """out[pixel, channel] = epilogue(value): the dense kernel's tail, applied to an accumulator. The output and
    the epilogue's operands of the output's shape (a residual) are read through flat [P, M] aliases, so no
    pixel // W and pixel % W are left for the compiler to undo."""
    i64 = "int64"
    px64, ch64 = tirx.Cast(i64, px), tirx.Cast(i64, ch)
    if len(fused.iters) == 4:
        w = tirx.IntImm(i64, fused.width)
        where = [tirx.IntImm(i64, 0), tirx.FloorDiv(px64, w), tirx.FloorMod(px64, w), ch64]
    else:
        where = [px64, ch64]
    env = dict(zip(fused.iters, where))
    value = rebuild(fused.value, fused.acc, value, env, fused.flat, fused.iters, (px, ch))
    out = next(a for b, a in fused.flat if b.same_as(fused.out))
    T.buffer_store(out, value, [px, ch])


def _pixels(T, fused: Fused, n: int, xf, data, indices, indptr, lanes: int, acc_regs: int, threads: int) -> None:
    """Vectors over L pixels of one output channel, N accumulators per block (XNNPACK's SpMM), for blocks narrower
    than a vector. A tile of G vectors of pixels is transposed once, channels-last to channels-first (xt[K, G*L]),
    and read by every block row: per kept block, G vector loads of its input channel and N broadcast weights feed G*N
    FMAs, with no shuffle in the loop. The transposes in and out are networks of two-vector shuffles (`_transpose`
    in, a zip back within 128-bit blocks where N <= 4), not lane-by-lane gathers."""
    p, rows = fused.pixels, fused.m // n
    vectors = -(-p // lanes)
    g_full = _vectors_per_tile(vectors, max(1, acc_regs // n), max(1, -(-8 // n)), threads)
    full, tail = divmod(vectors, g_full)
    tiles = full + (tail > 0)
    chunks = _chunks(tiles, rows, threads)  # each split of the block rows transposes its tile again
    per = -(-rows // chunks)
    with T.parallel(0, tiles * chunks) as tc:
        t, c = tc // chunks, tc % chunks
        first = c * per
        if tail:  # the last tile has fewer vectors: its own, shorter, code rather than padded work
            with T.If(t < full):
                with T.Then():
                    _one_tile(T, fused, n, xf, data, indices, indptr, lanes, t * (g_full * lanes), g_full, first, per)
                with T.Else():
                    _one_tile(T, fused, n, xf, data, indices, indptr, lanes, full * g_full * lanes, tail, first, per)
        else:
            _one_tile(T, fused, n, xf, data, indices, indptr, lanes, t * (g_full * lanes), g_full, first, per)


def _one_tile(T, fused: Fused, n: int, xf, data, indices, indptr, lanes: int, base, g_acc: int, first,
              count: int) -> None:
    """One tile of the pixels kernel: G vectors of pixels from `base`, `count` block rows from `first` (those that
    exist)."""
    p, k, rows = fused.pixels, fused.k, fused.m // n
    xt = T.alloc_buffer((k, g_acc * lanes), "float32", scope="global")
    if k >= lanes:
        with T.serial(0, k // lanes) as kc, T.serial(0, g_acc) as g:
            # pixels past the map repeat its last one: finite values whose outputs are never stored
            pixels = [xf[tirx.Min(base + g * lanes + q, p - 1), tirx.Ramp(kc * lanes, 1, lanes)] for q in range(lanes)]
            for channel, col in _transpose(pixels, lanes):
                T.buffer_store(xt, col, [kc * lanes + channel, tirx.Ramp(g * lanes, 1, lanes)])
    if k % lanes:
        with T.serial(k - k % lanes, k) as kk, T.vectorized(0, g_acc * lanes) as v:
            T.buffer_store(xt, xf[tirx.Min(base + v, p - 1), kk], [kk, v])
    # each vector's N accumulators are zipped into pixel-major order: output j of pixel q at tr[g, at[q] + j]
    zip_rounds = _rounds(lanes, _BLOCK if n <= _BLOCK else lanes, within=n.bit_length() - 1)
    where = {lab: r * lanes + b for r, labs in enumerate(_labels(n, lanes, zip_rounds)) for b, lab in enumerate(labs)}
    at = [where[(0, q)] for q in range(lanes)]
    assert all(where[(j, q)] == at[q] + j for j in range(n) for q in range(lanes))
    vec = tirx.Ramp(0, 1, lanes)
    with T.serial(0, count) as obi:
        ob = first + obi
        with T.If(ob < rows), T.Then():
            acc, _ = _accumulate(T, n, g_acc, lanes, data, indptr, ob,
                                 lambda e, g: xt[indices[e], tirx.Ramp(g * lanes, 1, lanes)])
            tr = T.alloc_buffer((g_acc, lanes * n), "float32", scope="local")
            for g in range(g_acc):
                zipped = _shuffled(zip_rounds, [acc[g * n + j, vec] for j in range(n)])
                for r, vec_r in enumerate(zipped):
                    T.buffer_store(tr, vec_r, [g, tirx.Ramp(r * lanes, 1, lanes)])
            for g in range(g_acc):
                for q in range(lanes):
                    px = base + g * lanes + q
                    with T.If(px < p), T.Then(), T.vectorized(0, n) as j:
                        _store(T, fused, px, ob * n + j, tr[g, at[q] + j])


def _accumulate(T, n: int, g_acc: int, lanes: int, data, indptr, ob, x_at, spare: int = 0, spare_at=None):
    """Block row `ob`'s G*N accumulators over its kept blocks: accumulator g*N + j += x_at(e, g) * data[e, j], with
    x_at(e, g) block e's input vector for pixel vector g (its channel's L pixels). With `spare` pixels, also one
    N-lane accumulator per spare pixel q += spare_at(e, q) (block e's input at that pixel) * the block's N weights:
    pixels past the last whole vector cost one FMA a block each rather than N. Returns (the G*N accumulators, the
    spare ones or None).

    A tile of few accumulators (a map of one vector or less, 1x4: four) would wait on each FMA's latency, one
    chain per accumulator: the kept blocks are then split among `split` sets of accumulators, summed at the end."""
    vec = tirx.Ramp(0, 1, lanes)
    block = tirx.Ramp(0, 1, n)
    width = g_acc * n
    split = max(1, min(MAX_SPLIT, -(-FMA_CHAINS // (width + spare))))
    acc = T.alloc_buffer((split * width, lanes), "float32", scope="local")
    with T.unroll(0, split * width) as a:
        T.buffer_store(acc, tirx.Broadcast(_zero(), lanes), [a, vec])
    extra = None
    if spare:
        extra = T.alloc_buffer((split * spare, n), "float32", scope="local")
        with T.unroll(0, split * spare) as q:
            T.buffer_store(extra, tirx.Broadcast(_zero(), n), [q, block])

    def step(e, s: int) -> None:
        with T.unroll(0, g_acc) as g, T.unroll(0, n) as j:
            a = s * width + g * n + j
            T.buffer_store(acc, acc[a, vec] + x_at(e, g) * tirx.Broadcast(data[e, j], lanes), [a, vec])
        if spare:
            with T.unroll(0, spare) as q:
                b = s * spare + q
                T.buffer_store(extra, extra[b, block] + tirx.Broadcast(spare_at(e, q), n) * data[e, block], [b, block])

    start, end = indptr[ob], indptr[ob + 1]
    if split == 1:
        with T.serial(start, end) as e:
            step(e, 0)
        return acc, extra
    whole = (end - start) // split
    with T.serial(0, whole) as i:
        for s in range(split):
            step(start + i * split + s, s)
    with T.serial(start + whole * split, end) as e:
        step(e, 0)
    for s in range(1, split):
        with T.unroll(0, width) as a:
            T.buffer_store(acc, acc[a, vec] + acc[s * width + a, vec], [a, vec])
        if spare:
            with T.unroll(0, spare) as q:
                T.buffer_store(extra, extra[q, block] + extra[s * spare + q, block], [q, block])
    return acc, extra


def _chw(T, fused: Fused, n: int, xf, data, indices, indptr, lanes: int, acc_regs: int, threads: int) -> None:
    """Channels-first (XNNPACK's SpMM on CHW maps): the pixels kernel without its transposes. Each channel's map is
    contiguous, so a vector of L pixels of the input channel is one load, and the accumulators are stored as they
    are. Per kept block: G vector loads, N broadcast weights, G*N FMAs. Pixels past the map's last whole vector
    are `spare` pixels, each an N-lane accumulator (one FMA a block, `_accumulate`), where there are fewer of them
    than N (7x7 at 16 lanes: 3 vectors and 1 pixel, 13 FMAs a block where a fourth vector took 16); more of them
    and the last vector is moved back to end at the map's last pixel (it recomputes a few pixels rather than
    masking)."""
    p, rows = fused.pixels, fused.m // n
    lanes = min(lanes, p)
    spare = p % lanes if p % lanes < n else 0
    vectors = p // lanes if spare else -(-p // lanes)
    tiles = _even_tiles(vectors, max(1, (acc_regs - spare) // n), max(1, -(-8 // n)), threads, rows)
    size, big = divmod(vectors, tiles)  # the first `big` tiles have size + 1 vectors, the rest size
    chunks = _chunks(tiles, rows, threads)
    per = -(-rows // chunks)

    def tile(first_vector, g_acc: int, extra: int) -> None:
        _chw_tile(T, fused, n, xf, data, indices, indptr, lanes, first_vector, g_acc, c * per, per, extra)

    with T.parallel(0, tiles * chunks) as tc:
        t, c = tc // chunks, tc % chunks
        kinds = []  # (the tiles it takes: t below this, their code), in order
        if big:
            kinds.append((big, lambda: tile(t * (size + 1), size + 1, 0)))
        if tiles - big - (spare > 0):
            kinds.append((tiles - (spare > 0), lambda: tile(t * size + big, size, 0)))
        if spare:  # the last tile also takes the spare pixels
            kinds.append((tiles, lambda: tile((tiles - 1) * size + big, size, spare)))
        _branches(T, t, kinds)


def _branches(T, t, kinds: list) -> None:
    """kinds[0]'s code where t < its bound, else kinds[1]'s where t < its bound, and so on (the last unguarded)."""
    bound, code = kinds[0]
    if len(kinds) == 1:
        code()
        return
    with T.If(t < bound):
        with T.Then():
            code()
        with T.Else():
            _branches(T, t, kinds[1:])


def _even_tiles(vectors: int, most: int, least: int, threads: int, rows: int) -> int:
    """How many tiles of `least` to `most` vectors the channels-first kernel splits a map's vectors into, of even
    sizes (differing by one at most): the count whose busiest thread has the least work, where a thread runs a
    contiguous share of the parallel jobs (the tiles, each split into row chunks when there are fewer tiles than
    threads) and a tile of s vectors costs s + 1 for its broadcasts and loop step. 14x14 at 16 lanes, 2 threads:
    13 vectors as 4, 3, 3, 3 (7 and 6 vectors a thread), where tiles of 4 and a tail made 4, 4, 4, 1 (8 and 5)."""
    def busiest(count: int) -> float:
        size, big = divmod(vectors, count)
        sizes = [size + 1] * big + [size] * (count - big)
        chunks = _chunks(count, rows, threads)
        jobs = [(s + 1) / chunks for s in sizes for _ in range(chunks)]
        step = -(-len(jobs) // max(1, threads))
        return max(sum(jobs[i:i + step]) for i in range(0, len(jobs), step))

    fewest = -(-vectors // max(1, most))
    counts = range(fewest, max(fewest, vectors // max(1, least)) + 1)
    return min(counts, key=lambda count: (busiest(count), count))


def _chw_tile(T, fused: Fused, n: int, xf, data, indices, indptr, lanes: int, first_vector, g_acc: int, first,
              count: int, spare: int = 0) -> None:
    """G vectors of pixels from `first_vector` (and the map's last `spare` pixels), `count` block rows from
    `first` (those that exist)."""
    p, rows = fused.pixels, fused.m // n
    vec = tirx.Ramp(0, 1, lanes)

    def at(g):
        return tirx.Min((first_vector + g) * lanes, p - lanes)

    with T.serial(0, count) as obi:
        ob = first + obi
        with T.If(ob < rows), T.Then():
            acc, extra = _accumulate(T, n, g_acc, lanes, data, indptr, ob,
                                     lambda e, g: xf[indices[e], tirx.Ramp(at(g), 1, lanes)],
                                     spare, lambda e, q: xf[indices[e], p - spare + q])
            with T.unroll(0, g_acc) as g, T.unroll(0, n) as j:
                _store_chw(T, fused, tirx.Ramp(at(g), 1, lanes), ob * n + j, acc[g * n + j, vec])
            if spare:
                with T.unroll(0, spare) as q, T.unroll(0, n) as j:
                    _store_chw(T, fused, p - spare + q, ob * n + j, extra[q, j])


def _store_chw(T, fused: Fused, pixels, ch, value) -> None:
    """out[channel, pixels] = epilogue(value) for a vector of pixels of one channel: per-channel constants are
    broadcast, tensors of the output's shape read through their flat [M, P] aliases."""
    i64 = "int64"
    zero = tirx.IntImm(i64, 0)
    env = dict(zip(fused.iters, [zero, zero, zero, tirx.Cast(i64, ch)]))  # constants are read at [0, 0, 0, c]
    value = rebuild(fused.value, fused.acc, value, env, fused.flat, fused.iters, (ch, pixels))
    out = next(a for b, a in fused.flat if b.same_as(fused.out))
    T.buffer_store(out, value, [ch, pixels])


_BLOCK = 4  # floats in 128 bits: the unit x86's unpacks and shufps shuffle within


def _transpose(rows: list, lanes: int) -> list:
    """The L x L transpose of L vectors: (channel, its L lanes in row order) pairs. Rounds within 128-bit blocks
    first (an unpack each on x86), then across blocks (a 128-bit permute), the textbook 8x8 AVX transpose: the
    whole-vector zip took a permute and a blend per step. The rounds leave each result's lanes in a fixed order of
    the rows, so the rows go in permuted to come out in order."""
    block = min(_BLOCK, lanes)
    rounds = _rounds(lanes, block, within=block.bit_length() - 1, across=(lanes // block).bit_length() - 1)
    order = _labels(lanes, lanes, rounds)
    row_at = [v for v, _ in order[0]]  # lane b of every result comes from row row_at[b]
    assert all([v for v, _ in res] == row_at and len({c for _, c in res}) == 1 for res in order)
    placed = [None] * lanes
    for b, v in enumerate(row_at):
        placed[v] = rows[b]
    return [(labels[0][1], vec) for vec, labels in zip(_shuffled(rounds, placed), order)]


def _rounds(lanes: int, block: int, within: int, across: int = 0) -> list:
    """Shuffle rounds on pairs of vectors i, i + V/2, each round a (low, high) pair of index patterns over the two
    vectors' 2L lanes: `within` rounds of zip-low / zip-high inside each block (the perfect shuffle; over whole
    vectors when `block` = L), then `across` rounds exchanging half the blocks."""
    half = block // 2
    zips = [[i for base in range(0, lanes, block) for k in ks for i in (base + k, lanes + base + k)]
            for ks in (range(half), range(half, block))]
    blocks = lanes // block
    swaps = [[i for j in js for src in (0, lanes) for i in range(src + j * block, src + (j + 1) * block)]
             for js in (range(blocks // 2), range(blocks // 2, blocks))]
    return [zips] * within + [swaps] * across


def _apply(rounds: list, items: list, shuffle) -> list:
    for patterns in rounds:
        half = len(items) // 2
        items = [shuffle(items[i], items[i + half], pat) for i in range(half) for pat in patterns]
    return items


def _shuffled(rounds: list, vectors: list) -> list:
    """The rounds applied to TIR vectors: two-vector Shuffles."""
    return _apply(rounds, vectors, lambda a, b, pat: tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in pat]))


def _labels(count: int, lanes: int, rounds: list) -> list:
    """Where the rounds move each input lane: result r, lane b holds (input vector, its lane)."""
    return _apply(rounds, [[(v, b) for b in range(lanes)] for v in range(count)],
                  lambda a, b, pat: [(a + b)[i] for i in pat])


def _channels(T, fused: Fused, n: int, xf, data, indices, indptr, lanes: int, acc_regs: int, threads: int) -> None:
    """Vectors over a block's N outputs: PT pixels' inputs broadcast against each kept block."""
    p, rows = fused.pixels, fused.m // n
    pt = _pixel_tile(p, acc_regs // max(1, -(-n // lanes)))
    tiles = p // pt
    chunks = _chunks(tiles, rows, 4 * threads)
    per = -(-rows // chunks)
    with T.parallel(0, tiles * chunks) as tc:
        t, c = tc // chunks, tc % chunks
        with T.serial(0, per) as obi:
            ob = c * per + obi
            with T.If(ob < rows), T.Then():
                acc = T.alloc_buffer((pt, n), "float32", scope="local")
                with T.unroll(0, pt) as v, T.vectorized(0, n) as j:
                    T.buffer_store(acc, _zero(), [v, j])
                with T.serial(indptr[ob], indptr[ob + 1]) as e, T.unroll(0, pt) as v, T.vectorized(0, n) as j:
                    T.buffer_store(acc, acc[v, j] + xf[t * pt + v, indices[e]] * data[e, j], [v, j])
                with T.unroll(0, pt) as v, T.vectorized(0, n) as j:
                    _store(T, fused, t * pt + v, ob * n + j, acc[v, j])


def preferred(spec: CpuSpec, n: int, pixels: int, density: float = 1.0) -> tuple[str, ...]:
    """The variants that apply, the one that suits this CPU first. A block that fills a vector runs "channels"
    only. A narrower one runs "pixels", but for maps of fewer pixels than the block has outputs (a vector of pixels
    would be emptier than one of outputs), and large maps at 85% sparsity and more, where the transposes in and out
    outweigh the few FMAs between them (1x4 on MobileNetV2's pointwise shapes, bench/sparse.py: pixels faster on 18
    of 19 at 50%, 16 at 75%, and at 90% on the 14x14 and 7x7 maps only). On 3x3 and 5x5 maps (a small subnet's
    last stages) pixels ran 1.2-2.9x faster than channels at 1x4 and 1x8 (Zen 5), on one pixel channels at 1x8."""
    if n >= pixel_lanes(spec):
        return ("channels",)  # one block fills the vector: nothing to pack
    if pixels < n or (pixels > 256 and density < 0.15):
        return ("channels", "pixels")
    return ("pixels", "channels")


def _vectors_per_tile(vectors: int, most: int, least: int, threads: int) -> int:
    """G pixel vectors per tile, from `least` (the accumulators that hide the FMA latency) to `most` (the register
    budget over N). Tiles are the parallel jobs, and a thread runs a contiguous share of them: the G whose busiest
    thread has the least work, each vector's work counted (1 + 1/G) for the broadcasts and loop step a tile
    iteration pays whatever its G (14x14 at 2 threads: G=6 leaves jobs of 18 and 7 vectors, G=5 of 15 and 10)."""
    def busiest(g: int) -> float:
        sizes = [g] * (vectors // g) + ([vectors % g] if vectors % g else [])
        step = -(-len(sizes) // max(1, threads))
        return max(sum(sizes[i:i + step]) for i in range(0, len(sizes), step)) * (1 + 1 / g)

    top = max(1, min(most, vectors))
    return min(range(min(least, top), top + 1), key=lambda g: (busiest(g), -g))


def _chunks(tiles: int, rows: int, jobs: int) -> int:
    """Split the block rows too when there are fewer than `jobs` pixel tiles to keep every thread busy."""
    chunks = 1
    while tiles * chunks < jobs and chunks * 2 <= rows:
        chunks *= 2
    return chunks


def _pixel_tile(p: int, budget: int) -> int:
    """The widest pixel tile up to `budget` (and 8) that divides P: no loop needs a predicate."""
    for t in range(min(8, max(1, budget), p), 0, -1):
        if p % t == 0:
            return t
    return 1


# ---------------------------------------------------------------- the pass


Chooser = Callable[[str, LayerCost, list[tuple[str, LayerCost]]], str | None]


def sparsify(mod: tvm.IRModule, target, choose: Chooser, threads: int = 2,
             channels_first: bool = False, merge: bool = True) -> tvm.IRModule:
    """Swap a BSR kernel in at each call of a fused pointwise / dense-layer kernel whose constant weight has 1xN zero
    blocks, where `choose(kernel, dense_row, [(option, sparse_row), ...])` picks an option ("<variant>:<N>") over
    dense (None keeps the dense kernel). Identical layers share one dense kernel, called with their own weights:
    each call is decided, and gets its kernel, on its own weights.

    channels_first: where layers chosen "pixels" and the depthwise layers between them form runs, the runs go
    channels-first (kernels/chw.py: no transposes inside the sparse kernels, one at each edge of a run), and with
    `merge` a run's depthwise layer and the sparse layer that alone reads it run as one kernel (chw_merged.py)."""
    spec = CpuSpec.of(target)
    main = mod["main"]
    replace: list[tuple[relax.Call, tvm.ir.GlobalVar, list]] = []
    builder = relax.BlockBuilder(mod)  # add_func gives the new kernels' GlobalVars the type call_tir checks
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    read: dict[str, Fused | None] = {}
    chosen: list[Chosen] = []
    for name, sites in _calls(main).items():
        func = funcs.get(name)
        if func is None or tag_of(func, OP) not in ("pointwise", "matmul"):
            continue
        for i, site in enumerate(sites):
            if not any(_has_zero_blocks(a) for a in site.args[1]):
                continue  # the cheap test first: most kernels of most models have no 1xN zeros at all
            if name not in read:
                read[name] = read_fused(func)
            fused = read[name]
            if fused is None:
                break
            made = _sparse_call(fused, func, site, f"{name}_{i}" if len(sites) > 1 else name, spec, choose, threads)
            if made is not None:
                new, kernel_name, args, bsr = made
                replace.append((site, builder.add_func(new, kernel_name), args))
                chosen.append(Chosen(site, fused, list(func.params), bsr, kernel_name, dict(new.attrs)))
    if not replace:
        return mod
    if channels_first:
        from . import chw

        return chw.segments(builder, main, replace, chosen, spec, threads, merge)
    mod = builder.get()
    mod["main"] = _Rewriter(replace).visit_expr(main)
    return relax.transform.DeadCodeElimination()(mod)


@dataclass
class Chosen:
    """A call given a BSR kernel, with what it takes to make its channels-first kernel instead."""

    site: relax.Call
    fused: Fused
    params: list
    bsr: Bsr
    name: str
    attrs: dict


def _sparse_call(fused: Fused, func: tirx.PrimFunc, site: relax.Call, name: str, spec: CpuSpec, choose: Chooser,
                 threads: int) -> tuple[tirx.PrimFunc, str, list, Bsr] | None:
    """The BSR kernel and arguments for one call of a fused kernel, if `choose` picks one for its weights."""
    args = list(site.args[1])
    arg = args[fused.weight]
    if not isinstance(arg, tvm.ir.Constant):
        return None
    w = arg.value.numpy().reshape(fused.k, fused.m)
    options = candidates(w)
    if not options:
        return None
    op, xs, os_ = str(tag_of(func, OP)), [_shape(fused.x)], [_shape(fused.out)]
    dense_row = dense.cost_row(op, xs, [(1, 1, fused.k, fused.m)], os_, fused.k, name)
    priced = [(f"{v}:{n}", cost_row(op, xs, [(1, 1, fused.k, fused.m)], os_, fused.k, name,
                                    tags={BLOCK: n, DENSITY: d, VARIANT: v}))
              for n, d in options for v in preferred(spec, n, fused.pixels, d)]
    pick = choose(name, dense_row, priced)
    if pick is None:
        return None
    variant, n = pick.split(":")
    fits = preferred(spec, int(n), fused.pixels)
    variant = variant if variant in fits else fits[0]  # a block as wide as a vector has one way to run
    bsr = to_bsr(w, int(n))
    try:
        new = kernel(fused, list(func.params), bsr, variant, spec, threads)
    except NotImplementedError:
        return None  # an epilogue node kind we do not rebuild: stays dense
    new = new.with_attrs({OP: op, FAMILY: NAME, FLOPS: 2 * fused.pixels * bsr.n * len(bsr.indices),
                          REDUCTION: fused.k, BLOCK: bsr.n, DENSITY: round(bsr.density, 6), VARIANT: variant,
                          "tirx.is_scheduled": True, "tirx.noalias": True})
    x_index = next(i for i, prm in enumerate(func.params) if prm.same_as(fused.x))
    new_args = [args[x_index], relax.const(bsr.data), relax.const(bsr.indices), relax.const(bsr.indptr)]
    new_args += [args[i] for i in fused.extras]
    return new, f"{name}_bsr{bsr.n}", new_args, bsr


def _has_zero_blocks(arg) -> bool:
    """Whether a call argument is a constant [1, 1, K, M] or [K, M] weight with 1xN zero blocks."""
    if not isinstance(arg, tvm.ir.Constant):
        return False
    shape = [int(d) for d in arg.value.shape]
    if len(shape) not in (2, 4) or any(d != 1 for d in shape[:-2]) or min(shape[-2:]) < 2:
        return False
    return bool(candidates(arg.value.numpy().reshape(shape[-2], shape[-1])))


def _shape(buf: tirx.Buffer) -> tuple[int, ...]:
    return tuple(int(d) for d in buf.shape)


def _calls(func: relax.Function) -> dict[str, list[relax.Call]]:
    sites: dict[str, list[relax.Call]] = {}

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            sites.setdefault(e.args[0].name_hint, []).append(e)

    relax.analysis.post_order_visit(func, visit)
    return sites


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Each replaced call (matched by identity) becomes a call of its BSR kernel with the BSR constants."""

    def __init__(self, replace: list) -> None:
        super().__init__()
        self.replace = replace

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        for site, gv, args in self.replace:
            if call.same_as(site):
                return relax.call_tir(gv, args, call.ty_args[0] if call.ty_args else call.ty)
        return super().visit_call_(call)


def cost_row(op: str, inputs: Sequence[Sequence[int]], weights: Sequence[Sequence[int]],
             outputs: Sequence[Sequence[int]], reduction: int, kernel: str, sources: Sequence[str] = (),
             tags: dict | None = None) -> LayerCost:
    """The row of a BSR kernel: priced as the dense layer it replaces, at its density and N. `weights` may be the
    BSR constants of a compiled kernel (data, indices, indptr, then the epilogue's) or the dense weight's shape."""
    tags = tags or {}
    n, density = int(tags.get(BLOCK, 1)), float(tags.get(DENSITY, 1.0))
    k = int(reduction)
    m = int(outputs[0][-1])
    nnz = int(round(density * k * (m // max(1, n))))
    bsr_shapes = [(nnz, n), (nnz,), (m // max(1, n) + 1,)]
    rest = []
    for s in weights:
        s = tuple(int(d) for d in s)
        if s in bsr_shapes:
            bsr_shapes.remove(s)
        elif s != (1, 1, k, m):
            rest.append(s)
    plan = LayerPlan(kernel, "bsr", block=n, density=density)
    return layer_cost(op, inputs, [(1, 1, k, m), *rest], outputs, reduction=k, plan=plan, family=NAME,
                      kernel=kernel, sources=sources)
