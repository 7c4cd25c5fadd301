"""Write small float32 .tflite files without TensorFlow, from the flatbuffer builders of the ``tflite`` package.

Only what the tests need: constant tensors, CONV_2D, DEPTHWISE_CONV_2D, ADD, MUL, RELU, and a custom operator (to
check the unsupported-operator error). Layouts follow TFLite: activations NHWC, conv filters OHWI, depthwise
filters 1HWC.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np


def _m(name: str):
    """The generated module tflite.<name> (the package's __init__ rebinds tflite.<name> to the class)."""
    return importlib.import_module(f"tflite.{name}")


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    data: np.ndarray | None  # None for activations


@dataclass
class _Op:
    code: tuple[int, str]  # (builtin code, custom code)
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict] | None  # (options table name, fields)


@dataclass
class TFLiteGraph:
    """Build a one-subgraph float32 TFLite model op by op; ``save`` writes the flatbuffer."""

    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def input(self, name: str, shape: tuple[int, ...]) -> int:
        self.inputs.append(self._tensor(name, shape, None))
        return self.inputs[-1]

    def const(self, name: str, value: np.ndarray) -> int:
        value = np.ascontiguousarray(value, dtype=np.float32)
        return self._tensor(name, value.shape, value)

    def _tensor(self, name: str, shape, data) -> int:
        self.tensors.append(_Tensor(name, tuple(int(d) for d in shape), data))
        return len(self.tensors) - 1

    def _op(self, builtin: str, inputs: list[int], out_name: str, out_shape, options=None, custom: str = "") -> int:
        code = getattr(_m("BuiltinOperator").BuiltinOperator, builtin)
        out = self._tensor(out_name, out_shape, None)
        self.ops.append(_Op((code, custom), inputs, [out], options))
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

    def output(self, t: int) -> None:
        self.outputs.append(t)

    # ------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        b = flatbuffers.Builder(1024)
        Buffer, Tensor, Operator = _m("Buffer"), _m("Tensor"), _m("Operator")
        OperatorCode, SubGraph, Model = _m("OperatorCode"), _m("SubGraph"), _m("Model")

        def int_vector(start, values):
            start(b, len(values))
            for v in reversed(values):
                b.PrependInt32(int(v))
            return b.EndVector()

        def table_vector(start, offsets):
            start(b, len(offsets))
            for o in reversed(offsets):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        # Buffer 0 is the empty sentinel; every constant gets its own buffer.
        buffers, buffer_of = [], {}
        datas = [None] + [t.data for t in self.tensors if t.data is not None]
        for data in datas:
            vec = None
            if data is not None:
                b.Prep(16, data.nbytes)  # 16-byte aligned constants, as the TFLite converter writes them
                vec = b.CreateNumpyVector(np.frombuffer(data.tobytes(), dtype=np.uint8))
            Buffer.BufferStart(b)
            if vec is not None:
                Buffer.BufferAddData(b, vec)
            buffers.append(Buffer.BufferEnd(b))
        k = 1
        for ti, t in enumerate(self.tensors):
            if t.data is not None:
                buffer_of[ti], k = k, k + 1

        tensors = []
        for ti, t in enumerate(self.tensors):
            name = b.CreateString(t.name)
            shape = int_vector(Tensor.TensorStartShapeVector, list(t.shape))
            Tensor.TensorStart(b)
            Tensor.TensorAddShape(b, shape)
            Tensor.TensorAddType(b, _m("TensorType").TensorType.FLOAT32)
            Tensor.TensorAddBuffer(b, buffer_of.get(ti, 0))
            Tensor.TensorAddName(b, name)
            tensors.append(Tensor.TensorEnd(b))

        codes = sorted({op.code for op in self.ops})
        code_offsets = []
        for builtin, custom in codes:
            cc = b.CreateString(custom) if custom else None
            OperatorCode.OperatorCodeStart(b)
            OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, min(builtin, 127))
            OperatorCode.OperatorCodeAddBuiltinCode(b, builtin)
            OperatorCode.OperatorCodeAddVersion(b, 1)
            if cc is not None:
                OperatorCode.OperatorCodeAddCustomCode(b, cc)
            code_offsets.append(OperatorCode.OperatorCodeEnd(b))

        ops = []
        for op in self.ops:
            ins = int_vector(Operator.OperatorStartInputsVector, op.inputs)
            outs = int_vector(Operator.OperatorStartOutputsVector, op.outputs)
            opt_offset, opt_type = None, 0
            if op.options is not None:
                table, fields = op.options
                mod = _m(table)
                getattr(mod, f"{table}Start")(b)
                for fname, v in fields.items():
                    getattr(mod, f"{table}Add{fname}")(b, v)
                opt_offset = getattr(mod, f"{table}End")(b)
                opt_type = getattr(_m("BuiltinOptions").BuiltinOptions, table)
            Operator.OperatorStart(b)
            Operator.OperatorAddOpcodeIndex(b, codes.index(op.code))
            Operator.OperatorAddInputs(b, ins)
            Operator.OperatorAddOutputs(b, outs)
            if opt_offset is not None:
                Operator.OperatorAddBuiltinOptionsType(b, opt_type)
                Operator.OperatorAddBuiltinOptions(b, opt_offset)
            ops.append(Operator.OperatorEnd(b))

        tensors_vec = table_vector(SubGraph.SubGraphStartTensorsVector, tensors)
        ops_vec = table_vector(SubGraph.SubGraphStartOperatorsVector, ops)
        in_vec = int_vector(SubGraph.SubGraphStartInputsVector, self.inputs)
        out_vec = int_vector(SubGraph.SubGraphStartOutputsVector, self.outputs)
        sg_name = b.CreateString("main")
        SubGraph.SubGraphStart(b)
        SubGraph.SubGraphAddTensors(b, tensors_vec)
        SubGraph.SubGraphAddInputs(b, in_vec)
        SubGraph.SubGraphAddOutputs(b, out_vec)
        SubGraph.SubGraphAddOperators(b, ops_vec)
        SubGraph.SubGraphAddName(b, sg_name)
        subgraph = SubGraph.SubGraphEnd(b)

        subgraphs_vec = table_vector(Model.ModelStartSubgraphsVector, [subgraph])
        codes_vec = table_vector(Model.ModelStartOperatorCodesVector, code_offsets)
        buffers_vec = table_vector(Model.ModelStartBuffersVector, buffers)
        desc = b.CreateString("edgeprune test model")
        Model.ModelStart(b)
        Model.ModelAddVersion(b, 3)
        Model.ModelAddOperatorCodes(b, codes_vec)
        Model.ModelAddSubgraphs(b, subgraphs_vec)
        Model.ModelAddDescription(b, desc)
        Model.ModelAddBuffers(b, buffers_vec)
        b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path
