"""A quantized (int8) .tflite file as an integer program (edgeprune.artifacts.IntegerProgram), compiled with the
int8 kernel family like a network edgeprune quantized itself.

TVM's TFLite frontend refuses much of what int8 converters write (quantized PAD and TRANSPOSE, float islands
between DEQUANTIZE and QUANTIZE), so int8 files are lowered here op by op instead:

  CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED   conv ops, with TFLite's per-channel (or per-tensor) multipliers;
                                                in float between DEQUANTIZE and QUANTIZE, fconv (kept in fp32)
  ADD, float ADD between DEQUANTIZE/QUANTIZE    add                 MEAN over H, W; global AVERAGE_POOL_2D   mean
  MAX_POOL_2D   maxpool      RELU, RELU6, QUANTIZE int8 -> int8   requant      PAD, PADV2   folded into the next
  convolution's (or max pooling's) padding      TRANSPOSE, RESHAPE, SQUEEZE   layout only (see below)

TFLite tensors are channels-last and the program's are PyTorch's (NCHW, weights OIHW): every 4-D value carries
`perm`, the TFLite tensor being the program tensor transposed by it, so TRANSPOSE costs nothing and a graph written
from PyTorch (NCHW input, then TRANSPOSE) lowers like one written channels-last. A flatten of a channels-last map
reorders features; the reorder is folded into the next FULLY_CONNECTED's weight columns.

Arithmetic: the program requantizes once, (acc * m + 2**(s-1)) >> s, with TFLite's own (m, s) for convolutions;
TFLite rounds twice (a rounding doubling high multiply, then a rounding shift), so a result may differ by one step
of its grid. The compiled model takes and returns float in the file's layouts: an int8 input is quantized on its
grid inside, an int8 output is returned dequantized. uint8 tensors (TFLite's older scheme) are the same values less
128; uint8 weights are taken less their zero point, which must leave them within int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import IntegerOp, IntegerProgram, TensorSpec
from ..errors import UserError
from ..fixedpoint import QMAX, QMIN, quantize_multiplier, sum_multipliers

NHWC = (0, 2, 3, 1)  # a channels-last TFLite tensor of a program's NCHW tensor
_IDENTITY = (0, 1, 2, 3)


@dataclass
class _Q:
    """An int8 tensor of the program, as one TFLite tensor sees it."""

    name: str
    shape: tuple[int, ...]  # the program's (NCHW, or [N, K])
    scale: float
    zero_point: int
    perm: tuple[int, ...] = NHWC  # TFLite tensor = program tensor transposed by perm (4-D)
    pad: tuple[int, int, int, int] | None = None  # a PAD waiting for its consumer: (top, left, bottom, right)
    pad_value: int = 0
    order: np.ndarray | None = None  # [N, K]: TFLite feature k is the program's feature order[k]


@dataclass
class _Float:
    """A float tensor inside a QDQ island: the sum of dequantized int8 tensors (one, after a DEQUANTIZE; more,
    after ADDs left in float along a residual path), maybe averaged over H, W. It is lowered as one integer op
    (requant, add, or mean) when the QUANTIZE after it gives the grid: one rounding, as LiteRT's float has."""

    terms: list[_Q]
    activation: int = 0  # the last ADD's fused activation (NONE = 0)
    node: str = ""
    keep: bool | None = None  # averaged over H, W (keeping them or not), or None


@dataclass
class _FloatLayer:
    """A float convolution or dense layer on a dequantized int8 tensor (a layer a converter left in fp32), lowered
    as the program's fconv when the QUANTIZE after it gives the output grid."""

    input: str  # the program's int8 tensor it reads
    params: dict
    shape: tuple[int, ...]
    activation: int
    node: str


@dataclass
class _Input:
    """The program's float input, before its QUANTIZE."""

    perm: tuple[int, ...]


def _m(name: str):
    import importlib

    return importlib.import_module(f"tflite.{name}")


def _op_names() -> dict[int, str]:
    ops = _m("BuiltinOperator").BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_")}


def is_quantized(model, sub) -> bool:
    """Whether a .tflite graph computes in integers: any non-constant int8/uint8/int16 tensor."""
    tt = _m("TensorType").TensorType
    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        if t.Type() in (tt.INT8, tt.UINT8, tt.INT16) and not _has_data(model, t):
            return True
    return False


