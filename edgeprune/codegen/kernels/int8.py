"""The int8 kernel family: quantized convolutions (any kernel size, stride, padding, dilation), depthwise and
pointwise convolutions and dense layers, with int32 accumulation and the requantization, the fused activation and
the output's int8 store in the same loop nest.

The arithmetic is the one compress/quantize.py `requantize` defines: per output channel, acc = sum (x - zx) * w +
bias in int32, then in float32 y = float(acc) * scale (scale = multiplier / 2**shift, fixedpoint.requant_scale),
clamped to [act_min - zo, act_max - zo], rounded to nearest even by adding 1.5 * 2**23 and reading the sum's bits as
an integer (the clamp sits between the multiply and the add, so no fused multiply-add can change the rounding), +
zo. IEEE float32 on every CPU: bit-exact with numpy's, and per 16 outputs about 8 vector instructions where the
int64 fixed point took ~20. The input zero point is folded: the kernels sum x * w over the raw int8 input and add
bias - zx * sum(w), with padding filled with zx, so the border needs no correction.

TVM 0.27 has no int8 schedule for CPUs, so the kernels are TIR written here with their schedule in the loops, as the
block-sparse ones are. Two variants, chosen by the CPU (`variants`):
  vnni     x86 with AVX-512 VNNI: vpdpbusd multiplies 4 unsigned by 4 signed bytes and adds the four products to a
           32-bit lane, 64 MACs per instruction. The input is flipped to unsigned (x ^ 0x80 = x + 128) and the
           flip is folded into the bias: sum (x + 128) w - (zx + 128) sum w = sum (x - zx) w. Weights are packed
           [O/16, K/4, 16, 4]: one 64-byte load feeds 16 output channels for 4 reduction steps. The reduction runs
           over (kh, kw, c) with c padded to a multiple of 4 (zero weights), so a stem over 3 channels works.
  widen    everything else (NEON, AVX2 without VNNI, depthwise everywhere): int8 values widened to int16, their
           products to int32, vectorized over output channels; LLVM turns the widening multiply-add into
           vmlal.s16 on armv7 and smlal on aarch64. No 16-bit intermediate sum, so nothing saturates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

from ...artifacts import LayerCost, LayerPlan
from ...cost.rows import layer_cost
from ...fixedpoint import ROUND_MAGIC, ROUND_MAGIC_BITS, requant_scale
from .common import FAMILY, FLOPS, OP, REDUCTION, CpuSpec

NAME = "int8"
VARIANT = "edgeprune.variant"
RULES: list = []  # the kernels come scheduled: nothing for dlight to do
_VNNI_LANES = 16  # int32 lanes of a zmm register


@dataclass(frozen=True)
class Conv:
    """One quantized layer's shape and integer parameters, channels-last. A dense layer is a 1x1 convolution on a
    1x1 map; depthwise is groups == c == o."""

    h: int
    w: int
    c: int
    o: int
    kh: int = 1
    kw: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, ...] = (0, 0)  # (rows, columns) on both sides, or (top, left, bottom, right)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    input_zero_point: int = 0
    output_zero_point: int = 0
    act_min: int = -128
    act_max: int = 127

    @property
    def pad4(self) -> tuple[int, int, int, int]:
        p = tuple(self.padding)
        return p if len(p) == 4 else (p[0], p[1], p[0], p[1])

    @property
    def out_hw(self) -> tuple[int, int]:
        (sh, sw), (dh, dw) = self.stride, self.dilation
        t, left, b, r = self.pad4
        return ((self.h + t + b - dh * (self.kh - 1) - 1) // sh + 1,
                (self.w + left + r - dw * (self.kw - 1) - 1) // sw + 1)

    @property
    def reduction(self) -> int:
        return self.kh * self.kw * (1 if self.depthwise else self.c)

    @property
    def op(self) -> str:
        if self.depthwise:
            return "depthwise"
        return "pointwise" if self.kh == self.kw == 1 else "conv"


def has_vnni(target) -> bool:
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", ""))
    return triple.startswith("x86_64") and bool(codegen.llvm_cpu_has_features(["avx512vnni"], target))


def variant_for(conv: Conv, target) -> str:
    return "vnni" if has_vnni(target) and not conv.depthwise else "widen"


# ---------------------------------------------------------------- weights as the kernels read them


def _c4(c: int) -> int:
    return -(-c // 4) * 4


def pack(conv: Conv, weight: np.ndarray, bias: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed weight, folded int32 bias) for `variant` from PyTorch's OIHW int8 weight (OI for dense, O1HW for
    depthwise) and the layer's int32 bias."""
    o = conv.o
    w = weight.reshape(o, -1, conv.kh, conv.kw).astype(np.int8)
    sums = w.astype(np.int64).reshape(o, -1).sum(1)
    zx = conv.input_zero_point
    if variant == "vnni":
        c4 = _c4(conv.c)
        hwio = np.zeros((conv.kh, conv.kw, c4, o), np.int8)
        hwio[:, :, :conv.c] = w.transpose(2, 3, 1, 0)
        k = conv.kh * conv.kw * c4
        ob = -(-o // _VNNI_LANES)
        flat = np.zeros((k, ob * _VNNI_LANES), np.int8)
        flat[:, :o] = hwio.reshape(k, o)
        # [K/4, 4, OB, 16] -> [OB, K/4, 16, 4], each (16, 4) group read as 16 int32 words
        packed = flat.reshape(k // 4, 4, ob, _VNNI_LANES).transpose(2, 0, 3, 1)
        folded = bias.astype(np.int64) - (zx + 128) * sums
        folded = np.pad(folded, (0, ob * _VNNI_LANES - o))
        return np.ascontiguousarray(packed).view(np.int32).reshape(ob, k // 4, _VNNI_LANES), _int32(folded)
    hwio = w.transpose(2, 3, 1, 0)  # [KH, KW, C (1 for depthwise), O]
    if conv.depthwise:
        hwio = hwio.reshape(conv.kh, conv.kw, o)
    return np.ascontiguousarray(hwio), _int32(bias.astype(np.int64) - zx * sums)


def _int32(a: np.ndarray) -> np.ndarray:
    if np.abs(a).max(initial=0) >= 2 ** 31:
        raise ValueError("a folded int32 bias overflows; the layer's scales are degenerate")
    return a.astype(np.int32)


# ---------------------------------------------------------------- the kernels


def kernel(conv: Conv, variant: str, spec: CpuSpec, threads: int = 2) -> tirx.PrimFunc:
    """The scheduled kernel for `conv` on a CPU like `spec`, parameters (x [1, H, W, C] int8, weight (packed), bias
    int32 [O'], scale float32 [O'] (fixedpoint.requant_scale), out [1, OH, OW, O] int8), O' = O rounded up to the
    vector the kernel stores."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    oh, ow = conv.out_hw
    if variant == "vnni":
        ob = -(-conv.o // _VNNI_LANES)
        wshape, wdtype, width = (ob, conv.kh * conv.kw * _c4(conv.c) // 4, _VNNI_LANES), "int32", ob * _VNNI_LANES
    else:
        wshape = (conv.kh, conv.kw, conv.o) if conv.depthwise else (conv.kh, conv.kw, conv.c, conv.o)
        wdtype, width = "int8", conv.o
    with IRBuilder() as ib:
        with T.prim_func():
            x = T.arg("x", T.buffer((1, conv.h, conv.w, conv.c), "int8"))
            wt = T.arg("weight", T.buffer(wshape, wdtype))
            bias = T.arg("bias", T.buffer((width,), "int32"))
            scale = T.arg("scale", T.buffer((width,), "float32"))
            out = T.arg("out", T.buffer((1, oh, ow, conv.o), "int8"))
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"), T.sblock("int8"):
                q = _Requant(conv, bias, scale)
                if variant == "vnni":
                    _vnni(T, conv, x, wt, q, out, threads)
                else:
                    _widen(T, conv, x, wt, q, out, spec)
    func = ib.get()
    return func.with_attrs({OP: conv.op, FAMILY: NAME, FLOPS: 2 * oh * ow * conv.o * conv.reduction,
                            REDUCTION: conv.reduction, VARIANT: variant, "tirx.is_scheduled": True,
                            "tirx.noalias": True})


@dataclass
class _Requant:
    """The epilogue: int32 accumulator (bias not yet added) -> int8, per output channel, in float32."""

    conv: Conv
    bias: tirx.Buffer
    scale: tirx.Buffer

    def __call__(self, acc, ch, lanes: int = 1):
        idx = tirx.Ramp(ch, 1, lanes) if lanes > 1 else ch
        f32 = f"float32x{lanes}" if lanes > 1 else "float32"

        def const(v: float):
            c = tirx.FloatImm("float32", v)
            return tirx.Broadcast(c, lanes) if lanes > 1 else c

        c = self.conv
        zo = c.output_zero_point
        y = tirx.Cast(f32, acc + self.bias[idx]) * self.scale[idx]
        y = tirx.Min(tirx.Max(y, const(c.act_min - zo)), const(c.act_max - zo))
        # y + 1.5 * 2**23 rounds y to an integer (ties to even) and holds it in its low mantissa bits: read as an
        # int32 it is 0x4B400000 + round(y). One float operation after the clamp and no float subtraction: the
        # cortex-m7 code of (y + c) - (c - zo) did not round (a network's outputs off by a step where the numpy
        # reference's were not), this form is exact on every target tested.
        i32 = f"int32x{lanes}" if lanes > 1 else "int32"
        bits = tirx.call_intrin(i32, "tirx.reinterpret", y + const(ROUND_MAGIC))
        offset = tirx.IntImm("int32", ROUND_MAGIC_BITS - zo)
        r = bits - (tirx.Broadcast(offset, lanes) if lanes > 1 else offset)
        return tirx.Cast(f"int8x{lanes}" if lanes > 1 else "int8", r)


def _padded_channels(T, conv: Conv, x, c_alloc: int):
    """The input flipped to unsigned (x ^ 0x80) with its border and its channels padded to `c_alloc` with the
    flipped zero point: for vpdpbusd's groups of 4 channels when C is not a multiple of 4 (a stem on RGB), where
    the copy is small. Every other kernel reads its border in place (`_read`)."""
    ph, pw, pb, pr = conv.pad4
    hp, wp = conv.h + ph + pb, conv.w + pw + pr
    xp = T.alloc_buffer((hp, wp, c_alloc), "int8", scope="global")
    fill = tirx.IntImm("int8", conv.input_zero_point ^ -128)  # zx ^ 0x80
    # the border (and the padding channels) first, then the interior rows: plain affine loops that vectorize
    with T.parallel(0, hp) as i, T.serial(0, wp) as j, T.vectorized(0, c_alloc) as c:
        T.buffer_store(xp, fill, [i, j, c])
    with T.parallel(0, conv.h) as i, T.serial(0, conv.w) as j, T.vectorized(0, conv.c) as c:
        T.buffer_store(xp, tirx.bitwise_xor(x[0, i, j, c], tirx.IntImm("int8", -128)), [i + ph, j + pw, c])
    return xp


def _read(conv: Conv, x, row, col, c, fill):
    """x at padded coordinates (row, col): the input, or `fill` (the zero point) on the border. The indices are
    clamped so the load stays in bounds whichever way the select goes; the condition is one per pixel, shared by
    every lane of a channel vector, so padding costs no copy and no workspace."""
    ph, pw, _, _ = conv.pad4  # the far border is past the input: the clamped read and the select cover it
    if not any(conv.pad4):
        return x[0, row, col, c]
    inside = tirx.all(row >= ph, row < ph + conv.h, col >= pw, col < pw + conv.w)
    value = x[0, tirx.Min(tirx.Max(row - ph, 0), conv.h - 1), tirx.Min(tirx.Max(col - pw, 0), conv.w - 1), c]
    return tirx.Select(inside, value, fill)


def _tile(n: int, most: int) -> int:
    for t in range(min(most, n), 0, -1):
        if n % t == 0:
            return t
    return 1


def _vnni(T, conv: Conv, x, wt, q: _Requant, out, threads: int) -> None:
    """Tiles of TW output pixels x KV vectors of 16 output channels, accumulated with vpdpbusd over (kh, kw, c/4).
    Each row is cut into tiles as equal as can be (7 = 4 + 3, not 6 + 1: a 1-pixel tile keeps too few accumulator
    chains busy). Where that leaves tiles narrower than 4 on average (7-wide maps, whose layers carry the largest
    weights, read from L2 once per tile), the map's pixels are tiled as one run, rows after rows, instead: 7x7 layers
    went from two thirds of the rate of larger maps to level with them; on wider maps the per-pixel row and column
    of a run cost 5-10%, so rows stay rows there."""
    oh, ow = conv.out_hw
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    c4 = _c4(conv.c)
    xp = _padded_channels(T, conv, x, c4) if c4 != conv.c else None
    flip4 = tirx.Broadcast(tirx.IntImm("int8", -128), 4)
    zero4 = tirx.Broadcast(tirx.IntImm("int8", conv.input_zero_point), 4)
    ob = -(-conv.o // _VNNI_LANES)
    kv = _tile(ob, 4)
    most = max(1, 24 // kv)  # 24 accumulators, KV weight vectors and the broadcast word: 29 of 32 zmm
    run = ow / -(-ow // most) < 4  # a row's tiles would be narrower than 4 on average
    pixels = oh * ow if run else ow  # what is cut into tiles: the whole map, or a row
    tw = -(-pixels // -(-pixels // most))  # tiles as equal as can be, none wider than `most`
    tiles, rest = pixels // tw, pixels % tw
    lanes = _VNNI_LANES
    i32x = f"int32x{lanes}"

    def tile(blk, r0, p0, width: int) -> None:
        """`width` pixels from pixel p0 of row r0 (of the run when `run`) x KV vectors from block `blk`."""
        def where(t):
            return ((p0 + t) // ow, (p0 + t) % ow) if run else (r0, p0 + t)

        acc = T.alloc_buffer((width, kv, lanes), "int32", scope="local")
        with T.unroll(0, width) as t, T.unroll(0, kv) as v:
            T.buffer_store(acc, tirx.Broadcast(tirx.IntImm("int32", 0), lanes), [t, v, tirx.Ramp(0, 1, lanes)])
        with T.serial(0, conv.kh) as i, T.serial(0, conv.kw) as j, T.serial(0, c4 // 4) as cg:
            kg = (i * conv.kw + j) * (c4 // 4) + cg
            with T.unroll(0, width) as t:
                r, c = where(t)
                row, col = r * sh + i * dh, c * sw + j * dw
                if xp is not None:
                    word = xp[row, col, tirx.Ramp(cg * 4, 1, 4)]
                else:  # flipped to unsigned; the border is the flipped zero point
                    word = tirx.bitwise_xor(_read(conv, x, row, col, tirx.Ramp(cg * 4, 1, 4), zero4), flip4)
                a = tirx.Broadcast(tirx.call_intrin("int32", "tirx.reinterpret", word), lanes)
                with T.unroll(0, kv) as v:
                    w = wt[blk * kv + v, kg, tirx.Ramp(0, 1, lanes)]
                    cur = acc[t, v, tirx.Ramp(0, 1, lanes)]
                    T.buffer_store(acc, tirx.call_llvm_pure_intrin(
                        i32x, "llvm.x86.avx512.vpdpbusd.512", cur, *_bytes(a, w)),
                        [t, v, tirx.Ramp(0, 1, lanes)])
        with T.unroll(0, width) as t, T.unroll(0, kv) as v:
            ch = (blk * kv + v) * lanes
            res = q(acc[t, v, tirx.Ramp(0, 1, lanes)], ch, lanes)
            r, col = where(t)
            if conv.o % lanes == 0:
                T.buffer_store(out, res, [0, r, col, tirx.Ramp(ch, 1, lanes)])
            else:
                tmp = T.alloc_buffer((lanes,), "int8", scope="local")
                T.buffer_store(tmp, res, [tirx.Ramp(0, 1, lanes)])
                with T.serial(0, lanes) as e, T.If(ch + e < conv.o), T.Then():
                    T.buffer_store(out, tmp[e], [0, r, col, ch + e])

    # Rows (or the run) inside a block of output channels: its weights (KV x 16 channels x the whole reduction, up
    # to ~300 KB on a 512-channel 3x3) stay in L2 for all its tiles, where rows outside re-streamed all the weights
    # per row. A row's last, narrower tile follows its full ones; a run's tiles are jobs of their own (a 7x7 map
    # has few rows' worth of them, and the threads share them out).
    if run:
        per_block = tiles + (1 if rest else 0)
        with T.parallel(0, per_block * (ob // kv)) as job:
            blk, tt = job // per_block, job % per_block
            if rest:
                with T.If(tt < tiles):
                    with T.Then():
                        tile(blk, 0, tt * tw, tw)
                    with T.Else():
                        tile(blk, 0, tiles * tw, rest)
            else:
                tile(blk, 0, tt * tw, tw)
        return
    with T.parallel(0, oh * (ob // kv)) as job:
        blk, r0 = job // oh, job % oh
        with T.serial(0, tiles) as tt:
            tile(blk, r0, tt * tw, tw)
        if rest:
            tile(blk, r0, tiles * tw, rest)


def _bytes(*vectors):
    """LLVM 20 and later declare the VNNI intrinsics over <64 x i8> (earlier ones over <16 x i32>)."""
    if _llvm_major() < 20:
        return vectors
    return [tirx.call_intrin("int8x64", "tirx.reinterpret", v) for v in vectors]


def _llvm_major() -> int:
    from tvm.target.codegen import llvm_version_major

    return int(llvm_version_major())


def _vector(o: int, most: int) -> int:
    v = most
    while v > 1 and o % v:
        v //= 2
    return v


def _widen(T, conv: Conv, x, wt, q: _Requant, out, spec: CpuSpec) -> None:
    """Vectors over output channels, widening int8 -> int16 -> int32 multiply-adds; a tile of TW pixels by KV
    vectors, sized to the register file (on a scalar core, one channel at a time and a short tile: unrolled int64
    requantization is large code, and flash is what a microcontroller lacks)."""
    oh, ow = conv.out_hw
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    zero = tirx.IntImm("int8", conv.input_zero_point)

    def src(row, col, c):
        return _read(conv, x, row, col, c, zero)

    vec = _vector(conv.o, min(16, 4 * spec.lanes)) if spec.lanes > 1 else 1
    groups = conv.o // vec
    kv = _tile(groups, 4 if spec.lanes >= 16 else 2 if spec.lanes > 1 else 1)
    # int32 accumulators per register: spec.lanes; keep the tile within the accumulator budget
    tw = _tile(ow, max(1, min(16 // kv, spec.acc_regs * spec.lanes // (kv * vec)))) if spec.lanes > 1 else \
        _tile(ow, 2)

    def mac(acc, a, b):
        # |int8 x int8| <= 16256 fits int16: one 16-bit multiply (vpmullw; vmull.s8 on NEON) per two lanes of
        # 32-bit ones, widened once into the int32 sum
        return acc + tirx.Cast("int32", tirx.Cast("int16", a) * tirx.Cast("int16", b))

    # vectors of `vec` lanes (16 int32 = one zmm), kv of them unrolled: LLVM legalizes power-of-two vectors
    # cleanly where a 48-lane one was partly scalarized
    with T.parallel(0, oh * (groups // kv)) as job:
        r, blk = job // (groups // kv), job % (groups // kv)
        with T.serial(0, ow // tw) as tt:
            acc = T.alloc_buffer((tw, kv, vec), "int32", scope="local")
            with T.unroll(0, tw) as t, T.unroll(0, kv) as v, T.vectorized(0, vec) as e:
                T.buffer_store(acc, tirx.IntImm("int32", 0), [t, v, e])
            if conv.depthwise:
                with T.serial(0, conv.kh) as i, T.serial(0, conv.kw) as j, T.unroll(0, tw) as t, \
                        T.unroll(0, kv) as v, T.vectorized(0, vec) as e:
                    row, col, ch = r * sh + i * dh, (tt * tw + t) * sw + j * dw, (blk * kv + v) * vec + e
                    T.buffer_store(acc, mac(acc[t, v, e], src(row, col, ch), wt[i, j, ch]), [t, v, e])
            else:
                with T.serial(0, conv.kh) as i, T.serial(0, conv.kw) as j, T.serial(0, conv.c) as c, \
                        T.unroll(0, tw) as t, T.unroll(0, kv) as v, T.vectorized(0, vec) as e:
                    row, col, ch = r * sh + i * dh, (tt * tw + t) * sw + j * dw, (blk * kv + v) * vec + e
                    T.buffer_store(acc, mac(acc[t, v, e], src(row, col, c), wt[i, j, c, ch]), [t, v, e])
            with T.unroll(0, tw) as t, T.unroll(0, kv) as v, T.vectorized(0, vec) as e:
                ch = (blk * kv + v) * vec + e
                T.buffer_store(out, q(acc[t, v, e], ch), [0, r, tt * tw + t, ch])


# ---------------------------------------------------------------- cost


def cost_row(op: str, inputs: Sequence[Sequence[int]], weights: Sequence[Sequence[int]],
             outputs: Sequence[Sequence[int]], reduction: int, kernel: str, sources: Sequence[str] = (),
             tags: dict | None = None) -> LayerCost:
    """An int8 kernel's row: its MACs at 8-bit weights and activations."""
    plan = LayerPlan(kernel, "int8", weight_bits=8, act_bits=8)
    return layer_cost(op, inputs, list(weights), outputs, reduction=int(reduction), plan=plan, family=NAME,
                      kernel=kernel, sources=sources)


def build_module(conv: Conv, weight: np.ndarray, bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                 target, variant: str | None = None, threads: int = 2):
    """One layer as a compiled TIR module plus its packed constants, for tests and benchmarks: returns
    (runtime module, [packed weight, bias, scale])."""
    variant = variant or variant_for(conv, target)
    w, b = pack(conv, weight, bias, variant)
    width = b.shape[0]
    scale = np.pad(requant_scale(multiplier, shift), (0, width - conv.o))
    func = kernel(conv, variant, CpuSpec.of(target), threads).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    return lib, [w, b, scale]


__all__ = ["Conv", "CpuSpec", "NAME", "RULES", "build_module", "cost_row", "kernel", "pack", "variant_for"]
