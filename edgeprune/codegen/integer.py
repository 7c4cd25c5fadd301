"""An integer program (edgeprune.artifacts.IntegerProgram, written by compress/integer.py) as a Relax module.

Tensors are channels-last from the input's quantization to the output's dequantization. Convolutions and dense
layers become calls of the int8 family's kernels (kernels/int8.py), made for this target (VNNI or widening
multiply-adds) with their weights packed as those kernels read them; a layer the program keeps in fp32 ("fconv")
is Relax's own float convolution between a dequantization and a quantization, compiled by the dense family. Adds,
means, standalone ReLUs, max pooling and the two conversions are Relax's own integer and float ops, which lowering
fuses and schedules like any other elementwise kernel; their arithmetic is exactly the program's (int64 products,
one rounding shift).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax

from ..artifacts import IntegerOp, IntegerProgram, TensorSpec
from ..errors import UserError
from ..fixedpoint import requant_scale
from .kernels import int8
from .kernels.common import OP, CpuSpec


def _const(v, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v, dtype=dtype), dtype)


class _Builder:
    def __init__(self, prog: IntegerProgram, target, threads: int) -> None:
        self.prog, self.target, self.threads = prog, target, threads
        self.bb = relax.BlockBuilder()
        self.env: dict[str, relax.Expr] = {}
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.spec = CpuSpec.of(target)
        self.layers: list[tuple[str, str, int | None]] = []  # (group, name, channels), as sources.name_rows takes

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.env[name].ty.shape.values)

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def build(self) -> tvm.IRModule:
        x = relax.Var(self.prog.input, relax.TensorType(self.prog.input_shape, "float32"))
        self.env[self.prog.input] = x
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                for op in self.prog.ops:
                    lower = getattr(self, f"_{op.kind}", None)
                    if lower is None:
                        raise UserError(f"the integer program has an op of kind '{op.kind}' this version cannot "
                                        "compile; make it with the same edgeprune version")
                    self.env[op.output] = lower(op, *[self.env[i] for i in op.inputs])
                out = self.bb.emit_output(self.env[self.prog.output])
            self.bb.emit_func_output(out)
        return self.bb.get()

    # ------------------------------------------------------------ conversions

    @staticmethod
    def _to_grid(y, scale: float, zero_point: int, lo: int = -128, hi: int = 127) -> relax.Expr:
        """float -> int8: clamp(round_half_even(y / scale) + zero_point, lo, hi)."""
        q = relax.op.add(relax.op.round(relax.op.divide(y, _const(scale, "float32"))), _const(zero_point, "float32"))
        return relax.op.astype(relax.op.clip(q, int(lo), int(hi)), "int8")

    @staticmethod
    def _from_grid(x, scale: float, zero_point: int) -> relax.Expr:
        """int8 -> float: (x - zero_point) * scale."""
        return relax.op.multiply(relax.op.subtract(relax.op.astype(x, "float32"), _const(zero_point, "float32")),
                                 _const(scale, "float32"))

    def _quantize(self, op: IntegerOp, x) -> relax.Expr:
        if len(x.ty.shape) == 4:
            x = self.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        return self.emit(self._to_grid(x, op.params["scale"], op.params["zero_point"]))

    def _dequantize(self, op: IntegerOp, x) -> relax.Expr:
        f = self._from_grid(x, op.params["scale"], op.params["zero_point"])
        if len(x.ty.shape) == 4:
            f = relax.op.permute_dims(f, [0, 3, 1, 2])
        return self.emit(f)

    # ------------------------------------------------------------ layers

    def _conv(self, op: IntegerOp, x) -> relax.Expr:
        p = op.params
        w = np.asarray(p["weight"])
        dense = w.ndim == 2
        shape = self.shape(op.inputs[0])
        if shape[0] != 1:
            raise UserError(f"int8 builds take a batch of 1; the input has {shape[0]}")
        if dense:
            x = self.emit(relax.op.reshape(x, (1, 1, 1, shape[1])))
            h = wd = 1
            c, kh, kw, groups = shape[1], 1, 1, 1
        else:
            _, h, wd, c = shape
            kh, kw = w.shape[2:]
            groups = int(p["groups"])
        o = w.shape[0]
        depthwise = groups > 1
        if depthwise and not (groups == c == o):
            raise UserError(f"int8 layer '{op.name}': grouped convolutions other than depthwise are not built yet "
                            "(keep it in fp32)")
        conv = int8.Conv(h, wd, c, o, kh, kw, tuple(p.get("stride", (1, 1))), tuple(p.get("padding", (0, 0))),
                         tuple(p.get("dilation", (1, 1))), depthwise, int(p["input_zero_point"]),
                         int(p["output_zero_point"]), int(p["act_min"]), int(p["act_max"]))
        variant = int8.variant_for(conv, self.target)
        wp, bias = int8.pack(conv, w, np.asarray(p["bias"]), variant)
        width = bias.shape[0]
        scale = np.pad(requant_scale(p["multiplier"], p["shift"]), (0, width - o))
        key = (conv, variant, dense)  # layers of one shape share a kernel (firmware flash)
        if key not in self.kernels:
            func = int8.kernel(conv, variant, self.spec, self.threads)
            if dense:
                func = func.with_attr(OP, "matmul")
            name = "int8_" + ("dense" if dense else conv.op) + f"_{len(self.kernels)}"
            self.kernels[key] = self.bb.add_func(func, name)
        self.layers.append(("matmul" if dense else "conv", op.name, o))
        oh, ow = conv.out_hw
        out = self.emit(relax.call_tir(self.kernels[key], [x, relax.const(wp), relax.const(bias), relax.const(scale)],
                                       relax.TensorType((1, oh, ow, o), "int8")))
        return self.emit(relax.op.reshape(out, (1, o))) if dense else out

    def _fconv(self, op: IntegerOp, x) -> relax.Expr:
        """A layer kept in fp32 inside an int8 program: its input dequantized, the float convolution or dense layer
        (the dense family's kernels), its output quantized to its grid with the activation's clamp."""
        p = op.params
        w = np.asarray(p["weight"], np.float32)
        self.layers.append(("matmul" if w.ndim == 2 else "conv", op.name, w.shape[0]))
        xf = self._from_grid(x, p["input_scale"], p["input_zero_point"])
        if w.ndim == 2:
            y = relax.op.matmul(self.emit(xf), relax.const(np.ascontiguousarray(w.T)))
        else:
            pad = tuple(p["padding"])
            pad = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])  # (top, left, bottom, right)
            y = relax.op.nn.conv2d(self.emit(xf), relax.const(np.ascontiguousarray(w.transpose(2, 3, 1, 0))),
                                   strides=tuple(p["stride"]), padding=pad, dilation=tuple(p["dilation"]),
                                   groups=int(p["groups"]), data_layout="NHWC", kernel_layout="HWIO")
        y = relax.op.add(self.emit(y), relax.const(np.asarray(p["bias"], np.float32)))
        return self.emit(self._to_grid(y, p["output_scale"], p["output_zero_point"], p["act_min"], p["act_max"]))

    # ------------------------------------------------------------ integer elementwise and pooling

    @staticmethod
    def _round_shift(acc, shift: int, zero_point: int, lo: int, hi: int) -> relax.Expr:
        """clamp(zero_point + ((acc + 2**(shift-1)) >> shift)) as int8, on an int64 `acc`."""
        r = relax.op.right_shift(relax.op.add(acc, _const(1 << (shift - 1), "int64")), _const(shift, "int64"))
        r = relax.op.clip(relax.op.add(r, _const(zero_point, "int64")), lo, hi)
        return relax.op.astype(r, "int8")

    @staticmethod
    def _centred(x, zero_point: int) -> relax.Expr:
        return relax.op.subtract(relax.op.astype(x, "int64"), _const(zero_point, "int64"))

    def _add(self, op: IntegerOp, *xs) -> relax.Expr:
        p = op.params  # two inputs, or more (a .tflite's residual chain left in float: one rounding, as its sum)
        terms = [relax.op.multiply(self._centred(x, z), _const(m, "int64"))
                 for x, m, z in zip(xs, p["multipliers"], p["input_zero_points"])]
        acc = terms[0]
        for t in terms[1:]:
            acc = relax.op.add(acc, t)
        return self.emit(self._round_shift(acc, p["shift"], p["output_zero_point"], p["act_min"], p["act_max"]))

    def _requant(self, op: IntegerOp, x) -> relax.Expr:
        p = op.params
        acc = relax.op.multiply(self._centred(x, p["input_zero_point"]), _const(p["multiplier"], "int64"))
        return self.emit(self._round_shift(acc, p["shift"], p["output_zero_point"], p.get("act_min", -128),
                                           p.get("act_max", 127)))

    def _mean(self, op: IntegerOp, *xs) -> relax.Expr:
        p = op.params  # one input, or the sum of several (multipliers, input_zero_points: a .tflite's float mean)
        acc = None
        for x, m, z in zip(xs, p.get("multipliers", [p.get("multiplier")]),
                           p.get("input_zero_points", [p.get("input_zero_point")])):
            total = self.emit(relax.op.sum(self._centred(x, z), axis=[1, 2], keepdims=True))
            term = relax.op.multiply(total, _const(m, "int64"))
            acc = term if acc is None else relax.op.add(acc, term)
        return self.emit(self._round_shift(acc, p["shift"], p["output_zero_point"], -128, 127))

    def _maxpool(self, op: IntegerOp, x) -> relax.Expr:
        p = op.params
        pad = tuple(p["padding"])
        pad = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])  # (top, left, bottom, right)
        return self.emit(relax.op.nn.max_pool2d(x, p["kernel"], p["stride"], pad, layout="NHWC"))

    def _flatten(self, op: IntegerOp, x) -> relax.Expr:
        shape = self.shape(op.inputs[0])
        if len(shape) == 2:
            return x
        n, h, w, c = shape
        if h * w > 1:  # PyTorch flattens channels-first
            x = self.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
        return self.emit(relax.op.reshape(x, (n, h * w * c)))


def import_program(prog: IntegerProgram, target, threads: int = 2) -> tuple[tvm.IRModule, TensorSpec, str, list]:
    """(Relax module, its input, a digest of the program, its layers for sources.name_rows) for `prog` compiled
    for TVM target `target`."""
    builder = _Builder(prog, target, threads)
    mod = builder.build()
    h = hashlib.sha256()
    for op in prog.ops:
        scalars = sorted((k, str(v)) for k, v in op.params.items() if k != "weight")
        h.update(f"{op.kind}:{op.inputs}:{op.output}:{scalars}".encode())
        if "weight" in op.params:
            h.update(np.ascontiguousarray(op.params["weight"]).tobytes())
    return mod, TensorSpec(prog.input, tuple(prog.input_shape), "float32"), h.hexdigest(), builder.layers