def _has_data(model, t) -> bool:
    if t.Buffer() >= model.BuffersLength():
        return False
    b = model.Buffers(t.Buffer())
    return b.DataLength() > 0 or b.Offset() > 1  # inside the flatbuffer, or after it (large-model layout)


def _buffer(file: bytes, model, t) -> bytes:
    """A constant's bytes: in the flatbuffer, or at an offset after it, where ai-edge-quantizer (and TFLite's
    converter for models over 2 GB) writes them."""
    b = model.Buffers(t.Buffer())
    if b.DataLength() > 0:
        return b.DataAsNumpy().tobytes()
    return file[b.Offset():b.Offset() + b.Size()]


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


class _Lowering:
    def __init__(self, path: Path, model, sub) -> None:
        self.path, self.model, self.sub = path, model, sub
        self.file = Path(path).read_bytes()
        self.names = _op_names()
        self.tt = _m("TensorType").TensorType
        self.act = _m("ActivationFunctionType").ActivationFunctionType
        self.values: dict[int, object] = {}
        self.ops: list[IntegerOp] = []
        self.input_shape: tuple[int, ...] = ()
        self.in_perm: tuple[int, ...] = NHWC
        self.prog_input = ""
        self.node = ""
        self.op_name = ""

    # ------------------------------------------------------------ reading the file

    def fail(self, why: str) -> UserError:
        return UserError(f"{self.path}: int8 TFLite operator {self.op_name} at node '{self.node}' {why}")

    def tensor(self, i: int):
        return self.sub.Tensors(i)

    def shape(self, i: int) -> tuple[int, ...]:
        t = self.tensor(i)
        return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def data(self, i: int, dtype) -> np.ndarray:
        t = self.tensor(i)
        if not _has_data(self.model, t):
            raise self.fail(f"takes tensor '{t.Name().decode()}' computed at run time where a constant is needed")
        raw = _buffer(self.file, self.model, t)
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape(i)).copy()  # writable: torch reads it

    def grid(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.tensor(i).Quantization()
        if q is None or q.ScaleLength() == 0:
            raise self.fail(f"has tensor '{self.tensor(i).Name().decode()}' without a scale; quantize it fully")
        return q.ScaleAsNumpy().astype(np.float64), q.ZeroPointAsNumpy().astype(np.int64)

    def act_grid(self, i: int) -> tuple[float, int]:
        """An activation's grid as the program holds it: int8; a uint8 tensor is the same values less 128 (its
        zero point too), which changes no arithmetic."""
        t = self.tensor(i)
        if t.Type() not in (self.tt.INT8, self.tt.UINT8):
            kind = {self.tt.INT16: "int16"}.get(t.Type(), f"type {t.Type()}")
            raise self.fail(f"has a {kind} tensor '{t.Name().decode()}': only int8 and uint8 activations are "
                            "supported (re-quantize to int8)")
        scale, zp = self.grid(i)
        if scale.size != 1:
            raise self.fail("has a per-channel activation: only per-tensor activation grids are supported")
        return float(scale[0]), int(zp[0]) - (128 if t.Type() == self.tt.UINT8 else 0)

    def options(self, op, table: str):
        opts = op.BuiltinOptions()
        o = getattr(_m(table), table)()
        if opts is not None:
            o.Init(opts.Bytes, opts.Pos)
        return o

    # ------------------------------------------------------------ values

    def value(self, i: int):
        if i not in self.values:
            raise self.fail(f"reads tensor '{self.tensor(i).Name().decode()}', which no supported op makes")
        return self.values[i]

    def int8(self, i: int, pad_ok: bool = False) -> _Q:
        v = self.value(i)
        if not isinstance(v, _Q):
            raise self.fail("computes in float: only int8 operators (and ADD, TRANSPOSE, MEAN between DEQUANTIZE "
                            "and QUANTIZE) are supported in an int8 model")
        if v.pad is not None and not pad_ok:
            raise self.fail("follows a PAD, which folds only into a convolution or max pooling")
        if v.order is not None and self.op_name != "FULLY_CONNECTED":
            raise self.fail("follows a channels-last flatten, which folds only into FULLY_CONNECTED")
        return v

    def emit(self, kind: str, inputs: list[str], out: int, **params) -> str:
        name = f"t{out}"
        while any(op.output == name for op in self.ops):  # a flatten or requant before the op's own output
            name += "_"
        self.ops.append(IntegerOp(kind, inputs, name, params, self.node))
        return name

    def clamp(self, activation: int, scale: float, zp: int) -> tuple[int, int]:
        """TFLite's CalculateActivationRangeQuantized: the fused activation as a clamp on the output grid."""
        def q(v: float) -> int:  # TfLiteRound: half away from zero
            r = v / scale
            return zp + int(np.sign(r) * np.floor(abs(r) + 0.5))

        a = self.act
        if activation == a.NONE:
            return QMIN, QMAX
        if activation == a.RELU:
            return max(QMIN, q(0.0)), QMAX
        if activation == a.RELU6:
            return max(QMIN, q(0.0)), min(QMAX, q(6.0))
        if activation == a.RELU_N1_TO_1:
            return max(QMIN, q(-1.0)), min(QMAX, q(1.0))
        raise self.fail(f"has fused activation {activation}: only RELU, RELU6 and RELU_N1_TO_1 are supported")

    # ------------------------------------------------------------ the graph

    def run(self) -> tuple[IntegerProgram, TensorSpec, tuple[int, ...]]:
        sub = self.sub
        if sub.InputsLength() != 1 or sub.OutputsLength() != 1:
            raise UserError(f"{self.path}: int8 models with {sub.InputsLength()} inputs and {sub.OutputsLength()} "
                            "outputs are not supported; use one of each")
        spec, prog_input = self.input()
        for k in range(sub.OperatorsLength()):
            op = sub.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            self.op_name = self.names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            if self.op_name == "CUSTOM" and code.CustomCode():
                self.op_name = f"CUSTOM ({code.CustomCode().decode(errors='replace')})"
            outs = op.OutputsAsNumpy() if op.OutputsLength() else []
            self.node = self.tensor(int(outs[0])).Name().decode(errors="replace") if len(outs) else f"#{k}"
            handler = getattr(self, f"_{self.op_name.lower()}", None)
            if handler is None:
                raise self.fail("is not supported in int8 models; replace it in the model")
            handler(op, [int(i) for i in op.InputsAsNumpy()], int(outs[0]))
        out_perm = self.output(int(sub.Outputs(0)))
        return IntegerProgram(prog_input, self.input_shape, self.ops, "output"), spec, out_perm

    def input(self) -> tuple[TensorSpec, str]:
        i = int(self.sub.Inputs(0))
        t = self.tensor(i)
        name = t.Name().decode(errors="replace")
        shape = self.shape(i)
        if len(shape) not in (2, 4) or any(d <= 0 for d in shape):
            raise UserError(f"{self.path}: int8 input '{name}' of shape {list(shape)} is not supported; "
                            "give the model a fixed [N, H, W, C] (or [N, C, H, W]) input")
        perm = self.in_perm = self.input_perm(i) if len(shape) == 4 else (0, 1)
        self.prog_input = name
        prog_shape = tuple(shape[k] for k in _inverse(perm))  # program dim perm[k] is TFLite dim k
        self.input_shape = prog_shape
        spec = TensorSpec(name, shape, "float32")
        if t.Type() == self.tt.FLOAT32:
            self.values[i] = _Input(perm)
        else:
            self.node, self.op_name = name, "input"
            scale, zp = self.act_grid(i)
            out = self.emit("quantize", [name], i, scale=scale, zero_point=zp)
            self.values[i] = _Q(out, prog_shape, scale, zp, perm)
        return spec, name

    def input_perm(self, i: int) -> tuple[int, ...]:
        """How the 4-D input relates to the program's NCHW: channels-last, unless the graph transposes it first
        (through its QUANTIZE), as files converted from PyTorch do; then the input is the program's own layout."""
        consumers: dict[int, list] = {}
        for k in range(self.sub.OperatorsLength()):
            op = self.sub.Operators(k)
            for j in op.InputsAsNumpy():
                consumers.setdefault(int(j), []).append(op)
        current = i
        while len(consumers.get(current, [])) == 1:
            op = consumers[current][0]
            code = self.model.OperatorCodes(op.OpcodeIndex())
            name = self.names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
            if name == "TRANSPOSE":
                tp = self.data_quiet(int(op.Inputs(1)))
                if tp is None:
                    break
                perm = [0] * 4
                for k, d in enumerate(tp):  # perm[tp] == NHWC: after the transpose the tensor is channels-last
                    perm[int(d)] = NHWC[k]
                return tuple(perm)
            if name not in ("QUANTIZE", "DEQUANTIZE"):
                break
            current = int(op.Outputs(0))
        return NHWC

    def data_quiet(self, i: int) -> np.ndarray | None:
        t = self.tensor(i)
        if not _has_data(self.model, t):
            return None
        return np.frombuffer(_buffer(self.file, self.model, t), np.int32)

    def output(self, i: int) -> tuple[int, ...]:
        self.op_name, self.node = "output", self.tensor(i).Name().decode(errors="replace")
        v = self.value(i)
        q = v.terms[0] if isinstance(v, _Float) and len(v.terms) == 1 and v.keep is None else v
        if not isinstance(q, _Q) or q.pad is not None:
            raise self.fail("is not an int8 tensor (or a dequantized one); the model must end on int8")
        if q.order is not None:
            raise self.fail("is a channels-last flatten; end the model on a FULLY_CONNECTED or the 4-D map")
        self.ops.append(IntegerOp("dequantize", [q.name], "output", {"scale": q.scale, "zero_point": q.zero_point}))
        return q.perm if len(q.shape) == 4 else (0, 1)

    # ------------------------------------------------------------ convolutions and dense layers

    def padding(self, opts, h: int, w: int, kh: int, kw: int, sh: int, sw: int, dh: int = 1, dw: int = 1):
        if opts.Padding() == _m("Padding").Padding.VALID:
            return 0, 0, 0, 0
        pads = []
        for size, k, s, d in ((h, kh, sh, dh), (w, kw, sw, dw)):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))  # TFLite: the odd pixel after
        (t, b), (left, r) = pads
        return t, left, b, r

    def source(self, i: int, pad_ok: bool = False) -> tuple[_Q, bool]:
        """The int8 tensor a layer reads, and whether the layer computes in float (it reads it dequantized)."""
        v = self.value(i)
        if isinstance(v, _Float) and len(v.terms) == 1 and v.keep is None and v.activation == self.act.NONE:
            return v.terms[0], True
        return self.int8(i, pad_ok), False

    def weights(self, i: int, in_float: bool) -> np.ndarray:
        if in_float and self.tensor(i).Type() != self.tt.FLOAT32:
            raise self.fail("computes in float with quantized weights (dynamic-range quantization): quantize "
                            "its input and output too")
        if self.tensor(i).Type() != self.tt.UINT8:
            return self.data(i, np.float32 if in_float else np.int8)
        # uint8 weights (TFLite's older asymmetric scheme): less their zero point, as int8 when they fit
        q = self.tensor(i).Quantization()
        zp, axis = q.ZeroPointAsNumpy().astype(np.int64), q.QuantizedDimension()
        w = self.data(i, np.uint8).astype(np.int64)
        w -= zp.reshape([-1 if d == axis else 1 for d in range(w.ndim)]) if zp.size > 1 else zp[0]
        if w.min() < -128 or w.max() > 127:
            raise self.fail(f"has uint8 weights that do not fit int8 less their zero point ({w.min()}..{w.max()})")
        return w.astype(np.int8)

    def _conv_2d(self, op, ins, out, depthwise: bool = False) -> None:
        x, in_float = self.source(ins[0], pad_ok=True)
        if x.perm != NHWC:
            raise self.fail("reads a tensor that is not channels-last")
        table = "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions"
        opts = self.options(op, table)
        w = self.weights(ins[1], in_float)  # OHWI, or 1HW(C*M) depthwise
        _, c, h, wd = x.shape
        if depthwise:
            if w.shape[3] != c:
                raise self.fail(f"has depth multiplier {w.shape[3] // c}: only 1 is supported")
            weight = np.ascontiguousarray(w[0].transpose(2, 0, 1)[:, None])  # (C, 1, KH, KW)
        else:
            if w.shape[3] != c:
                raise self.fail(f"is a grouped convolution ({c} input channels, filters over {w.shape[3]}); "
                                "only groups 1 and depthwise are supported")
            weight = np.ascontiguousarray(w.transpose(0, 3, 1, 2))
        o, _, kh, kw = weight.shape
        stride = (int(opts.StrideH()), int(opts.StrideW()))
        dilation = (int(opts.DilationHFactor()), int(opts.DilationWFactor()))
        pad = self.padding(opts, h, wd, kh, kw, *stride, *dilation)
        if x.pad is not None:
            if x.pad_value != x.zero_point:
                raise self.fail(f"follows a PAD with value {x.pad_value}, not the zero point {x.zero_point}")
            pad = tuple(a + b for a, b in zip(pad, x.pad))
        oh = (h + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (wd + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        (self.float_layer if in_float else self.layer)(
            ins, out, x, weight, 3 if depthwise else 0, (1, o, oh, ow), opts.FusedActivationFunction(),
            stride=stride, padding=pad, dilation=dilation, groups=c if depthwise else 1)

    def _depthwise_conv_2d(self, op, ins, out) -> None:
        self._conv_2d(op, ins, out, depthwise=True)

    def _fully_connected(self, op, ins, out) -> None:
        x, in_float = self.source(ins[0])
        if len(x.shape) == 4:  # FULLY_CONNECTED flattens its input itself
            x = self.flatten(x, out)
        opts = self.options(op, "FullyConnectedOptions")
        if opts.WeightsFormat() != 0:
            raise self.fail("has shuffled weights: only the default weight format is supported")
        w = self.weights(ins[1], in_float)
        if w.ndim != 2 or w.shape[1] != x.shape[1]:
            raise self.fail(f"has weights of shape {list(w.shape)} for {x.shape[1]} features")
        weight = w
        if x.order is not None:  # the features arrive channels-last: the program's column order[k] is w's k
            weight = np.empty_like(w)
            weight[:, x.order] = w
            x = _Q(x.name, x.shape, x.scale, x.zero_point, x.perm)
        (self.float_layer if in_float else self.layer)(
            ins, out, x, np.ascontiguousarray(weight), 0, (x.shape[0], w.shape[0]), opts.FusedActivationFunction(),
            stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)

    def float_layer(self, ins, out, x: _Q, weight: np.ndarray, axis: int, shape, act: int, **geometry) -> None:
        if x.pad is not None:
            raise self.fail("computes in float after an int8 PAD")
        bias = np.zeros(weight.shape[0], np.float32)
        if len(ins) > 2 and ins[2] >= 0:
            bias = self.weights(ins[2], True).reshape(-1).copy()
        self.values[out] = _FloatLayer(x.name, dict(weight=weight, bias=bias, input_scale=x.scale,
                                                    input_zero_point=x.zero_point, **geometry),
                                       tuple(shape), act, self.node)

    def layer(self, ins, out, x: _Q, weight: np.ndarray, axis: int, shape, act: int, **geometry) -> None:
        o = weight.shape[0]
        w_scale, w_zp = self.grid(ins[1])
        if np.any(w_zp != 0) and self.tensor(ins[1]).Type() != self.tt.UINT8:  # uint8: zero point taken off
            raise self.fail("has asymmetric weights (zero point not 0): only symmetric int8 weights are supported")
        if w_scale.size not in (1, o) or (w_scale.size > 1 and self.tensor(ins[1]).Quantization()
                                          .QuantizedDimension() != axis):
            raise self.fail("has weight scales along an axis other than the output channels")
        w_scale = np.broadcast_to(w_scale, (o,))
        bias = np.zeros(o, np.int32)
        if len(ins) > 2 and ins[2] >= 0:
            if self.tensor(ins[2]).Type() != self.tt.INT32:
                raise self.fail("has a bias that is not int32")
            bias = self.data(ins[2], np.int32).reshape(o).copy()
        scale, zp = self.act_grid(out)
        # as TFLite: double(input_scale) * double(filter_scale) / double(output_scale), from the float32 scales
        real = np.float64(np.float32(x.scale)) * w_scale.astype(np.float32).astype(np.float64) / np.float64(
            np.float32(scale))
        mult, shift = quantize_multiplier(real)
        lo, hi = self.clamp(act, scale, zp)
        name = self.emit("conv", [x.name], out, weight=weight, bias=bias, multiplier=mult, shift=shift,
                         input_zero_point=x.zero_point, output_zero_point=zp, act_min=lo, act_max=hi, **geometry)
        self.values[out] = _Q(name, tuple(shape), scale, zp, NHWC if len(shape) == 4 else (0, 1))

    # ------------------------------------------------------------ elementwise

    def _add(self, op, ins, out) -> None:
        act = self.options(op, "AddOptions").FusedActivationFunction()
        values = [self.value(i) for i in ins]
        if all(isinstance(v, _Float) for v in values):  # float: lowered at its QUANTIZE
            if any(v.activation != self.act.NONE or v.keep is not None for v in values):
                raise self.fail("adds a float tensor that was clamped or averaged; quantize it first")
            self.values[out] = _Float([q for v in values for q in v.terms], act, self.node)
            return
        a, b = self.int8(ins[0]), self.int8(ins[1])
        scale, zp = self.act_grid(out)
        self.add([a, b], out, scale, zp, act)

    def add(self, terms: list[_Q], out: int, scale: float, zp: int, act: int) -> None:
        a = terms[0]
        if any(t.shape != a.shape or t.perm != a.perm or t.pad is not None for t in terms):
            raise self.fail(f"adds {' and '.join(str(list(t.shape)) for t in terms)}: only same-shape adds are "
                            "supported")
        mults, shift = sum_multipliers([t.scale for t in terms], scale)
        lo, hi = self.clamp(act, scale, zp)
        name = self.emit("add", [t.name for t in terms], out, multipliers=mults, shift=shift,
                         input_zero_points=tuple(t.zero_point for t in terms), output_zero_point=zp, act_min=lo,
                         act_max=hi)
        self.values[out] = _Q(name, a.shape, scale, zp, a.perm)

    def requant(self, x: _Q, out: int, lo: int = QMIN, hi: int = QMAX) -> None:
        scale, zp = self.act_grid(out)
        if (scale, zp, lo, hi) == (x.scale, x.zero_point, QMIN, QMAX):
            self.values[out] = x
            return
        m, s = quantize_multiplier(np.array([x.scale / scale]))
        name = self.emit("requant", [x.name], out, multiplier=int(m[0]), shift=int(s[0]),
                         input_zero_point=x.zero_point, output_zero_point=zp, act_min=lo, act_max=hi)
        self.values[out] = _Q(name, x.shape, scale, zp, x.perm, order=x.order)

    def _quantize(self, op, ins, out) -> None:
        v = self.value(ins[0])
        scale, zp = self.act_grid(out)
        if isinstance(v, _Input):
            shape = self.input_shape
            name = self.emit("quantize", [self.prog_input], out, scale=scale, zero_point=zp)
            self.values[out] = _Q(name, shape, scale, zp, v.perm)
        elif isinstance(v, _FloatLayer):
            self.node = v.node
            lo, hi = self.clamp(v.activation, scale, zp)
            name = self.emit("fconv", [v.input], out, **v.params, output_scale=scale, output_zero_point=zp,
                             act_min=lo, act_max=hi)
            self.values[out] = _Q(name, v.shape, scale, zp, NHWC if len(v.shape) == 4 else (0, 1))
        elif isinstance(v, _Float) and v.keep is not None:
            self.values[out] = self.mean(v.terms, out, v.keep, (scale, zp))
        elif isinstance(v, _Float) and len(v.terms) > 1:
            self.node = v.node
            self.add(v.terms, out, scale, zp, v.activation)
        else:
            self.requant(v.terms[0] if isinstance(v, _Float) else self.int8(ins[0]), out)

    def _dequantize(self, op, ins, out) -> None:
        self.values[out] = _Float([self.int8(ins[0])])

    def _relu(self, op, ins, out) -> None:
        scale, zp = self.act_grid(out)
        self.requant(self.int8(ins[0]), out, *self.clamp(self.act.RELU, scale, zp))

    def _relu6(self, op, ins, out) -> None:
        scale, zp = self.act_grid(out)
        self.requant(self.int8(ins[0]), out, *self.clamp(self.act.RELU6, scale, zp))

    # ------------------------------------------------------------ pooling and means

    def _mean(self, op, ins, out) -> None:
        v = self.value(ins[0])
        keep = bool(self.options(op, "ReducerOptions").KeepDims())
        x = v.terms[0] if isinstance(v, _Float) else self.int8(ins[0])
        axes = {x.perm[int(a) % 4] for a in self.data(ins[1], np.int32).reshape(-1)} if len(x.shape) == 4 else set()
        if axes != {2, 3}:
            raise self.fail("averages over axes other than height and width")
        if isinstance(v, _Float):  # a float mean, of a float sum maybe: lowered at its QUANTIZE, in one rounding
            if v.activation != self.act.NONE or v.keep is not None:
                raise self.fail("averages a float tensor that was clamped or averaged; quantize it first")
            self.values[out] = _Float(v.terms, keep=keep)
        else:
            self.values[out] = self.mean([x], out, keep, self.act_grid(out))

    def mean(self, terms: list[_Q], out: int, keep: bool, grid: tuple[float, int]) -> _Q:
        """The mean over H, W of one int8 tensor, or of the sum of several (one rounding), on `grid`."""
        x = terms[0]
        n, c, h, w = x.shape
        scale, zp = grid
        if any(t.shape != x.shape or t.perm != x.perm for t in terms):
            raise self.fail("averages a sum of tensors of different shapes")
        if len(terms) == 1:
            m, s = quantize_multiplier(np.array([x.scale / (scale * h * w)]))
            name = self.emit("mean", [x.name], out, multiplier=int(m[0]), shift=int(s[0]),
                             input_zero_point=x.zero_point, output_zero_point=zp)
        else:
            mults, shift = sum_multipliers([t.scale / (h * w) for t in terms], scale)
            name = self.emit("mean", [t.name for t in terms], out, multipliers=mults, shift=shift,
                             input_zero_points=tuple(t.zero_point for t in terms), output_zero_point=zp)
        q = _Q(name, (n, c, 1, 1), scale, zp, x.perm)
        return q if keep else self.flatten(q, out)

    def _average_pool_2d(self, op, ins, out) -> None:
        x = self.int8(ins[0])
        opts = self.options(op, "Pool2DOptions")
        _, _, h, w = x.shape
        if x.perm != NHWC or (opts.FilterHeight(), opts.FilterWidth()) != (h, w) or \
                any(self.padding(opts, h, w, h, w, opts.StrideH(), opts.StrideW())):
            raise self.fail("is not a global average: only pooling over the whole map is supported")
        if opts.FusedActivationFunction() != self.act.NONE:
            raise self.fail("has a fused activation, which average pooling does not take here")
        self.values[out] = self.mean([x], out, True, self.act_grid(out))

    def _max_pool_2d(self, op, ins, out) -> None:
        x = self.int8(ins[0], pad_ok=True)
        opts = self.options(op, "Pool2DOptions")
        _, _, h, w = x.shape
        if x.perm != NHWC:
            raise self.fail("reads a tensor that is not channels-last")
        kernel, stride = (opts.FilterHeight(), opts.FilterWidth()), (opts.StrideH(), opts.StrideW())
        pad = self.padding(opts, h, w, *kernel, *stride)
        if x.pad is not None:  # a max over a PAD: only one that pads with the lowest value adds nothing
            if x.pad_value != QMIN or any(pad):
                raise self.fail(f"follows a PAD with value {x.pad_value}: max pooling takes a PAD only of -128")
            pad = x.pad
        oh = (h + pad[0] + pad[2] - kernel[0]) // stride[0] + 1
        ow = (w + pad[1] + pad[3] - kernel[1]) // stride[1] + 1
        name = self.emit("maxpool", [x.name], out, kernel=kernel, stride=stride, padding=pad)
        q = _Q(name, (x.shape[0], x.shape[1], oh, ow), x.scale, x.zero_point, NHWC)
        scale, zp = self.act_grid(out)
        lo, hi = self.clamp(opts.FusedActivationFunction(), scale, zp)
        if (scale, zp, lo, hi) != (x.scale, x.zero_point, QMIN, QMAX):
            self.requant(q, out, lo, hi)
        else:
            self.values[out] = q

    def _pad(self, op, ins, out) -> None:
        x = self.int8(ins[0])
        pads = self.data(ins[1], np.int32 if self.tensor(ins[1]).Type() == self.tt.INT32 else np.int64)
        if len(x.shape) != 4 or pads.shape != (4, 2):
            raise self.fail("pads a tensor that is not 4-D")
        prog = np.zeros((4, 2), np.int64)
        for k in range(4):
            prog[x.perm[k]] = pads[k]
        if prog[0].any() or prog[1].any():
            raise self.fail("pads the batch or channels: only height and width are supported")
        scale, zp = self.act_grid(out)
        if (scale, zp) != (x.scale, x.zero_point):
            raise self.fail("changes the grid, which TFLite's PAD does not")
        value = zp
        if self.op_name == "PADV2" and len(ins) > 2 and ins[2] >= 0:
            u8 = self.tensor(ins[2]).Type() == self.tt.UINT8
            value = int(self.data(ins[2], np.uint8 if u8 else np.int8).reshape(-1)[0]) - (128 if u8 else 0)
        pad = (int(prog[2, 0]), int(prog[3, 0]), int(prog[2, 1]), int(prog[3, 1]))
        # the consumer reads the unpadded tensor, with this padding added to its own
        self.values[out] = _Q(x.name, x.shape, x.scale, x.zero_point, x.perm, pad, value)

    def _padv2(self, op, ins, out) -> None:
        self._pad(op, ins, out)

    # ------------------------------------------------------------ layout

    def _transpose(self, op, ins, out) -> None:
        v = self.value(ins[0])
        tp = tuple(int(d) for d in self.data(ins[1], np.int32).reshape(-1))
        if isinstance(v, _Input):
            self.values[out] = _Input(tuple(v.perm[d] for d in tp))
        elif isinstance(v, _Float) and v.keep is None:  # float islands transpose their terms, at no cost either
            self.values[out] = _Float([self.transposed(q, tp) for q in v.terms], v.activation, v.node)
        else:
            self.values[out] = self.transposed(self.int8(ins[0]), tp)

    def transposed(self, x: _Q, tp: tuple[int, ...]) -> _Q:
        if len(x.shape) != 4 or len(tp) != 4 or x.pad is not None:
            raise self.fail("transposes a tensor that is not a 4-D map")
        return _Q(x.name, x.shape, x.scale, x.zero_point, tuple(x.perm[d] for d in tp))

    def _reshape(self, op, ins, out) -> None:
        x = self.int8(ins[0])
        before, after = self.shape(ins[0]), self.shape(out)
        if before == after:
            self.values[out] = x
        elif len(after) == 2 and len(x.shape) == 4 and after[0] == x.shape[0]:
            self.values[out] = self.flatten(x, out)
        else:
            raise self.fail(f"reshapes {list(before)} to {list(after)}: only flattening to [batch, features] "
                            "is supported")

    def _squeeze(self, op, ins, out) -> None:
        self._reshape(op, ins, out)

    def flatten(self, x: _Q, out: int) -> _Q:
        """[N, C, H, W] -> [N, C*H*W] in the program (PyTorch's order); the TFLite tensor's order is kept in
        `order` when it differs (a channels-last map with more than one pixel)."""
        n, c, h, w = x.shape
        feats = np.arange(c * h * w).reshape(c, h, w).transpose([d - 1 for d in x.perm[1:]]).reshape(-1)
        name = self.emit("flatten", [x.name], out)
        order = None if np.array_equal(feats, np.arange(feats.size)) else feats
        return _Q(name, (n, c * h * w), x.scale, x.zero_point, (0, 1), order=order)


def lower(path: Path, model, sub) -> tuple[IntegerProgram, TensorSpec, tuple[int, ...], tuple[int, ...]]:
    """(the program, the compiled model's input as the file has it, the input's perm, the output's perm) for a
    quantized .tflite graph. The program's input is NCHW float; TFLite input = program input transposed by the
    input perm, likewise the output."""
    lowering = _Lowering(path, model, sub)
    prog, spec, out_perm = lowering.run()
    return prog, spec, lowering.in_perm, out_perm


def wrap_layouts(mod, spec: TensorSpec, in_perm: tuple[int, ...], out_perm: tuple[int, ...]):
    """The program's Relax module (NCHW float in and out) behind a main that takes and returns the file's layouts:
    the transposes are injective ops that fuse into the quantize and dequantize kernels."""
    import tvm
    from tvm import relax

    if tuple(in_perm) in (_IDENTITY, (0, 1)) and tuple(out_perm) in (_IDENTITY, (0, 1)):
        return mod
    inner = mod["main"].without_attr("global_symbol")  # private: inlined into the new main below
    rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}, attrs=mod.attrs)
    bb = relax.BlockBuilder(rest)
    gv = bb.add_func(inner, "program")
    x = relax.Var(spec.name, relax.TensorType(spec.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = x
            if tuple(in_perm) not in (_IDENTITY, (0, 1)):
                t = bb.emit(relax.op.permute_dims(x, list(_inverse(in_perm))))
            y = bb.emit(relax.Call(gv, [t]))
            if tuple(out_perm) not in (_IDENTITY, (0, 1)):
                y = bb.emit(relax.op.permute_dims(y, list(out_perm)))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    mod = relax.transform.InlinePrivateFunctions()(bb.get())
    return relax.transform.DeadCodeElimination(["main"])(mod)
