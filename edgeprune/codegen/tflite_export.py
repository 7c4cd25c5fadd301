"""An integer program (edgeprune.artifacts.IntegerProgram) written as an int8 .tflite that LiteRT runs: float input
and output like our build (QUANTIZE first, DEQUANTIZE last), int8 everywhere between but for layers the program
keeps in fp32 (DEQUANTIZE, the float layer, QUANTIZE).

TFLite keeps scales, not fixed-point constants: each int8 tensor gets the scale the program records for it
(`output_scale`), and each layer per-channel weight scales chosen so that input scale x weight scale / output scale
is the layer's own multiplier / 2**shift. LiteRT then recomputes the same multipliers, so the two differ only in
its double rounding (at most one step of a layer's grid, rarely). Layouts: the input is NHWC (TFLite's own; our
build takes the program's NCHW), convolutions' explicit padding is SAME where it is, else a PAD before a VALID
convolution (int8 PAD fills with the zero point, the program's padding too), and a flatten of a map with more than
one pixel transposes to PyTorch's channel-first order first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import IntegerOp, IntegerProgram
from ..errors import UserError
from ..fixedpoint import QMAX, QMIN
from .tflite_write import Graph, per_tensor, schema


class _Exporter:
    def __init__(self, prog: IntegerProgram) -> None:
        self.prog = prog
        self.g = Graph(description="edgeprune int8")
        self.env: dict[str, tuple[int, float, int]] = {}  # program tensor -> (TFLite tensor, scale, zero point)
        self.act = schema("ActivationFunctionType").ActivationFunctionType
        self.padding = schema("Padding").Padding

    def run(self) -> Graph:
        shape = tuple(self.prog.input_shape)
        nhwc = (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape
        self.g.inputs.append(self.g.tensor(self.prog.input, nhwc))
        self.env[self.prog.input] = (self.g.inputs[0], 0.0, 0)
        for op in self.prog.ops:
            handler = getattr(self, f"_{op.kind}", None)
            if handler is None:
                raise UserError(f"cannot export layer '{op.name or op.output}' ({op.kind}) to .tflite: this version "
                                "has no TFLite form of it")
            handler(op, op.params)
        self.g.outputs.append(self.env[self.prog.output][0])
        return self.g

    # ------------------------------------------------------------ helpers

    def shape(self, name: str) -> tuple[int, ...]:
        return self.g.tensors[self.env[name][0]].shape

    def out(self, op: IntegerOp, shape, scale: float, zp: int) -> int:
        t = self.g.tensor(op.output, shape, dtype="int8", grid=per_tensor(scale, zp))
        self.env[op.output] = (t, scale, zp)
        return t

    def const(self, name: str, value: np.ndarray, grid=None) -> int:
        return self.g.tensor(name, value.shape, np.ascontiguousarray(value), str(value.dtype), grid)

    def activation(self, op: IntegerOp, scale: float, zp: int) -> int:
        """The fused activation whose clamp (TFLite derives it from the grid) is the op's act_min / act_max."""
        lo, hi = int(op.params.get("act_min", QMIN)), int(op.params.get("act_max", QMAX))
        if lo <= QMIN and hi >= QMAX:
            return self.act.NONE
        if lo == max(QMIN, zp) and hi >= QMAX:
            return self.act.RELU
        if lo == max(QMIN, zp) and abs(hi - min(QMAX, zp + 6.0 / scale)) <= 1:
            return self.act.RELU6
        raise UserError(f"cannot export layer '{op.name or op.output}' to .tflite: its clamp [{lo}, {hi}] is none "
                        "of TFLite's activations (ReLU, ReLU6)")

    def pads(self, op: IntegerOp, hw: tuple[int, int], kernel, stride, dilation=(1, 1)) -> tuple[int, ...]:
        pad = tuple(int(v) for v in op.params.get("padding", (0, 0)))
        return pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])

    @staticmethod
    def same(hw, kernel, stride, dilation=(1, 1)) -> tuple[int, int, int, int]:
        """TFLite's SAME padding (top, left, bottom, right): the odd pixel after."""
        p = []
        for size, k, s, d in zip(hw, kernel, stride, dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            p.append((total // 2, total - total // 2))
        return p[0][0], p[1][0], p[0][1], p[1][1]

    def padded(self, op: IntegerOp, x: int, pad, kernel, stride, dilation=(1, 1), fill: int | None = None):
        """(input, Padding) for an op that TFLite pads only SAME or VALID: other padding is a PAD (PADV2 with
        `fill`) in front of a VALID op."""
        _, h, w, _ = self.g.tensors[x].shape
        if not any(pad):
            return x, self.padding.VALID
        if tuple(pad) == self.same((h, w), kernel, stride, dilation):
            return x, self.padding.SAME
        t, left, b, r = pad
        n, _, _, c = self.g.tensors[x].shape
        paddings = self.const(f"{op.output}/paddings", np.array([[0, 0], [t, b], [left, r], [0, 0]], np.int32))
        grid, dtype = self.g.tensors[x].grid, self.g.tensors[x].dtype
        y = self.g.tensor(f"{op.output}/padded", (n, h + t + b, w + left + r, c), dtype=dtype, grid=grid)
        if fill is None:
            self.g.op("PAD", [x, paddings], [y])
        else:
            value = self.const(f"{op.output}/fill", np.array([fill], np.int8), grid)
            self.g.op("PADV2", [x, paddings, value], [y])
        return y, self.padding.VALID

    # ------------------------------------------------------------ ops

    def _quantize(self, op: IntegerOp, p: dict) -> None:
        x = self.env[op.inputs[0]][0]
        t = self.out(op, self.g.tensors[x].shape, float(p["scale"]), int(p["zero_point"]))
        self.g.op("QUANTIZE", [x], [t])

    def _dequantize(self, op: IntegerOp, p: dict) -> None:
        x = self.env[op.inputs[0]][0]
        t = self.g.tensor(op.output, self.g.tensors[x].shape)
        self.env[op.output] = (t, 0.0, 0)
        self.g.op("DEQUANTIZE", [x], [t])

    def _conv(self, op: IntegerOp, p: dict) -> None:
        x, s_in, _ = self.env[op.inputs[0]]
        if "output_scale" not in p:
            raise UserError(f"cannot export layer '{op.name}' to .tflite: the program records no output scale "
                            "(re-quantize the network with this version)")
        s_out, zo = float(p["output_scale"]), int(p["output_zero_point"])
        w = np.asarray(p["weight"], np.int8)
        # input scale x weight scale / output scale = multiplier / 2**shift, as the program requantizes
        real = np.asarray(p["multiplier"], np.float64) / 2.0 ** np.asarray(p["shift"], np.float64)
        w_scale = (real * s_out / s_in).astype(np.float32)
        o = w.shape[0]
        zeros = np.zeros(o, np.int64)
        bias = self.const(f"{op.output}/bias", np.asarray(p["bias"], np.int32),
                          ((np.float64(s_in) * w_scale.astype(np.float64)).astype(np.float32), zeros, 0))
        act = self.activation(op, s_out, zo)
        if w.ndim == 2:  # dense
            wt = self.const(f"{op.output}/weights", w, (w_scale, zeros, 0))
            t = self.out(op, (self.g.tensors[x].shape[0], o), s_out, zo)
            self.g.op("FULLY_CONNECTED", [x, wt, bias], [t],
                      ("FullyConnectedOptions", {"FusedActivationFunction": act}))
            return
        n, h, wd, c = self.g.tensors[x].shape
        kh, kw = w.shape[2:]
        stride, dilation = tuple(p.get("stride", (1, 1))), tuple(p.get("dilation", (1, 1)))
        pad = self.pads(op, (h, wd), (kh, kw), stride, dilation)
        oh = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (wd + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        x, padding = self.padded(op, x, pad, (kh, kw), stride, dilation)
        fields = {"Padding": padding, "StrideH": stride[0], "StrideW": stride[1], "FusedActivationFunction": act,
                  "DilationHFactor": dilation[0], "DilationWFactor": dilation[1]}
        if int(p.get("groups", 1)) > 1:
            wt = self.const(f"{op.output}/filter", np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)[None]),
                            (w_scale, zeros, 3))
            t = self.out(op, (n, oh, ow, o), s_out, zo)
            self.g.op("DEPTHWISE_CONV_2D", [x, wt, bias], [t],
                      ("DepthwiseConv2DOptions", {**fields, "DepthMultiplier": 1}))
        else:
            wt = self.const(f"{op.output}/filter", np.ascontiguousarray(w.transpose(0, 2, 3, 1)), (w_scale, zeros, 0))
            t = self.out(op, (n, oh, ow, o), s_out, zo)
            self.g.op("CONV_2D", [x, wt, bias], [t], ("Conv2DOptions", fields))

    def _fconv(self, op: IntegerOp, p: dict) -> None:
        """A layer kept in fp32 (mixed precision): DEQUANTIZE, the float convolution or dense layer with its
        activation fused (a clamp at 0 and 6 in float is the program's clamp on the output grid), QUANTIZE."""
        x = self.env[op.inputs[0]][0]
        s_out, zo = float(p["output_scale"]), int(p["output_zero_point"])
        act = self.activation(op, s_out, zo)
        xf = self.g.tensor(f"{op.output}/dequantized", self.g.tensors[x].shape)
        self.g.op("DEQUANTIZE", [x], [xf])
        w, bias = np.asarray(p["weight"], np.float32), np.asarray(p["bias"], np.float32)
        b = self.const(f"{op.output}/bias", bias)
        if w.ndim == 2:
            wt = self.const(f"{op.output}/weights", w)
            y = self.g.tensor(f"{op.output}/float", (self.g.tensors[x].shape[0], w.shape[0]))
            self.g.op("FULLY_CONNECTED", [xf, wt, b], [y], ("FullyConnectedOptions", {"FusedActivationFunction": act}))
        else:
            n, h, wd, _ = self.g.tensors[x].shape
            o, _, kh, kw = w.shape
            stride, dilation = tuple(p["stride"]), tuple(p["dilation"])
            pad = self.pads(op, (h, wd), (kh, kw), stride, dilation)
            oh = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            ow = (wd + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
            xf, padding = self.padded(op, xf, pad, (kh, kw), stride, dilation)  # float PAD: zeros, as the program
            fields = {"Padding": padding, "StrideH": stride[0], "StrideW": stride[1], "FusedActivationFunction": act,
                      "DilationHFactor": dilation[0], "DilationWFactor": dilation[1]}
            y = self.g.tensor(f"{op.output}/float", (n, oh, ow, o))
            if int(p["groups"]) > 1:
                wt = self.const(f"{op.output}/filter", np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)[None]))
                self.g.op("DEPTHWISE_CONV_2D", [xf, wt, b], [y],
                          ("DepthwiseConv2DOptions", {**fields, "DepthMultiplier": 1}))
            else:
                wt = self.const(f"{op.output}/filter", np.ascontiguousarray(w.transpose(0, 2, 3, 1)))
                self.g.op("CONV_2D", [xf, wt, b], [y], ("Conv2DOptions", fields))
        t = self.out(op, self.g.tensors[y].shape, s_out, zo)
        self.g.op("QUANTIZE", [y], [t])

    def _add(self, op: IntegerOp, p: dict) -> None:
        if len(op.inputs) != 2:
            raise UserError(f"cannot export the {len(op.inputs)}-input add '{op.output}' to .tflite")
        (a, sa, _), (b, _, _) = (self.env[i] for i in op.inputs)
        ma, shift = p["multipliers"][0], p["shift"]
        s_out = float(p.get("output_scale", sa * 2.0 ** shift / ma))
        zo = int(p["output_zero_point"])
        t = self.out(op, self.g.tensors[a].shape, s_out, zo)
        self.g.op("ADD", [a, b], [t], ("AddOptions", {"FusedActivationFunction": self.activation(op, s_out, zo)}))

    def _mean(self, op: IntegerOp, p: dict) -> None:
        if len(op.inputs) != 1:
            raise UserError(f"cannot export the mean of a sum '{op.output}' to .tflite")
        x, s_in, _ = self.env[op.inputs[0]]
        n, h, w, c = self.g.tensors[x].shape
        s_out = float(p.get("output_scale", s_in * 2.0 ** p["shift"] / (p["multiplier"] * h * w)))
        axes = self.const(f"{op.output}/axes", np.array([1, 2], np.int32))
        t = self.out(op, (n, 1, 1, c), s_out, int(p["output_zero_point"]))
        self.g.op("MEAN", [x, axes], [t], ("ReducerOptions", {"KeepDims": True}))

    def _requant(self, op: IntegerOp, p: dict) -> None:
        x, s_in, _ = self.env[op.inputs[0]]
        s_out = float(p.get("output_scale", s_in * 2.0 ** p["shift"] / p["multiplier"]))
        zo = int(p["output_zero_point"])
        act = self.activation(op, s_out, zo)
        t = self.out(op, self.g.tensors[x].shape, s_out, zo)
        builtin = {self.act.NONE: "QUANTIZE", self.act.RELU: "RELU", self.act.RELU6: "RELU6"}[act]
        self.g.op(builtin, [x], [t])

    def _maxpool(self, op: IntegerOp, p: dict) -> None:
        x, s, zp = self.env[op.inputs[0]]
        n, h, w, c = self.g.tensors[x].shape
        kernel, stride = tuple(p["kernel"]), tuple(p["stride"])
        pad = self.pads(op, (h, w), kernel, stride)
        oh = (h + pad[0] + pad[2] - kernel[0]) // stride[0] + 1
        ow = (w + pad[1] + pad[3] - kernel[1]) // stride[1] + 1
        x, padding = self.padded(op, x, pad, kernel, stride, fill=QMIN)  # SAME pooling ignores its border: -inf
        t = self.out(op, (n, oh, ow, c), s, zp)
        self.g.op("MAX_POOL_2D", [x], [t], ("Pool2DOptions", {
            "Padding": padding, "StrideH": stride[0], "StrideW": stride[1], "FilterHeight": kernel[0],
            "FilterWidth": kernel[1], "FusedActivationFunction": self.act.NONE}))

    def _flatten(self, op: IntegerOp, p: dict) -> None:
        x, s, zp = self.env[op.inputs[0]]
        shape = self.g.tensors[x].shape
        if len(shape) == 2:
            self.env[op.output] = self.env[op.inputs[0]]
            return
        n, h, w, c = shape
        if h * w > 1:  # PyTorch flattens channels first
            perm = self.const(f"{op.output}/perm", np.array([0, 3, 1, 2], np.int32))
            y = self.g.tensor(f"{op.output}/nchw", (n, c, h, w), dtype="int8", grid=per_tensor(s, zp))
            self.g.op("TRANSPOSE", [x, perm], [y], ("TransposeOptions", {}))
            x = y
        new = self.const(f"{op.output}/shape", np.array([n, c * h * w], np.int32))
        t = self.out(op, (n, c * h * w), s, zp)
        self.g.op("RESHAPE", [x, new], [t])


def export_tflite(prog: IntegerProgram, path: str | Path) -> Path:
    """Write `prog` (compress/integer.program) as an int8 .tflite at `path`; its input is NHWC float."""
    return _Exporter(prog).run().save(path)
