"""The binary kernel family: bit-packed k x k convolutions (NHWC) for 1-bit weights and 1-bit activations.

A binary layer (compress/binary.py: BinaryWeights) computes, per output channel o,

    D[o] = sum over the window's valid taps and input channels of a * codes[o]      (an exact integer)
    y[o] = epilogue(float(D[o]) * mul[o] + add[o])                                 (scale, bias, folded BatchNorm)

with a = +1 where the input x >= its threshold, else -1, and a = 0 at padded positions (PyTorch pads the +-1 map
with zeros: a padded zero is not -1). Codes are {-1, +1} (xnor-popcount) or SiMaN's {0, 1} (and-popcount).

The kernel, as TIR with its schedule in the loops (so the same code goes into shared libraries and C packages):
  1. threshold: per input channel (static) or the sample's mean over (H, W, C) (SiMaN), summed in float64 row by
     row, then over rows, in that order (the reference does the same, so the bits agree exactly);
  2. pack: bit c % W of word c // W of each pixel is set where x >= threshold (LSB first, W = 32 or 64 bits per
     word), into a scratch map with a border of zero words (an input already packed by the layer before skips
     1 and 2);
  3. convolve: a register tile of output pixels x vectors of output channels, P = sum popcount(a ^ w) (or a & w),
     with weights laid out [kh, kw, word, Cout] so one load gives a vector of output channels for a broadcast input
     word. The padded border read bits 0 (-1); an exact per-tap correction (the sum of the tap's codes, added for
     each padded tap) is applied to the few border pixels only:
        xnor: D = K - 2P + corr       and: D = 2P - popcount(codes[o]) + corr       (K = taps x Cin)
  4. the epilogue: float(D) * mul + add, a residual, a clamp (ReLU, Hardtanh); or D itself ("int"); or the next
     layer's input bits ("bits"): y >= t for its threshold t, decided on D with an exact integer threshold.

Popcount by CPU (`popcount_kind`, read from the TVM target like CpuSpec, so a build never assumes another machine's
instructions): AVX-512 VPOPCNTDQ where the CPU has it (Zen 4, Ice Lake); a pshufb nibble table in vector registers on
other x86 with AVX2 (Cascade Lake); NEON vcnt on armv7 and aarch64; scalar popcnt elsewhere. The kernel writes one
vector ctpop; LLVM lowers it to each of these from the target's features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tvm import tirx

from ...artifacts import LayerCost, LayerPlan
from ...cost.rows import layer_cost
from ...errors import UserError
from .bsr import _chunks  # split the output channels too when too few output rows keep the threads busy
from .common import CpuSpec, pick_vector
from .dense import _pick_tile, stack_vectors

NAME = "binary"
RULES: list = []  # the kernels come scheduled: nothing for dlight to do
CODES, ACT = "edgeprune.binary.codes", "edgeprune.binary.act"
CODE_SETS = ("pm1", "01")
ACT_MODES = ("static", "sample-mean", "packed")  # packed: the input is the previous kernel's bits
OUTPUTS = ("float", "int", "bits")


@dataclass(frozen=True)
class Conv:
    """The shape and form of one binary convolution kernel (batch 1, NHWC)."""

    height: int
    width: int
    cin: int
    cout: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    codes: str = "pm1"
    act: str = "static"
    out: str = "float"
    residual: bool = False
    clamp: tuple[float | None, float | None] = (None, None)  # max(y, lo) then min(y, hi)
    word: int = 64

    def __post_init__(self) -> None:
        if self.codes not in CODE_SETS:
            raise UserError(f"binary codes must be one of {', '.join(CODE_SETS)}, not {self.codes!r}")
        if self.act not in ACT_MODES:
            raise UserError(f"binary activation mode must be one of {', '.join(ACT_MODES)}, not {self.act!r}")
        if self.out not in OUTPUTS:
            raise UserError(f"binary kernel output must be one of {', '.join(OUTPUTS)}, not {self.out!r}")
        if self.word not in (32, 64):
            raise UserError(f"a binary kernel packs 32- or 64-bit words, not {self.word}")
        if min(self.height, self.width, self.cin, self.cout, *self.kernel, *self.stride, *self.dilation) < 1 \
                or min(self.padding) < 0:
            raise UserError(f"binary convolution with a non-positive size: {self}")
        if self.oh < 1 or self.ow < 1:
            raise UserError(f"binary convolution window {self.kernel} larger than its padded {self.height}x"
                            f"{self.width} input")
        if self.out == "bits" and self.residual:
            raise UserError("a binary kernel writing bits cannot add a residual (the sum would not be binary)")

    @property
    def words(self) -> int:
        return -(-self.cin // self.word)

    @property
    def out_words(self) -> int:
        return -(-self.cout // self.word)

    @property
    def oh(self) -> int:
        return (self.height + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.width + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def udtype(self) -> str:
        return f"uint{self.word}"

    @property
    def macs(self) -> int:
        return self.oh * self.ow * self.cout * self.taps * self.cin


def popcount_kind(target) -> tuple[str, int]:
    """(how popcounts run, the word width in bits) for a TVM target, read from its CPU as CpuSpec reads it:
      vpopcntdq  AVX-512 VPOPCNTDQ: a register of 64-bit words counted per instruction (Zen 4, Ice Lake);
      nibble     other x86 with AVX2 (Cascade Lake, Haswell): vector counts by a pshufb nibble table, LLVM's
                 lowering of a vector ctpop there (2.8x faster than scalar tiles for Cascade Lake code, measured);
      neon       armv7 and aarch64: vcnt / cnt on bytes and pairwise adds up to 32-bit words;
      scalar     one word per popcnt (x86 without AVX2; Cortex-M with 32-bit words)."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("x86_64", "i686")) or not triple:
        has = lambda f: bool(codegen.llvm_cpu_has_features([f], target))  # noqa: E731
        return ("vpopcntdq" if has("avx512vpopcntdq") else "nibble" if has("avx2") else "scalar"), 64
    if triple.startswith("thumb"):
        return "scalar", 32
    return "neon", 32


