"""Winograd convolution for 3x3, stride-1 NHWC convolutions with constant HWIO weights.

A direct 3x3 convolution already runs near the FMA peak, so only fewer multiplies make it faster. Winograd
F(m, 3) computes an m x m output tile from an (m+2) x (m+2) input tile d with (m+2)^2 multiplies per input and
output channel pair instead of 9 m^2:

    Y = A^T [ (G g G^T) . (B^T d B) ] A

legalized as three kernels:
  1. input transform   V[a, b, p, ci]  = (B^T d_p B)[a, b]          (p numbers the output tiles of the batch)
  2. batched GEMM      M[a, b, p, co]  = sum_ci V[a, b, p, ci] U[a, b, ci, co]
  3. output transform  out[n, y, x, co] = (A^T M_p A)[y % m, x % m]  (bias, activation, residual add fuse here)

U = G g G^T is computed from the constant weight here, in numpy. The GEMM is the loop nest the dense family's
ChannelsLastReduction schedules (spatial [a, b, p, co], reduction ci); the transforms are scheduled by
kernels/winograd.py, which unrolls the tile loops so that the coefficients below are plain constants and the
zeros and ones among them fold away. Each transform is two stages, rows then columns (B^T d, then (B^T d) B), as
TIR blocks of their own: 2 x 6 x 6 terms per tile element instead of 36 x 36 in the one-expression form.

Error against onnxruntime (max |difference| / max |output|): ResNet-18 @224 6.6e-7 (direct 7.1e-7), the blocks
of tests/test_winograd.py under 1e-5; the project's budget is 1e-4.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx, topi
from tvm.ir import Call, Constant
from tvm.target import Target

from .kernels.common import CONV_FLOPS, CpuSpec  # the GEMM's annotation the tagger reads: the direct conv's FLOPs
from .kernels.winograd import GEMM, INPUT, OUTPUT  # the block names its schedule rules look for

# (B^T, G, A^T) of F(m, 3) for m = 2 and 4 (Lavin & Gray), interpolation points 0, +-1 (, +-2).
_MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

# Where Winograd measured faster than the direct kernel (AMD Zen 4, one thread, conv + bias + ReLU alone): every
# 3x3 stride-1 layer from 8 -> 16 channels at 56x56 (0.07 -> 0.02 ms) to 512 at 7x7 (2.0 -> 1.4 ms), and
# 256 at 5x5; not 512 at 4x4 (0.68 -> 0.96 ms: one tile, the 4x larger weight streamed for it), nor 3 -> 32
# at 112x112 (even).
MIN_CHANNELS = 8
MIN_SIZE = 5
# F(4,3)'s transformed weight, 36/9 = 4x the conv's, is streamed from memory once per GEMM. Past this size with
# this few tiles to reuse it on, F(2,3) (16/9 the weight) measured faster: 512 channels at 7x7 1.40 -> 1.35 ms,
# at 5x5 1.33 -> 0.87 ms (direct 1.06); 256 at 7x7 stays F(4,3) (0.20 vs 0.33 ms).
_BIG_WEIGHT = 16 << 20
_FEW_TILES = 4
# Fusion pattern of the input transform. As an injective op it would absorb the previous convolution's output
# transform and activation, which then run once per overlapping 6x6 window (2.25x) with the tile structure lost;
# opaque, it fuses with nothing and reads the finished activation.
_OPAQUE = 8  # relax OpPatternKind kOpaque


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m, 3) in float64."""
    return tuple(np.array(x, dtype=np.float64) for x in _MATRICES[m])


def transform_weight(w_hwio: np.ndarray, m: int) -> np.ndarray:
    """HWIO 3x3 weight -> U[a, b, ci, co] = (G g G^T)[a, b], in float64 then rounded once to the weight dtype."""
    _, g, _ = matrices(m)
    u = np.einsum("ai,ijco,bj->abco", g, w_hwio.astype(np.float64), g)
    return np.ascontiguousarray(u.astype(w_hwio.dtype))


def tile_size(out_h: int, out_w: int, cin: int, cout: int) -> int:
    """F(4,3) (2.25 multiplies per output, against F(2,3)'s 4) unless its weight is large and barely reused."""
    big = 36 * cin * cout * 4 > _BIG_WEIGHT
    return 2 if big and -(-out_h // 4) * -(-out_w // 4) <= _FEW_TILES else 4


def _lincomb(coefs, terms):
    """sum coefs[i] * terms[i] over the non-zero coefficients, with +-1 as additions and subtractions."""
    acc = None
    for c, t in zip(coefs, terms):
        c = float(c)
        if c == 0:
            continue
        term = t if c == 1 else -t if c == -1 else t * c
        acc = term if acc is None else acc + term
    return acc


def _select(index, values):
    """values[index] for a loop variable `index`: a chain of selects that folds to one value once the loop is
    unrolled (the schedule rules unroll it)."""
    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == k, values[k], out)
    return out


