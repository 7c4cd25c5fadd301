"""Write small .tflite files without TensorFlow, from the flatbuffer builders of the ``tflite`` package.

Only what the tests need. float32: constant tensors, CONV_2D, DEPTHWISE_CONV_2D, ADD, MUL, RELU, and a custom
operator (to check the unsupported-operator error). int8 (`q*` methods, tensors with a scale and zero point, per-channel
weight scales): QUANTIZE, DEQUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MEAN, AVERAGE_POOL_2D,
MAX_POOL_2D, PAD, TRANSPOSE, RESHAPE, RELU. Layouts follow TFLite: activations NHWC, conv filters OHWI, depthwise
filters 1HWC.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.codegen.tflite_write import Graph, Op, Tensor, serialize
from edgeprune.codegen.tflite_write import schema as _m

Grid = tuple[float, int]  # an activation's (scale, zero point)


@dataclass
class TFLiteGraph:
    """Build a one-subgraph float32 TFLite model op by op; ``save`` writes the flatbuffer."""

    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def input(self, name: str, shape: tuple[int, ...], grid: Grid | None = None) -> int:
        """A float32 input, or an int8 one on `grid`."""
        self.inputs.append(self._tensor(name, shape, None, "int8" if grid else "float32", _grid(grid)))
        return self.inputs[-1]

    def const(self, name: str, value: np.ndarray) -> int:
        value = np.ascontiguousarray(value, dtype=np.float32)
        return self._tensor(name, value.shape, value)

    def _tensor(self, name: str, shape, data, dtype: str = "float32", grid=None) -> int:
        self.tensors.append(Tensor(name, tuple(int(d) for d in shape), data, dtype, grid))
        return len(self.tensors) - 1

    def _op(self, builtin: str, inputs: list[int], out_name: str, out_shape, options=None, custom: str = "",
            grid: Grid | None = None) -> int:
        code = getattr(_m("BuiltinOperator").BuiltinOperator, builtin)
        out = self._tensor(out_name, out_shape, None, "int8" if grid else "float32", _grid(grid))
        self.ops.append(Op((code, custom), inputs, [out], options))
        return out

    @staticmethod
    def _act(name: str) -> int:
        return getattr(_m("ActivationFunctionType").ActivationFunctionType, name)

    def conv2d(self, x: int, w: np.ndarray, b: np.ndarray, name: str, stride: int = 1, same: bool = True,
               act: str = "NONE", dilation: int = 1) -> int:
        n, h, wd, _ = self.tensors[x].shape
        out_c, kh, kw, _ = w.shape
        oh, ow = self._out_hw(h, wd, kh, kw, stride, same, dilation)
        pad = _m("Padding").Padding.SAME if same else _m("Padding").Padding.VALID
        opts = ("Conv2DOptions", {"Padding": pad, "StrideW": stride, "StrideH": stride,
                                  "FusedActivationFunction": self._act(act),
                                  "DilationWFactor": dilation, "DilationHFactor": dilation})
        wi, bi = self.const(f"{name}/filter", w), self.const(f"{name}/bias", b)
        return self._op("CONV_2D", [x, wi, bi], name, (n, oh, ow, out_c), opts)

    def depthwise_conv2d(self, x: int, w: np.ndarray, b: np.ndarray, name: str, stride: int = 1, same: bool = True,
                         act: str = "NONE") -> int:
        n, h, wd, c = self.tensors[x].shape
        _, kh, kw, out_c = w.shape
        oh, ow = self._out_hw(h, wd, kh, kw, stride, same, 1)
        pad = _m("Padding").Padding.SAME if same else _m("Padding").Padding.VALID
        opts = ("DepthwiseConv2DOptions", {"Padding": pad, "StrideW": stride, "StrideH": stride,
                                           "DepthMultiplier": out_c // c, "FusedActivationFunction": self._act(act),
                                           "DilationWFactor": 1, "DilationHFactor": 1})
        wi, bi = self.const(f"{name}/filter", w), self.const(f"{name}/bias", b)
        return self._op("DEPTHWISE_CONV_2D", [x, wi, bi], name, (n, oh, ow, out_c), opts)

    def add(self, a: int, b: int, name: str, act: str = "NONE") -> int:
        shape = np.broadcast_shapes(self.tensors[a].shape, self.tensors[b].shape)
        return self._op("ADD", [a, b], name, shape, ("AddOptions", {"FusedActivationFunction": self._act(act)}))

    def mul(self, a: int, b: int, name: str, act: str = "NONE") -> int:
        shape = np.broadcast_shapes(self.tensors[a].shape, self.tensors[b].shape)
        return self._op("MUL", [a, b], name, shape, ("MulOptions", {"FusedActivationFunction": self._act(act)}))

    def relu(self, x: int, name: str) -> int:
        return self._op("RELU", [x], name, self.tensors[x].shape)

    def custom(self, x: int, name: str, custom_code: str) -> int:
        return self._op("CUSTOM", [x], name, self.tensors[x].shape, custom=custom_code)

    @staticmethod
    def _out_hw(h, w, kh, kw, stride, same, dilation):
        if same:
            return -(-h // stride), -(-w // stride)
        ekh, ekw = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
        return (h - ekh) // stride + 1, (w - ekw) // stride + 1

    # ------------------------------------------------------------ int8

    def qconst(self, name: str, value: np.ndarray, scales=None, axis: int = 0) -> int:
        """An int8 (weights, with per-channel or per-tensor `scales`, zero point 0) or int32 constant (shapes,
        axes, paddings; with `scales`, a bias)."""
        value = np.ascontiguousarray(value)
        grid = None
        if scales is not None:
            scales = np.atleast_1d(np.asarray(scales, np.float32))
            grid = (scales, np.zeros(len(scales), np.int64), axis)
        return self._tensor(name, value.shape, value, str(value.dtype), grid)

    def grid(self, t: int) -> Grid | None:
        """An int8 tensor's (scale, zero point); None for a float tensor."""
        if self.tensors[t].grid is None:
            return None
        scales, zps, _ = self.tensors[t].grid
        return float(scales[0]), int(zps[0])

    def quantize(self, x: int, name: str, grid: Grid) -> int:
        return self._op("QUANTIZE", [x], name, self.tensors[x].shape, grid=grid)

    def dequantize(self, x: int, name: str) -> int:
        return self._op("DEQUANTIZE", [x], name, self.tensors[x].shape)

    def qconv2d(self, x: int, w: np.ndarray, w_scales, name: str, grid: Grid, stride: int = 1, same: bool = True,
                act: str = "NONE", depthwise: bool = False, bias: np.ndarray | None = None) -> int:
        """An int8 convolution: w int8 (OHWI, or 1HWC depthwise), bias int32 at input scale x weight scale."""
        n, h, wd, c = self.tensors[x].shape
        o = w.shape[3] if depthwise else w.shape[0]
        kh, kw = w.shape[1:3]
        w_scales = np.broadcast_to(np.asarray(w_scales, np.float32), (np.size(w_scales),))
        wi = self.qconst(f"{name}/filter", w.astype(np.int8), w_scales, 3 if depthwise else 0)
        bias = np.zeros(o, np.int32) if bias is None else bias.astype(np.int32)
        bi = self.qconst(f"{name}/bias", bias, self.grid(x)[0] * w_scales.astype(np.float64))
        oh, ow = self._out_hw(h, wd, kh, kw, stride, same, 1)
        pad = _m("Padding").Padding.SAME if same else _m("Padding").Padding.VALID
        fields = {"Padding": pad, "StrideW": stride, "StrideH": stride, "FusedActivationFunction": self._act(act),
                  "DilationWFactor": 1, "DilationHFactor": 1}
        if depthwise:
            table, builtin = "DepthwiseConv2DOptions", "DEPTHWISE_CONV_2D"
            fields["DepthMultiplier"] = 1
        else:
            table, builtin = "Conv2DOptions", "CONV_2D"
        return self._op(builtin, [x, wi, bi], name, (n, oh, ow, o), (table, fields), grid=grid)

    def qfully_connected(self, x: int, w: np.ndarray, w_scales, name: str, grid: Grid, act: str = "NONE",
                         bias: np.ndarray | None = None) -> int:
        o = w.shape[0]
        w_scales = np.broadcast_to(np.asarray(w_scales, np.float32), (np.size(w_scales),))
        wi = self.qconst(f"{name}/weights", w.astype(np.int8), w_scales, 0)
        bias = np.zeros(o, np.int32) if bias is None else bias.astype(np.int32)
        bi = self.qconst(f"{name}/bias", bias, self.grid(x)[0] * w_scales.astype(np.float64))
        opts = ("FullyConnectedOptions", {"FusedActivationFunction": self._act(act)})
        return self._op("FULLY_CONNECTED", [x, wi, bi], name, (self.tensors[x].shape[0], o), opts, grid=grid)

    def qadd(self, a: int, b: int, name: str, grid: Grid | None, act: str = "NONE") -> int:
        """ADD of two int8 tensors onto `grid` (or, grid None, of two float ones)."""
        return self._op("ADD", [a, b], name, self.tensors[a].shape,
                        ("AddOptions", {"FusedActivationFunction": self._act(act)}), grid=grid)

    def qrelu(self, x: int, name: str, grid: Grid) -> int:
        return self._op("RELU", [x], name, self.tensors[x].shape, grid=grid)

    def pad(self, x: int, pads, name: str) -> int:
        pads = np.asarray(pads, np.int32)
        shape = tuple(d + int(p.sum()) for d, p in zip(self.tensors[x].shape, pads))
        return self._op("PAD", [x, self.qconst(f"{name}/paddings", pads)], name, shape, grid=self.grid(x))

    def transpose(self, x: int, perm, name: str) -> int:
        shape = tuple(self.tensors[x].shape[p] for p in perm)
        pi = self.qconst(f"{name}/perm", np.asarray(perm, np.int32))
        return self._op("TRANSPOSE", [x, pi], name, shape, ("TransposeOptions", {}), grid=self.grid(x))

    def reshape(self, x: int, shape, name: str) -> int:
        si = self.qconst(f"{name}/shape", np.asarray(shape, np.int32))
        return self._op("RESHAPE", [x, si], name, tuple(shape), grid=self.grid(x))

    def mean(self, x: int, axes, name: str, grid: Grid | None, keep: bool = False) -> int:
        shape = [d for i, d in enumerate(self.tensors[x].shape) if i not in axes or keep]
        shape = [1 if i in axes else d for i, d in enumerate(self.tensors[x].shape)] if keep else shape
        ai = self.qconst(f"{name}/axes", np.asarray(axes, np.int32))
        return self._op("MEAN", [x, ai], name, tuple(shape), ("ReducerOptions", {"KeepDims": keep}), grid=grid)

    def pool(self, x: int, kind: str, k: int, stride: int, name: str, same: bool = False) -> int:
        """MAX_POOL_2D or AVERAGE_POOL_2D (kind "MAX" / "AVERAGE") on the input's grid."""
        n, h, w, c = self.tensors[x].shape
        oh, ow = self._out_hw(h, w, k, k, stride, same, 1)
        pad = _m("Padding").Padding.SAME if same else _m("Padding").Padding.VALID
        opts = ("Pool2DOptions", {"Padding": pad, "StrideW": stride, "StrideH": stride, "FilterWidth": k,
                                  "FilterHeight": k, "FusedActivationFunction": self._act("NONE")})
        return self._op(f"{kind}_POOL_2D", [x], name, (n, oh, ow, c), opts, grid=self.grid(x))

    def as_uint8(self) -> TFLiteGraph:
        """The same graph in TFLite's older asymmetric scheme: every int8 tensor as uint8, its values and zero
        points 128 higher (the same arithmetic). LiteRT's uint8 kernels take per-tensor weight scales only."""
        g = copy.deepcopy(self)
        for t in g.tensors:
            if t.dtype == "int8":
                t.dtype = "uint8"
                if t.data is not None:
                    t.data = (t.data.astype(np.int16) + 128).astype(np.uint8)
                if t.grid is not None:
                    t.grid = (t.grid[0], t.grid[1] + 128, t.grid[2])
        return g

    def output(self, t: int) -> None:
        self.outputs.append(t)

    # ------------------------------------------------------------ serialization (edgeprune.codegen.tflite_write)

    def to_bytes(self) -> bytes:
        return serialize(Graph(list(self.tensors), list(self.ops), self.inputs,
                               self.outputs, "edgeprune test model"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path


def _grid(grid: Grid | None):
    return None if grid is None else (np.array([grid[0]], np.float32), np.array([grid[1]], np.int64), 0)
