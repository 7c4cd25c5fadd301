"""Network importers: ONNX, torch.export ``.pt2`` and ``.tflite`` files become a Relax IRModule.

TVM's own frontends do the translation; this module turns their failure modes into one-line UserErrors that name
the file, the operator and the node, and it checks operators before translating so the error names the node. An int8
``.tflite``, which TVM's frontend cannot take, is lowered by tflite_int8.py to an integer program instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import Network, TensorSpec
from ..errors import UserError
from ..native import quiet_native
from .sources import source_layers

FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".tflite": "tflite"}


@dataclass
class ImportedModel:
    """A network as a Relax module plus what a caller must feed it."""

    mod: object  # tvm.IRModule
    inputs: list[TensorSpec]
    source: str
    format: str
    sha256: str
    layers: list = field(default_factory=list)  # the user's named layers, in order (sources.source_layers)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_model(path: str | Path, input_shape: tuple[int, ...] | None = None, target=None) -> ImportedModel:
    """`target` (a Target or its name; default host) matters only for an int8 .tflite, whose integer kernels are
    made for the target's CPU as it is imported."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass a .onnx, .pt2 or .tflite model")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown model format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    if fmt == "tflite":
        mod, inputs, layers = _tflite(path, input_shape, target)
    else:
        mod, inputs, layers = {"onnx": _onnx, "pt2": _pt2}[fmt](path, input_shape)
    return ImportedModel(mod, inputs, str(path), fmt, sha256_of(path), layers)


def import_network(network: Network, onnx_path: str | Path) -> ImportedModel:
    """An in-memory network: its module is written to `onnx_path` (opset 17, one input named ``input``), which
    becomes the build's source (so --debug-layers can rebuild its reference), and imported like any ONNX file.

    The per-layer plan travels beside the module in the Network. Block-sparse ("bsr") layers need nothing more: their
    zeros are in the weights, where compile finds them (kernels/bsr.py). int8 networks compile their integer program
    (codegen/integer.py) and binary ones their export form (codegen/binarized.py), not through here."""
    import warnings

    import torch

    other = sorted({p.scheme for p in network.plan.values()} - {"dense", "bsr"})
    if other:
        raise UserError(f"layers planned as {', '.join(other)} cannot be written as plain ONNX; compile the Network "
                        "itself (compile_model), which lowers int8 and binary layers with their own kernels")
    x = torch.zeros(*network.input_shape)
    onnx_path = Path(onnx_path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network.module.eval(), (x,), str(onnx_path), opset_version=17, dynamo=False,
                          input_names=["input"])
    return import_model(onnx_path)


def _check_shape(shape, name: str, override) -> tuple[int, ...]:
    if override is not None:
        override = tuple(int(d) for d in override)
        fixed_conflict = len(shape) != len(override) or any(
            isinstance(d, int) and d > 0 and d != o for d, o in zip(shape, override))
        if fixed_conflict:
            raise UserError(f"--input-shape {','.join(map(str, override))} conflicts with input '{name}' of shape "
                            f"{list(shape)}; only its dynamic dimensions can be set")
        return override
    if any(not isinstance(d, int) or d <= 0 for d in shape):
        raise UserError(f"input '{name}' has a dynamic shape {list(shape)}; give a fixed one with --input-shape "
                        f"(for example --input-shape 1,3,224,224)")
    return tuple(shape)


