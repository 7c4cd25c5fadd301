"""Legalizations TVM 0.27 lacks or gets wrong for channels-last networks: the transposed convolution and resize.

After layout conversion a ConvTranspose runs with NHWC activations, and TOPI only legalizes NCHW/IOHW. Ours is
the sub-pixel (phase) form, which wastes no multiply on the zeros a stride inserts: with stride s, output row
``o`` sits at ``t = o + pad`` of the uncropped output, ``t = q*s + r``, and only the taps ``k = r + s*j`` reach
it, from input row ``q - j``. So each output pixel is an ordinary correlation over a ``J x J x Cin`` window
(``J = ceil(K / s)``) with the sub-kernel of its phase ``r``:

    out[n, oh, ow, co] = sum_{mh, mw, ci} xpad[n, qh + mh, qw + mw, ci] * G[rh, rw, mh, mw, ci, co]

``G`` (phases x window x Cin x Cout, output channels innermost like every other weight here) is built from the
constant weight at compile time; ``xpad`` is the input with ``J - 1`` zeros before it. The nest is the one the
dense family schedules (spatial NHWC loops, then a reduction over the window and input channels), so bias,
activation and residual add fuse into it and its zero padding is handled like any convolution's.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir import Call, Constant

from ..errors import UserError
from . import winograd


def _sub_kernels(w: np.ndarray, strides: tuple[int, int]) -> np.ndarray:
    """[Cin, Cout, K, K'] (dilation already applied) -> G[s_h, s_w, J_h, J_w, Cin, Cout], window reversed so
    that the input is read at increasing offsets (a correlation); taps past the kernel are zero."""
    cin, cout, kh, kw = w.shape
    (sh, sw) = strides
    jh, jw = -(-kh // sh), -(-kw // sw)
    full = np.zeros((cin, cout, jh * sh, jw * sw), w.dtype)
    full[:, :, :kh, :kw] = w
    # tap k = r + s*j  ->  [.., j, r] after the reshape; then reverse j (m = J-1-j)
    g = full.reshape(cin, cout, jh, sh, jw, sw)[:, :, ::-1, :, ::-1, :]
    return np.ascontiguousarray(g.transpose(3, 5, 2, 4, 0, 1))


def _to_iohw(w: np.ndarray, layout: str) -> np.ndarray:
    return w.transpose([layout.index(c) for c in "IOHW"])


def conv2d_transpose(bb: relax.BlockBuilder, call: Call) -> relax.Expr:
    """relax.nn.conv2d_transpose in NHWC (any kernel layout), groups 1, any stride, padding, output padding and
    dilation, with a constant weight. Other layouts keep TVM's own legalization."""
    attrs = call.attrs
    data, weight = call.args
    if attrs.data_layout != "NHWC" or attrs.out_layout != "NHWC":
        from tvm.relax.transform.legalize_ops.nn import _nn_conv2d_transpose

        return _nn_conv2d_transpose(bb, call)
    if int(attrs.groups) != 1:
        raise UserError(f"ConvTranspose with groups={int(attrs.groups)} is not supported (groups 1 is); "
                        "replace it in the model")
    if not isinstance(weight, Constant):
        raise UserError("ConvTranspose with a weight computed in the graph is not supported; "
                        "export the model with constant weights")
    w = _to_iohw(weight.value.numpy(), str(attrs.kernel_layout))
    dil = [int(d) for d in attrs.dilation]
    if dil != [1, 1]:  # a dilated kernel is the kernel with zeros between its taps
        dilated = np.zeros((*w.shape[:2], (w.shape[2] - 1) * dil[0] + 1, (w.shape[3] - 1) * dil[1] + 1), w.dtype)
        dilated[:, :, :: dil[0], :: dil[1]] = w
        w = dilated
    strides = (int(attrs.strides[0]), int(attrs.strides[1]))
    pad_top, pad_left = int(attrs.padding[0]), int(attrs.padding[1])
    g = _sub_kernels(w, strides)
    (sh, sw), (jh, jw) = strides, g.shape[2:4]
    n, h, wd, cin = (int(d) for d in data.ty.shape.values)
    out_shape = [int(d) for d in call.ty.shape.values]
    oh, ow, cout = out_shape[1], out_shape[2], out_shape[3]
    if cin != g.shape[4] or cout != g.shape[5]:
        raise UserError(f"ConvTranspose weight of shape {list(w.shape)} does not fit input channels {cin} and "
                        f"output channels {cout}")
    # the last output row reads input rows up to (oh - 1 + pad) // s; pad the input that far with zeros
    after_h = max(0, (oh - 1 + pad_top) // sh + 1 - h)
    after_w = max(0, (ow - 1 + pad_left) // sw + 1 - wd)
    out_dtype = str(call.ty.dtype)

    def compute(x: te.Tensor, sub: te.Tensor) -> te.Tensor:
        xp = topi.nn.pad(x, [0, jh - 1, jw - 1, 0], [0, after_h, after_w, 0], name="pad_temp")
        mh = te.reduce_axis((0, jh), "mh")
        mw = te.reduce_axis((0, jw), "mw")
        ci = te.reduce_axis((0, cin), "ci")

        def body(b, y, x_, co):
            th, tw = y + pad_top, x_ + pad_left
            return te.sum(xp[b, th // sh + mh, tw // sw + mw, ci].astype(out_dtype)
                          * sub[th % sh, tw % sw, mh, mw, ci, co].astype(out_dtype), axis=[mh, mw, ci])

        return te.compute((n, oh, ow, cout), body, name="conv2d_transpose_nhwc")

    return bb.call_te(compute, data, relax.const(g), primfunc_name_hint="conv2d_transpose")


# Resize: TOPI's works, but does its index arithmetic in int64 (the shapes' type), which 32-bit ARM turns into
# libgcc calls (__fixsfdi, __floatundisf) that LLVM calls with the wrong float ABI: garbage indices on cortex-a7
# and cortex-m7. Ours keeps indices in int32 and computes coordinates as onnxruntime does (divide by the scale).
_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_ROUNDING = ("", "round", "round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coord(o: te.Tensor, n_in: int, n_out: int, mode: str):
    """Where output index `o` (int32) samples the input, in input pixels (float32), per ONNX Resize."""
    of = o.astype("float32")
    scale = float(np.float32(n_out) / np.float32(n_in))
    if mode == "align_corners":
        return of * float(n_in - 1) / float(n_out - 1) if n_out > 1 else of * 0.0
    if mode == "asymmetric":
        return of / scale
    if mode == "tf_half_pixel_for_nn":
        return (of + 0.5) / scale
    if mode == "pytorch_half_pixel" and n_out == 1:
        return of * 0.0
    return (of + 0.5) / scale - 0.5


def _nearest(v, rounding: str):
    if rounding in ("", "round_prefer_floor"):
        return te.ceil(v - 0.5)
    if rounding == "round_prefer_ceil":
        return te.floor(v + 0.5)
    return {"floor": te.floor, "ceil": te.ceil}.get(rounding, te.round)(v)


def resize2d(bb: relax.BlockBuilder, call: Call) -> relax.Expr:
    """relax.image.resize2d in NHWC, nearest or bilinear, with the ONNX coordinate modes above; anything else
    keeps TVM's own legalization."""
    a = call.attrs
    method, mode, rounding = str(a.method), str(a.coordinate_transformation_mode), str(a.rounding_method)
    if (str(a.layout) != "NHWC" or method not in ("nearest_neighbor", "linear") or mode not in _COORDS
            or rounding not in _ROUNDING):
        from tvm.relax.transform.legalize_ops.image import _image_resize2d

        return _image_resize2d(bb, call)
    data = call.args[0]
    n, h, w, c = (int(d) for d in data.ty.shape.values)
    oh, ow = (int(d) for d in call.ty.shape.values[1:3])
    dtype = str(call.ty.dtype)

    def compute(x: te.Tensor) -> te.Tensor:
        def body(b, y, x_, ch):
            b, y, x_, ch = (v.astype("int32") for v in (b, y, x_, ch))
            sy, sx = _source_coord(y, h, oh, mode), _source_coord(x_, w, ow, mode)
            if method == "nearest_neighbor":
                iy = te.max(te.min(_nearest(sy, rounding).astype("int32"), h - 1), 0)
                ix = te.max(te.min(_nearest(sx, rounding).astype("int32"), w - 1), 0)
                return x[b, iy, ix, ch].astype(dtype)
            sy, sx = te.max(te.min(sy, float(h - 1)), 0.0), te.max(te.min(sx, float(w - 1)), 0.0)
            y0, x0 = te.floor(sy).astype("int32"), te.floor(sx).astype("int32")
            y1, x1 = te.min(y0 + 1, h - 1), te.min(x0 + 1, w - 1)
            ty, tx = sy - y0.astype("float32"), sx - x0.astype("float32")
            top = x[b, y0, x0, ch] * (1.0 - tx) + x[b, y0, x1, ch] * tx
            bottom = x[b, y1, x0, ch] * (1.0 - tx) + x[b, y1, x1, ch] * tx
            return (top * (1.0 - ty) + bottom * ty).astype(dtype)

        return te.compute((n, oh, ow, c), body, name="resize")

    return bb.call_te(compute, data, primfunc_name_hint="resize2d")


def narrow_indices(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """On 32-bit ARM, every kernel's index arithmetic in int32. Relax's shapes are int64, and LLVM lowers a float
    to int64 conversion (a resize's or a gather's index) to libgcc's __fixsfdi/__floatundisf with the hard-float
    calling convention, which those aliases of __aeabi_f2lz/__aeabi_ul2f do not use: the indices come out as
    garbage (seen on cortex-a7 and cortex-m7). int32 conversions are single instructions."""
    triple = str(target.attrs.get("mtriple", ""))
    if not triple.startswith(("arm", "thumb")):
        return mod
    # Kernels that compute in int64 (int8 requantization, integer means) are left alone: the pass refuses int64
    # buffers ("buffer parameter ... has dtype int64") and narrows int64 arithmetic in the int8 family's kernels,
    # whose indices are int32 already.
    narrow = tvm.tirx.transform.ForceNarrowIndexToInt32()
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tvm.tirx.PrimFunc) and (func.attrs or {}).get("edgeprune.family") != "int8":
            try:
                mod[gv] = narrow(tvm.IRModule({gv: func}))[gv]
            except Exception:  # noqa: BLE001 - TVM raises its own error types
                continue
    return mod


# conv2d: Winograd for the 3x3 stride-1 convolutions where it is faster (winograd.py), TOPI for the rest
CUSTOM = {"relax.nn.conv2d_transpose": conv2d_transpose, "relax.image.resize2d": resize2d,
          "relax.nn.conv2d": winograd.conv2d}
