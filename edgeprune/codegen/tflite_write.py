"""A one-subgraph .tflite flatbuffer, written with the builders of the ``tflite`` schema package (no TensorFlow):
the int8 export (tflite_export.py) and the tests' model builder (tests/tflite_builder.py) share it.

Tensors are float32, int8 or int32, constant (with data) or not, with an optional quantization grid (per-tensor or
per-channel scales, zero points, the quantized dimension); operators are builtins (or custom) with their options
table given by name and fields.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def schema(name: str):
    """The generated module tflite.<name> (the package's __init__ rebinds tflite.<name> to the class)."""
    return importlib.import_module(f"tflite.{name}")


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    data: np.ndarray | None  # None for activations
    dtype: str = "float32"
    grid: tuple[np.ndarray, np.ndarray, int] | None = None  # (scales, zero points, quantized dimension)


@dataclass
class Op:
    code: tuple[int, str]  # (builtin code, custom code)
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict] | None  # (options table name, fields)


@dataclass
class Graph:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    description: str = "edgeprune"

    def tensor(self, name: str, shape, data=None, dtype: str = "float32", grid=None) -> int:
        self.tensors.append(Tensor(name, tuple(int(d) for d in shape), data, dtype, grid))
        return len(self.tensors) - 1

    def op(self, builtin: str, inputs: list[int], outputs: list[int], options=None, custom: str = "") -> None:
        code = getattr(schema("BuiltinOperator").BuiltinOperator, builtin)
        self.ops.append(Op((code, custom), inputs, outputs, options))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(serialize(self))
        return path


def per_tensor(scale: float, zero_point: int):
    return np.array([scale], np.float32), np.array([zero_point], np.int64), 0


def _versions() -> dict[int, int]:
    """int8 kernels' operator versions, as TFLite's converter writes them (any builtin not here: 1)."""
    ops = schema("BuiltinOperator").BuiltinOperator
    return {ops.CONV_2D: 3, ops.DEPTHWISE_CONV_2D: 3, ops.FULLY_CONNECTED: 4, ops.ADD: 2, ops.MEAN: 2,
            ops.MAX_POOL_2D: 2, ops.AVERAGE_POOL_2D: 2, ops.PAD: 2, ops.PADV2: 2, ops.TRANSPOSE: 2,
            ops.QUANTIZE: 2, ops.DEQUANTIZE: 2, ops.RELU: 2, ops.RELU6: 2, ops.RESHAPE: 1}


def serialize(g: Graph) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1024)
    Buffer, T, Operator = schema("Buffer"), schema("Tensor"), schema("Operator")
    OperatorCode, SubGraph, Model, Q = (schema(n) for n in ("OperatorCode", "SubGraph", "Model",
                                                           "QuantizationParameters"))
    versions = _versions()

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
    for data in [None] + [t.data for t in g.tensors if t.data is not None]:
        vec = None
        if data is not None:
            b.Prep(16, data.nbytes)  # 16-byte aligned constants, as the TFLite converter writes them
            vec = b.CreateNumpyVector(np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8))
        Buffer.BufferStart(b)
        if vec is not None:
            Buffer.BufferAddData(b, vec)
        buffers.append(Buffer.BufferEnd(b))
    k = 1
    for ti, t in enumerate(g.tensors):
        if t.data is not None:
            buffer_of[ti], k = k, k + 1

    tensors = []
    for ti, t in enumerate(g.tensors):
        name = b.CreateString(t.name)
        shape = int_vector(T.TensorStartShapeVector, list(t.shape))
        quant = None
        if t.grid is not None:
            scales, zps, axis = t.grid
            sv = b.CreateNumpyVector(np.asarray(scales, np.float32))
            zv = b.CreateNumpyVector(np.asarray(zps, np.int64))
            Q.QuantizationParametersStart(b)
            Q.QuantizationParametersAddScale(b, sv)
            Q.QuantizationParametersAddZeroPoint(b, zv)
            Q.QuantizationParametersAddQuantizedDimension(b, axis)
            quant = Q.QuantizationParametersEnd(b)
        T.TensorStart(b)
        T.TensorAddShape(b, shape)
        T.TensorAddType(b, getattr(schema("TensorType").TensorType, t.dtype.upper()))
        T.TensorAddBuffer(b, buffer_of.get(ti, 0))
        T.TensorAddName(b, name)
        if quant is not None:
            T.TensorAddQuantization(b, quant)
        tensors.append(T.TensorEnd(b))

    codes = sorted({op.code for op in g.ops})
    code_offsets = []
    for builtin, custom in codes:
        cc = b.CreateString(custom) if custom else None
        OperatorCode.OperatorCodeStart(b)
        OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, min(builtin, 127))
        OperatorCode.OperatorCodeAddBuiltinCode(b, builtin)
        OperatorCode.OperatorCodeAddVersion(b, versions.get(builtin, 1))
        if cc is not None:
            OperatorCode.OperatorCodeAddCustomCode(b, cc)
        code_offsets.append(OperatorCode.OperatorCodeEnd(b))

    ops = []
    for op in g.ops:
        ins = int_vector(Operator.OperatorStartInputsVector, op.inputs)
        outs = int_vector(Operator.OperatorStartOutputsVector, op.outputs)
        opt_offset, opt_type = None, 0
        if op.options is not None:
            table, fields = op.options
            mod = schema(table)
            getattr(mod, f"{table}Start")(b)
            for fname, v in fields.items():
                getattr(mod, f"{table}Add{fname}")(b, v)
            opt_offset = getattr(mod, f"{table}End")(b)
            opt_type = getattr(schema("BuiltinOptions").BuiltinOptions, table)
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
    in_vec = int_vector(SubGraph.SubGraphStartInputsVector, g.inputs)
    out_vec = int_vector(SubGraph.SubGraphStartOutputsVector, g.outputs)
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
    desc = b.CreateString(g.description)
    Model.ModelStart(b)
    Model.ModelAddVersion(b, 3)
    Model.ModelAddOperatorCodes(b, codes_vec)
    Model.ModelAddSubgraphs(b, subgraphs_vec)
    Model.ModelAddDescription(b, desc)
    Model.ModelAddBuffers(b, buffers_vec)
    b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())