# ---------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _onnx_clip_as_ops():
    """Make the ONNX frontend emit Clip as maximum/minimum ops instead of opaque TE calls.

    Its Clip converter emits call_tir kernels, which layout conversion cannot see through: every ReLU6 would be
    wrapped in NHWC<->NCHW transposes. Plain Relax ops propagate the layout and fuse into the convolution.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as f

    def v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        if inputs[1] is not None:
            x = relax.op.maximum(x, inputs[1])
        if inputs[2] is not None:
            x = relax.op.minimum(x, inputs[2])
        return x

    def v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = x.ty.dtype
        if "min" in attr:
            x = relax.op.maximum(x, relax.const(float(attr["min"]), dtype))
        if "max" in attr:
            x = relax.op.minimum(x, relax.const(float(attr["max"]), dtype))
        return x

    saved = f.Clip._impl_v13, f.Clip._impl_v1
    f.Clip._impl_v13, f.Clip._impl_v1 = classmethod(v13), classmethod(v1)
    try:
        yield
    finally:
        f.Clip._impl_v13, f.Clip._impl_v1 = saved


def _onnx(path: Path, input_shape):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types for a damaged file
        raise UserError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "re-export it") from None
    known = set(_get_convert_map()) | {"Constant", "If"}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known:
            raise UserError(f"{path}: unsupported ONNX operator {node.op_type} at node '{node.name or f'#{i}'}'; "
                            "replace it in the model or export with a different opset")
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    if not graph_inputs:
        raise UserError(f"{path}: the model has no inputs")
    if input_shape is not None and len(graph_inputs) > 1:
        raise UserError(f"{path}: --input-shape is given but the model has {len(graph_inputs)} inputs")
    specs, shape_dict = [], {}
    from onnx.helper import tensor_dtype_to_np_dtype

    for gi in graph_inputs:
        tt = gi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tt.shape.dim]
        shape = _check_shape(dims, gi.name, input_shape)
        dtype = str(tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(TensorSpec(gi.name, shape, dtype))
        shape_dict[gi.name] = list(shape)
    model = _fold_shape_arithmetic(model, shape_dict)
    _check_onnx_nodes(path, model)
    try:
        with _onnx_clip_as_ops(), quiet_native():
            mod = from_onnx(model, shape_dict=shape_dict, dtype_dict={s.name: s.dtype for s in specs},
                            keep_params_in_input=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: the ONNX importer failed ({_first_line(e)}); check the model's shapes and ops") \
            from None
    return mod, specs, source_layers(model)


def check_finite(path: Path, named: Iterable[tuple[str, np.ndarray]]) -> None:
    """Refuse a model whose weights hold NaN or Inf: it would compile and compute NaN on the device."""
    for name, arr in named:
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise UserError(f"{path}: weight tensor '{name}' holds {bad} ({int((~np.isfinite(arr)).sum())} of "
                            f"{arr.size} values); fix or retrain the model")


def _check_onnx_nodes(path: Path, model) -> None:
    """What TVM would import and then fail on, or compute differently from onnxruntime, named by its node:
    non-finite weights, grouped ConvTranspose, and Resize by a scale that gives a fractional size (TVM rounds the
    size and derives its sampling from it; onnxruntime samples by the scale)."""
    import onnx
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    check_finite(path, ((n, numpy_helper.to_array(t)) for n, t in consts.items()))
    shapes = None
    for i, node in enumerate(model.graph.node):
        where = f"node '{node.name or f'#{i}'}'"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "ConvTranspose" and int(attrs.get("group", 1)) != 1:
            raise UserError(f"{path}: ConvTranspose with group={attrs['group']} at {where} is not supported "
                            "(group 1 is); replace it in the model")
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in consts:
            scales = numpy_helper.to_array(consts[node.input[2]])
            if scales.size == 0:
                continue
            if shapes is None:
                inferred = onnx.shape_inference.infer_shapes(model)
                shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                          for v in [*inferred.graph.value_info, *inferred.graph.input]}
            dims = shapes.get(node.input[0])
            if dims and len(dims) == scales.size:
                sizes = [d * float(s) for d, s in zip(dims, scales)]
                if any(d and abs(v - round(v)) > 1e-6 for d, v in zip(dims, sizes)):
                    raise UserError(f"{path}: Resize at {where} scales {dims} by {scales.tolist()} to a fractional "
                                    "size, which is not supported; resize to a size (F.interpolate(size=...)) "
                                    "or by a scale that gives whole sizes")


def _fold_shape_arithmetic(model, shape_dict: dict[str, list[int]]):
    """Fold Shape/Gather/Div/Slice chains (torch.chunk, flatten by size) into constants, with the input fixed.

    TVM imports such arithmetic as dynamic slices of unknown shape. onnxruntime's basic graph optimizations fold
    constants and nothing else that leaves standard ONNX, so its output is the same network in plain ops.
    """
    if not any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        return model
    import tempfile

    import onnx
    import onnxruntime as ort

    for gi in model.graph.input:
        if gi.name in shape_dict:
            dims = gi.type.tensor_type.shape.dim
            for d, v in zip(dims, shape_dict[gi.name]):
                d.Clear()
                d.dim_value = int(v)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "folded.onnx")
        onnx.save(model, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        try:
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
            return onnx.load(dst)
        except Exception:  # noqa: BLE001 - folding is an optimization; TVM reports what it cannot import
            return model


# ---------------------------------------------------------------- torch.export


def _pt2(path: Path, input_shape):
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    try:
        # torch.export's archive format is JSON plus raw tensor storage: loading it runs no pickle.
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a torch.export archive ({_first_line(e)}); save one with "
                        "torch.export.save(torch.export.export(model, (x,)), 'model.pt2')") from None
    if input_shape is not None:
        raise UserError("--input-shape does not apply to .pt2 files: their shapes are fixed at export")
    check_finite(path, ((k, v.detach().float().numpy()) for k, v in {**ep.state_dict, **ep.constants}.items()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()))
    ep = ep.run_decompositions()
    known = ExportedProgramImporter().create_convert_map()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name not in known:
                raise UserError(f"{path}: unsupported operator {name} at node '{node.name}'; "
                                "rewrite that part of the model with supported torch operations")
    specs = []
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise UserError(f"{path}: input '{node.name}' is not a tensor; only tensor inputs are supported")
            shape = _check_shape([int(d) if str(d).isdigit() else str(d) for d in val.shape], node.name, None)
            specs.append(TensorSpec(node.name, shape, str(val.dtype).removeprefix("torch.")))
    try:
        with quiet_native():
            mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                                    run_ep_decomposition=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: the torch.export importer failed ({_first_line(e)})") from None
    return mod, specs, []


# ---------------------------------------------------------------- TFLite


def _tflite_float_weights(model, sub) -> Iterable[tuple[str, np.ndarray]]:
    import tflite

    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        if t.Type() == tflite.TensorType.FLOAT32 and t.Buffer() < model.BuffersLength():
            buf = model.Buffers(t.Buffer())
            if buf.DataLength():
                yield t.Name().decode(errors="replace"), buf.DataAsNumpy().view(np.float32)


def _tflite(path: Path, input_shape, target=None):
    import tflite
    from tvm.relax.frontend.tflite import from_tflite
    from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter

    buf = path.read_bytes()
    try:
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ValueError("missing the TFL3 file identifier")
        model = tflite.Model.GetRootAsModel(buf, 0)
        sub = model.Subgraphs(0)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a valid .tflite model ({_first_line(e)}); re-export it") from None
    if model.SubgraphsLength() != 1:
        raise UserError(f"{path}: models with {model.SubgraphsLength()} subgraphs are not supported; use one")

    check_finite(path, _tflite_float_weights(model, sub))
    from .tflite_int8 import is_quantized

    if is_quantized(model, sub):  # TVM's frontend stops at quantized PAD, TRANSPOSE, QDQ islands: our lowering
        return _tflite_int8(path, model, sub, input_shape, target)
    # Operator check with the node named, before the frontend's own check that names only op types.
    names = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    try:
        known = set(OperatorConverter(model, sub, None, None).convert_map)
    except Exception:  # noqa: BLE001 - then the frontend's own check (op types only) still runs
        known = None
    for i in range(sub.OperatorsLength()):
        op = sub.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, "CUSTOM")
        if name == "CUSTOM" and code.CustomCode():
            name = code.CustomCode().decode(errors="replace")
        if known is not None and name not in known:
            out = sub.Tensors(op.Outputs(0)).Name().decode() if op.OutputsLength() else f"#{i}"
            raise UserError(f"{path}: unsupported TFLite operator {name} at node '{out}'; "
                            "replace it in the model")
    tf_types = {v: k.lower() for k, v in tflite.TensorType.__dict__.items() if not k.startswith("_")}
    specs, shape_dict, dtype_dict = [], {}, {}
    for i in range(sub.InputsLength()):
        t = sub.Tensors(sub.Inputs(i))
        name = t.Name().decode()
        shape = _check_shape([int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else [], name,
                             input_shape if sub.InputsLength() == 1 else None)
        dtype = str(np.dtype(tf_types.get(t.Type(), "float32")))
        specs.append(TensorSpec(name, shape, dtype))
        shape_dict[name], dtype_dict[name] = list(shape), dtype
    try:
        with quiet_native():
            mod = from_tflite(model, shape_dict=shape_dict, dtype_dict=dtype_dict)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: the TFLite importer failed ({_first_line(e)})") from None
    return mod, specs, []


def _tflite_int8(path: Path, model, sub, input_shape, target):
    """An int8 .tflite as an integer program (tflite_int8.py) compiled with the int8 kernels for `target`."""
    from ..targets import get_target
    from .integer import import_program
    from .tflite_int8 import lower, wrap_layouts

    prog, spec, in_perm, out_perm = lower(path, model, sub)
    if input_shape is not None and tuple(int(d) for d in input_shape) != spec.shape:
        raise UserError(f"--input-shape {','.join(map(str, input_shape))} conflicts with input '{spec.name}' of "
                        f"shape {list(spec.shape)}; int8 models have fixed shapes")
    target = get_target(target or "host") if not hasattr(target, "tvm_target") else target
    mod, _, _, layers = import_program(prog, target.tvm_target(), target.cores)
    return wrap_layouts(mod, spec, in_perm, out_perm), [spec], layers


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((ln for ln in reversed(text) if ln.strip()), type(e).__name__) if text else type(e).__name__
    return line.strip()[:200]