# ---------------------------------------------------------------- constants from the codes


def pack_bits(bits: np.ndarray, word: int) -> np.ndarray:
    """A boolean array packed along its last axis into little-endian words, LSB first, the last word zero-padded
    (compress.binary.BinaryWeights.packed's layout)."""
    n = bits.shape[-1]
    padded = np.zeros(bits.shape[:-1] + (-(-n // word) * word,), bool)
    padded[..., :n] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view(f"<u{word // 8}")


@dataclass
class Constants:
    """What a kernel reads besides its input, all numpy, in the order `arrays` gives them to the kernel."""

    weights: np.ndarray  # [kh, kw, words, Cout] uint: the codes' bits (+1 / 1 set), input channels packed
    base: np.ndarray  # [Cout] int32: K (xnor) or -popcount(codes[o]) (and)
    corr: np.ndarray  # [kh * kw, Cout] int32: sum of the tap's codes, added for each padded tap
    mul: np.ndarray  # [Cout] float32
    add: np.ndarray  # [Cout] float32
    threshold: np.ndarray  # [Cin] float32 (static mode)
    next_sign: np.ndarray | None = None  # [Cout] int32 (bits out): bit = next_sign * D >= next_bound
    next_bound: np.ndarray | None = None

    def arrays(self, conv: Conv) -> list[np.ndarray]:
        out = [self.threshold] if conv.act == "static" else []
        out += [self.weights, self.base, self.corr]
        out += [self.next_sign, self.next_bound] if conv.out == "bits" else [self.mul, self.add] \
            if conv.out == "float" else []
        return out

    @property
    def weight_bytes(self) -> int:
        """Flash for this layer: the packed codes and the per-channel terms the kernel reads."""
        return sum(a.nbytes for a in (self.weights, self.base, self.corr, self.mul, self.add))


def constants(conv: Conv, codes: np.ndarray, mul: np.ndarray, add: np.ndarray | None = None,
              threshold: np.ndarray | None = None, next_threshold: np.ndarray | None = None) -> Constants:
    """The kernel's constants from int8 codes [Cout, Cin, kh, kw] ({-1, +1} or {0, 1}), the per-channel multiplier
    and offset of the float epilogue, the static input threshold, and (bits out) the next layer's threshold."""
    codes = np.asarray(codes)
    shape = (conv.cout, conv.cin, *conv.kernel)
    if codes.shape != shape:
        raise UserError(f"binary codes of shape {codes.shape}, the convolution needs {shape}")
    allowed = {-1, 1} if conv.codes == "pm1" else {0, 1}
    if not set(np.unique(codes).tolist()) <= allowed:
        raise UserError(f"binary codes for {conv.codes} must be in {sorted(allowed)}")
    hwio = codes.transpose(2, 3, 1, 0)  # [kh, kw, Cin, Cout]
    bits = pack_bits(hwio.transpose(0, 1, 3, 2) > 0, conv.word)  # [kh, kw, Cout, words]
    weights = np.ascontiguousarray(bits.transpose(0, 1, 3, 2))
    tap_sums = hwio.astype(np.int32).sum(2).reshape(conv.taps, conv.cout)
    k = conv.taps * conv.cin
    base = np.full(conv.cout, k, np.int32) if conv.codes == "pm1" else -tap_sums.sum(0).astype(np.int32)
    mul = np.asarray(mul, np.float32).reshape(conv.cout)
    add = np.zeros(conv.cout, np.float32) if add is None else np.asarray(add, np.float32).reshape(conv.cout)
    thr = np.zeros(conv.cin, np.float32) if threshold is None else np.asarray(threshold, np.float32)
    c = Constants(weights, base, np.ascontiguousarray(tap_sums, np.int32), mul, add, thr.reshape(conv.cin))
    if conv.out == "bits":
        if next_threshold is None:
            raise UserError("a binary kernel writing bits needs the next layer's threshold")
        c.next_sign, c.next_bound = integer_thresholds(conv, mul, add, np.asarray(next_threshold, np.float32))
    return c


def epilogue(conv: Conv, d: np.ndarray, mul: np.ndarray, add: np.ndarray,
             residual: np.ndarray | None = None, fused: bool = False) -> np.ndarray:
    """The float epilogue on integer dot products d [..., Cout], in float32, in the kernel's order. fused: the
    multiply-add rounded once, as LLVM contracts it where the CPU has FMA (the product of a float32 and an integer
    below 2^24 is exact in float64, so only the sum rounds there, then to float32)."""
    if fused:
        y = (d.astype(np.float64) * mul.astype(np.float64) + add.astype(np.float64)).astype(np.float32)
    else:
        y = d.astype(np.float32) * mul + add
    if conv.residual:
        y = y + residual
    lo, hi = conv.clamp
    if lo is not None:
        y = np.maximum(y, np.float32(lo))
    if hi is not None:
        y = np.minimum(y, np.float32(hi))
    return y.astype(np.float32)


def integer_thresholds(conv: Conv, mul: np.ndarray, add: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bit = epilogue(D) >= t as an integer test sign * D >= bound per channel, found by evaluating the float
    epilogue at every possible D (it is monotone in D: increasing where mul >= 0, decreasing where mul < 0)."""
    k = conv.taps * conv.cin
    d = np.arange(-k, k + 1, dtype=np.int64)[:, None]
    on = epilogue(conv, d, mul, add) >= t.reshape(1, -1)  # [2K + 1, Cout]
    sign = np.where(mul >= 0, 1, -1).astype(np.int32)
    bound = np.empty(conv.cout, np.int64)
    for o in range(conv.cout):
        ds = d[on[:, o], 0]
        if ds.size == 0:
            bound[o] = k + 1  # never
        else:
            bound[o] = ds.min() if sign[o] > 0 else -ds.max()
    return sign, bound.astype(np.int32)


# ---------------------------------------------------------------- the numpy reference


def reference_threshold(conv: Conv, x: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """The per-channel threshold the kernel compares x [1, H, W, C] with: static, or the sample mean summed in
    float64 row by row and then over rows, sequentially (the kernel's order)."""
    if conv.act != "sample-mean":
        return np.asarray(threshold, np.float32)
    rows = [np.cumsum(x[0, h].astype(np.float64).ravel())[-1] for h in range(conv.height)]
    mean = np.float32(np.cumsum(rows)[-1] / (conv.height * conv.width * conv.cin))
    return np.full(conv.cin, mean, np.float32)


def reference_dot(conv: Conv, x: np.ndarray, codes: np.ndarray, threshold: np.ndarray | None = None) -> np.ndarray:
    """D [1, OH, OW, Cout] (int64), straight from the definition: +-1 activations, zeros at padded positions."""
    thr = reference_threshold(conv, x, np.zeros(conv.cin, np.float32) if threshold is None else threshold)
    a = np.where(x[0] >= thr, 1, -1).astype(np.int64)  # [H, W, C]
    ph, pw = conv.padding
    a = np.pad(a, ((ph, ph), (pw, pw), (0, 0)))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.stride, conv.dilation
    d = np.zeros((conv.oh, conv.ow, conv.cout), np.int64)
    for i in range(kh):
        for j in range(kw):
            win = a[i * dh: i * dh + sh * (conv.oh - 1) + 1: sh, j * dw: j * dw + sw * (conv.ow - 1) + 1: sw]
            d += win @ codes[:, :, i, j].T.astype(np.int64)
    return d[None]


def reference(conv: Conv, x: np.ndarray, codes: np.ndarray, mul: np.ndarray, add: np.ndarray | None = None,
              threshold: np.ndarray | None = None, residual: np.ndarray | None = None,
              next_threshold: np.ndarray | None = None, fused: bool = False) -> np.ndarray:
    """What the kernel writes, computed independently: float32 [1, OH, OW, Cout], int32 D, or packed bits.
    fused: the float epilogue's multiply-add rounded once (see `epilogue`)."""
    d = reference_dot(conv, x, codes, threshold)
    if conv.out == "int":
        return d.astype(np.int32)
    add = np.zeros(conv.cout, np.float32) if add is None else np.asarray(add, np.float32)
    y = epilogue(conv, d, np.asarray(mul, np.float32), add, residual, fused)
    if conv.out == "float":
        return y
    return pack_bits(y >= np.asarray(next_threshold, np.float32), conv.word)


# ---------------------------------------------------------------- the kernel


def tiling(conv: Conv, spec: CpuSpec, kind: str) -> tuple[int, int, int]:
    """(pixels per tile, vectors per tile, lanes per vector) for this CPU: lanes are words per SIMD register
    (1 for scalar popcounts, whose accumulators live in general registers: about 10 of them)."""
    lanes = 1 if kind == "scalar" else pick_vector(conv.cout, max(1, spec.lanes * 32 // conv.word))
    budget = 10 if kind == "scalar" else min(spec.acc_regs, stack_vectors(lanes * conv.word // 8))
    tile_w, k = _pick_tile(conv.ow, conv.cout, lanes, budget)
    return tile_w, k, lanes


def kernel(conv: Conv, target, threads: int = 2, kind: str | None = None) -> tirx.PrimFunc:
    """The kernel as a scheduled PrimFunc with parameters (x, [threshold], weights, base, corr, [mul, add |
    next_sign, next_bound], [residual], out). `kind` overrides the target's popcount ("scalar": one word per
    count, no vector tiles)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as T

    found, word = popcount_kind(target)
    if word != conv.word:
        raise UserError(f"this target packs {word}-bit words, the layer was prepared for {conv.word}")
    kind = kind or found
    spec = CpuSpec.of(target)
    tile_w, nvec, lanes = tiling(conv, spec, kind)
    u, (kh, kw), (ph, pw) = conv.udtype, conv.kernel, conv.padding
    hp, wp, nw = conv.height + 2 * ph, conv.width + 2 * pw, conv.words
    with IRBuilder() as ib:
        with T.prim_func():
            if conv.act == "packed":
                x = T.arg("x", T.buffer((1, conv.height, conv.width, nw), u))
            else:
                x = T.arg("x", T.buffer((1, conv.height, conv.width, conv.cin), "float32"))
            thr = T.arg("threshold", T.buffer((conv.cin,), "float32")) if conv.act == "static" else None
            wts = T.arg("weights", T.buffer((kh, kw, nw, conv.cout), u))
            base = T.arg("base", T.buffer((conv.cout,), "int32"))
            corr = T.arg("corr", T.buffer((conv.taps, conv.cout), "int32"))
            if conv.out == "bits":
                e1 = T.arg("next_sign", T.buffer((conv.cout,), "int32"))
                e2 = T.arg("next_bound", T.buffer((conv.cout,), "int32"))
            elif conv.out == "float":
                e1 = T.arg("mul", T.buffer((conv.cout,), "float32"))
                e2 = T.arg("add", T.buffer((conv.cout,), "float32"))
            res = T.arg("residual", T.buffer((1, conv.oh, conv.ow, conv.cout), "float32")) if conv.residual else None
            if conv.out == "bits":
                out = T.arg("out", T.buffer((1, conv.oh, conv.ow, conv.out_words), u))
            else:
                out = T.arg("out", T.buffer((1, conv.oh, conv.ow, conv.cout),
                                            "float32" if conv.out == "float" else "int32"))
            T.func_attr({"tirx.noalias": True})
            with T.sblock("root"), T.sblock("bconv"):
                xb = T.alloc_buffer((hp, wp, nw), u, scope="global")
                if conv.act == "packed":
                    _copy_packed(T, conv, x, xb)
                else:
                    t = _threshold(T, conv, x) if conv.act == "sample-mean" else None
                    _pack(T, conv, x, thr, t, xb)
                dbuf = T.alloc_buffer((conv.oh, conv.ow, conv.cout), "int32", scope="global") \
                    if conv.out == "bits" else None

                def store(oh, ow, o, d):
                    if conv.out == "int":
                        T.buffer_store(out, d, [0, oh, ow, o])
                    elif conv.out == "bits":
                        T.buffer_store(dbuf, d, [oh, ow, o])
                    else:
                        y = tirx.Cast("float32", d) * e1[o] + e2[o]
                        if conv.residual:
                            y = y + res[0, oh, ow, o]
                        lo, hi = conv.clamp
                        y = y if lo is None else tirx.Max(y, tirx.FloatImm("float32", lo))
                        y = y if hi is None else tirx.Min(y, tirx.FloatImm("float32", hi))
                        T.buffer_store(out, y, [0, oh, ow, o])

                _convolve(T, conv, xb, wts, base, corr, store, tile_w, nvec, lanes, threads)
                if conv.out == "bits":
                    _pack_out(T, conv, dbuf, e1, e2, out)
    return ib.get()


def _u(conv: Conv, v: int):
    return tirx.IntImm(conv.udtype, v)


def _threshold(T, conv: Conv, x):
    """The sample mean as a float32 scalar in a 1-element buffer: float64 sums per row, then over rows."""
    rows = T.alloc_buffer((conv.height,), "float64", scope="global")
    total = T.alloc_buffer((1,), "float64", scope="global")
    mean = T.alloc_buffer((1,), "float32", scope="global")
    with T.parallel(0, conv.height) as h:
        T.buffer_store(rows, tirx.FloatImm("float64", 0.0), [h])
        with T.serial(0, conv.width) as w, T.serial(0, conv.cin) as c:
            T.buffer_store(rows, rows[h] + tirx.Cast("float64", x[0, h, w, c]), [h])
    T.buffer_store(total, tirx.FloatImm("float64", 0.0), [0])
    with T.serial(0, conv.height) as h:
        T.buffer_store(total, total[0] + rows[h], [0])
    n = tirx.FloatImm("float64", float(conv.height * conv.width * conv.cin))
    T.buffer_store(mean, tirx.Cast("float32", total[0] / n), [0])
    return mean


def _pack(T, conv: Conv, x, thr, mean, xb) -> None:
    """xb[h + ph, w + pw, j] = the bits of pixel (h, w)'s channels j*W .. j*W + W - 1; zero words on the border."""
    ph, pw = conv.padding
    hp, wp = conv.height + 2 * ph, conv.width + 2 * pw
    zero = _u(conv, 0)
    with T.parallel(0, hp) as r, T.serial(0, wp) as col:
        inside = tirx.all(r >= ph, r < conv.height + ph, col >= pw, col < conv.width + pw)
        with T.If(inside):
            with T.Then():
                h, w = r - ph, col - pw
                for j in range(conv.words):
                    word = zero
                    for b in range(min(conv.word, conv.cin - j * conv.word)):
                        c = j * conv.word + b
                        t = mean[0] if mean is not None else thr[c]
                        word = word | tirx.Select(x[0, h, w, c] >= t, _u(conv, 1 << b), zero)
                    T.buffer_store(xb, word, [r, col, j])
            with T.Else():
                with T.serial(0, conv.words) as j:
                    T.buffer_store(xb, zero, [r, col, j])


def _copy_packed(T, conv: Conv, x, xb) -> None:
    """An input packed by the layer before, copied into the map with a zero border."""
    ph, pw = conv.padding
    hp, wp = conv.height + 2 * ph, conv.width + 2 * pw
    with T.parallel(0, hp) as r, T.serial(0, wp) as col, T.serial(0, conv.words) as j:
        inside = tirx.all(r >= ph, r < conv.height + ph, col >= pw, col < conv.width + pw)
        value = x[0, tirx.Min(tirx.Max(r - ph, 0), conv.height - 1), tirx.Min(tirx.Max(col - pw, 0), conv.width - 1), j]
        T.buffer_store(xb, tirx.Select(inside, value, _u(conv, 0)), [r, col, j])


def _convolve(T, conv: Conv, xb, wts, base, corr, store, tile_w: int, nvec: int, lanes: int, threads: int) -> None:
    """Register tiles of tile_w pixels x nvec vectors of `lanes` output channels, popcounts accumulated over the
    whole window, then D = base + s * P (+ the border correction) handed to `store`."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel, conv.stride, conv.dilation, conv.padding
    width = nvec * lanes
    blocks = conv.cout // width
    chunks = _chunks(conv.oh, blocks, threads)
    per = -(-blocks // chunks)
    scale = -2 if conv.codes == "pm1" else 2
    op = (lambda a, w: a ^ w) if conv.codes == "pm1" else (lambda a, w: a & w)
    i32 = "int32"
    with T.parallel(0, conv.oh * chunks) as task:
        oh, c = task // chunks, task % chunks
        with T.serial(0, conv.ow // tile_w) as ot, T.serial(0, per) as bi:
            ob = c * per + bi
            with T.If(ob < blocks), T.Then():
                acc = T.alloc_buffer((tile_w, width), conv.udtype, scope="global")
                with T.unroll(0, tile_w) as p, T.unroll(0, nvec) as q, T.vectorized(0, lanes) as lane:
                    T.buffer_store(acc, _u(conv, 0), [p, q * lanes + lane])
                with T.serial(0, kh) as i, T.serial(0, kw) as j, T.serial(0, conv.words) as k:
                    with T.unroll(0, tile_w) as p, T.unroll(0, nvec) as q, T.vectorized(0, lanes) as lane:
                        a = xb[oh * sh + i * dh, (ot * tile_w + p) * sw + j * dw, k]
                        w = wts[i, j, k, ob * width + q * lanes + lane]
                        T.buffer_store(acc, acc[p, q * lanes + lane] + tirx.popcount(op(a, w)), [p, q * lanes + lane])
                with T.unroll(0, tile_w) as p:
                    ow = ot * tile_w + p
                    border = tirx.any(oh * sh < ph, oh * sh + (kh - 1) * dh - ph >= conv.height,
                                      ow * sw < pw, ow * sw + (kw - 1) * dw - pw >= conv.width)

                    def write(with_border: bool) -> None:
                        with T.unroll(0, nvec) as q, T.vectorized(0, lanes) as lane:
                            o = ob * width + q * lanes + lane
                            d = base[o] + tirx.Cast(i32, acc[p, q * lanes + lane]) * scale
                            if with_border:
                                for i in range(kh):
                                    for j in range(kw):
                                        r, col = oh * sh + i * dh - ph, ow * sw + j * dw - pw
                                        pad = tirx.any(r < 0, r >= conv.height, col < 0, col >= conv.width)
                                        d = d + tirx.Select(pad, corr[i * kw + j, o], tirx.IntImm(i32, 0))
                            store(oh, ow, o, d)

                    if min(conv.padding) == 0 and max(conv.padding) == 0:
                        write(False)
                    else:
                        with T.If(border):
                            with T.Then():
                                write(True)
                            with T.Else():
                                write(False)


def _pack_out(T, conv: Conv, dbuf, sign, bound, out) -> None:
    """The next layer's input bits: bit o % W of word o // W where sign[o] * D >= bound[o]."""
    zero = _u(conv, 0)
    with T.parallel(0, conv.oh) as r, T.serial(0, conv.ow) as col:
        for j in range(conv.out_words):
            word = zero
            for b in range(min(conv.word, conv.cout - j * conv.word)):
                o = j * conv.word + b
                word = word | tirx.Select(sign[o] * dbuf[r, col, o] >= bound[o], _u(conv, 1 << b), zero)
            T.buffer_store(out, word, [0, r, col, j])


# ---------------------------------------------------------------- cost rows


def cost_row(op: str, inputs: Sequence[Sequence[int]], weights: Sequence[Sequence[int]],
             outputs: Sequence[Sequence[int]], reduction: int, kernel: str, sources: Sequence[str] = (),
             tags: dict | None = None) -> LayerCost:
    """The row of a binary kernel: 1-bit weights and activations over the whole reduction (the packed weight
    [kh, kw, words, Cout] stands for its [kh, kw, Cin, Cout] bits)."""
    ws = [tuple(int(d) for d in s) for s in weights]
    cin = int(inputs[0][-1]) if inputs else 0
    main = ws[0] if ws else ()
    if len(main) == 4 and reduction and main[0] * main[1]:
        main = (main[0], main[1], int(reduction) // (main[0] * main[1]), main[3])
    plan = LayerPlan(kernel, scheme="binary", weight_bits=1, act_bits=1)
    rest = ws[1:]
    return layer_cost(op, inputs, [main, *rest] if main else [], outputs, reduction=reduction or cin, plan=plan,
                      family=NAME, kernel=kernel, sources=sources)