def _qualifies(call: Call, target: Target | None) -> bool:
    a = call.attrs
    data, weight = call.args
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NHWC", "HWIO", "NHWC"):
        return False
    if int(a.groups) != 1 or [int(s) for s in a.strides] != [1, 1] or [int(d) for d in a.dilation] != [1, 1]:
        return False
    if not isinstance(weight, Constant) or str(data.ty.dtype) != "float32" or str(call.ty.dtype) != "float32":
        return False
    kh, kw, cin, cout = (int(d) for d in weight.ty.shape.values)
    if (kh, kw) != (3, 3) or min(cin, cout) < MIN_CHANNELS:
        return False
    oh, ow = (int(d) for d in call.ty.shape.values[1:3])
    return min(oh, ow) >= MIN_SIZE and _wide_simd(target)


def _wide_simd(target: Target | None) -> bool:
    """Measured on x86 with AVX2/AVX-512 only. Elsewhere (microcontrollers above all, where flash is the budget)
    the weights Winograd stores, (m+2)^2/9 = 4x as many, are not known to pay."""
    if target is None or target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", ""))
    return (triple.startswith("x86_64") or not triple) and CpuSpec.of(target).lanes >= 8


def conv2d(bb: relax.BlockBuilder, call: Call) -> relax.Expr:
    """relax.nn.conv2d: Winograd where it qualifies (module docstring), TVM's own legalization elsewhere."""
    if not _qualifies(call, Target.current(allow_none=True)):
        from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

        return _nn_conv2d(bb, call)
    data, weight = call.args
    n, h, w, cin = (int(d) for d in data.ty.shape.values)
    cout = int(weight.ty.shape.values[3])
    oh, ow = (int(d) for d in call.ty.shape.values[1:3])
    m = tile_size(oh, ow, cin, cout)
    th, tw = -(-oh // m), -(-ow // m)
    pad_top, pad_left = int(call.attrs.padding[0]), int(call.attrs.padding[1])
    # rows beyond the input up to the last tile's window: the conv's own padding, then zeros for ragged tiles
    after = (th * m + 2 - h - pad_top, tw * m + 2 - w - pad_left)
    u = transform_weight(weight.value.numpy(), m)
    flops = 2 * n * oh * ow * cout * cin * 9

    v = bb.emit(bb.call_te(_input_transform, data, m, (th, tw), (pad_top, pad_left), after,
                           primfunc_name_hint="winograd_input", primfunc_attrs={"op_pattern": _OPAQUE}))
    mm = bb.emit(bb.call_te(_gemm, v, relax.const(u), flops, primfunc_name_hint="winograd_gemm"))
    return bb.call_te(_output_transform, mm, m, (n, oh, ow), (th, tw), primfunc_name_hint="winograd_output")


def _input_transform(x: te.Tensor, m: int, tiles: tuple[int, int], before: tuple[int, int],
                     after: tuple[int, int]) -> te.Tensor:
    bt, _, _ = matrices(m)
    t = m + 2
    th, tw = tiles
    n, cin = int(x.shape[0]), int(x.shape[3])
    xp = topi.nn.pad(x, [0, before[0], before[1], 0], [0, after[0], after[1], 0], name="winograd_pad")

    def rows(k, j, p, c):  # (B^T d)[k, j]
        nb, rest = p // (th * tw), p % (th * tw)
        y0, x0 = rest // tw * m, rest % tw * m
        return _select(k, [_lincomb(bt[r], [xp[nb, y0 + i, x0 + j, c] for i in range(t)]) for r in range(t)])

    r = te.compute((t, t, n * th * tw, cin), rows, name=INPUT + "_rows")
    # (B^T d B)[k, l] = sum_j (B^T d)[k, j] B^T[l, j]
    return te.compute((t, t, n * th * tw, cin),
                      lambda k, l, p, c: _select(l, [_lincomb(bt[q], [r[k, j, p, c] for j in range(t)])
                                                     for q in range(t)]), name=INPUT)


def _gemm(v: te.Tensor, u: te.Tensor, flops: int) -> te.Tensor:
    t, _, tiles, cin = (int(d) for d in v.shape)
    cout = int(u.shape[3])
    ci = te.reduce_axis((0, cin), "ci")
    return te.compute((t, t, tiles, cout), lambda a, b, p, co: te.sum(v[a, b, p, ci] * u[a, b, ci, co], axis=ci),
                      name=GEMM, attrs={CONV_FLOPS: flops})


def _output_transform(mm: te.Tensor, m: int, out: tuple[int, int, int], tiles: tuple[int, int]) -> te.Tensor:
    _, _, at = matrices(m)
    t = m + 2
    n, oh, ow = out
    th, tw = tiles
    tiles_n, cout = int(mm.shape[2]), int(mm.shape[3])
    # (A^T M)[k, b]
    r = te.compute((m, t, tiles_n, cout),
                   lambda k, b, p, c: _select(k, [_lincomb(at[q], [mm[a, b, p, c] for a in range(t)])
                                                  for q in range(m)]), name=OUTPUT + "_rows")

    def body(nb, y, x, c):  # (A^T M A)[y % m, x % m] of the tile holding (y, x)
        p = (nb * th + y // m) * tw + x // m
        return _select(x % m, [_lincomb(at[q], [r[y % m, b, p, c] for b in range(t)]) for q in range(m)])

    return te.compute((n, oh, ow, cout), body, name=OUTPUT)
