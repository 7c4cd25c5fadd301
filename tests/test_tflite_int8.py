"""int8 .tflite import (issue 14, deliverable 4): quantized graphs written without TensorFlow (tflite_builder.py, int8
tensors with per-channel and per-tensor weight scales), lowered to an integer program (codegen/tflite_int8.py),
compiled, and compared with ai-edge-litert's interpreter on the same input.

Tolerance: one step of the output's grid against LiteRT (TFLite requantizes with two roundings, the program with
one), and bit for bit against the program's own interpreter (compress/integer.run).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_one_line_error
from tflite_builder import TFLiteGraph

from edgeprune.codegen.build import compile_model
from edgeprune.codegen.importers import import_model
from edgeprune.compress import integer as I
from edgeprune.errors import UserError
from edgeprune.measure import package
from edgeprune.measure.local import Session

pytest.importorskip("ai_edge_litert.interpreter")


class _Layers:
    """Random int8 layers whose output grids keep the activations spread (a few saturate, most do not)."""

    def __init__(self, g: TFLiteGraph, seed: int) -> None:
        self.g, self.rng = g, np.random.default_rng(seed)

    def grid_after(self, x: int, w_scales: np.ndarray, fan_in: int) -> tuple[float, int]:
        # int8 weights uniform in +-127 (std 73) over `fan_in` inputs of std ~35 steps: out std ~40 steps
        scale = self.g.grid(x)[0] * float(np.mean(w_scales)) * np.sqrt(fan_in) * 73 * 35 / 40
        return float(scale), int(self.rng.integers(-10, 10))

    def weights(self, shape, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
        w = self.rng.integers(-127, 128, size=shape).astype(np.int8)
        n = shape[0] if per_channel else 1
        return w, self.rng.uniform(0.5, 1.5, n).astype(np.float32) * 1e-2

    def conv(self, x: int, o: int, k: int, name: str, depthwise: bool = False, per_channel: bool = True, **kw):
        c = self.g.tensors[x].shape[3]
        w, s = self.weights((1, k, k, c) if depthwise else (o, k, k, c), per_channel)
        if depthwise:
            s = self.rng.uniform(0.5, 1.5, c if per_channel else 1).astype(np.float32) * 1e-2
        fan = k * k * (1 if depthwise else c)
        grid = self.grid_after(x, s, fan)
        bias = self.rng.integers(-2000, 2000, c if depthwise else o)
        return self.g.qconv2d(x, w, s, name, grid, depthwise=depthwise, bias=bias, **kw)

    def dense(self, x: int, o: int, name: str, **kw) -> int:
        k = self.g.tensors[x].shape[1]
        w, s = self.weights((o, k))
        return self.g.qfully_connected(x, w, s, name, self.grid_after(x, s, k), bias=self.rng.integers(-900, 900, o),
                                       **kw)


def _channels_last(seed: int = 0) -> TFLiteGraph:
    """As TensorFlow's converter writes: float NHWC input -> QUANTIZE -> CONV_2D (stride 2, SAME: one pixel after,
    RELU6) -> DEPTHWISE (RELU) -> PAD -> CONV_2D (VALID, per-tensor weight scale) -> ADD (RELU) -> MAX_POOL_2D ->
    RESHAPE (a channels-last flatten of a 3x3 map) -> FULLY_CONNECTED -> DEQUANTIZE."""
    g = TFLiteGraph()
    L = _Layers(g, seed)
    x = g.quantize(g.input("image", (1, 12, 12, 3)), "quant", (0.03, 3))
    c1 = L.conv(x, 8, 3, "conv1", stride=2, act="RELU6")
    d2 = L.conv(c1, 8, 3, "dw2", depthwise=True, act="RELU")
    p3 = g.pad(d2, [[0, 0], [1, 1], [1, 1], [0, 0]], "pad3")
    c4 = L.conv(p3, 8, 3, "conv4", same=False, per_channel=False)
    a5 = g.qadd(c4, c1, "add5", (g.grid(c4)[0] * 1.3, -5), act="RELU")
    m6 = g.pool(a5, "MAX", 2, 2, "maxpool6")
    r7 = g.reshape(m6, (1, 72), "flatten7")
    g.output(g.dequantize(L.dense(r7, 10, "fc8"), "logits"))
    return g


def _from_pytorch(seed: int = 1) -> TFLiteGraph:
    """As litert-torch's PT2E path writes: int8 NCHW input -> TRANSPOSE -> CONV_2D 1x1 (RELU) -> PAD (after only)
    -> DEPTHWISE (stride 2, VALID) -> CONV_2D 1x1 -> a residual chain in float: ADD between DEQUANTIZEs (also
    QUANTIZEd for a CONV_2D), a second ADD reading the first's float sum, TRANSPOSE and MEAN over H, W still in
    float -> QUANTIZE -> FULLY_CONNECTED (RELU), int8 output."""
    g = TFLiteGraph()
    L = _Layers(g, seed)
    x = g.transpose(g.input("args_0", (1, 3, 10, 10), (0.031, 0)), (0, 2, 3, 1), "to_nhwc")
    c1 = L.conv(x, 16, 1, "pw1", act="RELU")
    p2 = g.pad(c1, [[0, 0], [0, 1], [0, 1], [0, 0]], "pad2")
    d3 = L.conv(p2, 16, 3, "dw3", depthwise=True, same=False, stride=2)
    c4 = L.conv(d3, 16, 1, "pw4")
    s5 = g.qadd(g.dequantize(c4, "deq_a"), g.dequantize(d3, "deq_b"), "add5", None)
    q5 = g.quantize(s5, "q5", (g.grid(c4)[0] * 1.4, 3))
    c6 = L.conv(q5, 16, 1, "pw6")
    s7 = g.qadd(s5, g.dequantize(c6, "deq_c"), "add7", None)
    m8 = g.mean(g.transpose(s7, (0, 3, 1, 2), "to_nchw"), [2, 3], "mean8", None)
    q8 = g.quantize(m8, "q8", (g.grid(c4)[0] * 0.9, 1))
    g.output(L.dense(q8, 10, "fc9", act="RELU"))
    return g


def _map_output(seed: int = 2) -> TFLiteGraph:
    """A 4-D output: float NHWC input -> QUANTIZE -> CONV_2D -> RELU -> global AVERAGE_POOL_2D -> DEQUANTIZE."""
    g = TFLiteGraph()
    L = _Layers(g, seed)
    x = g.quantize(g.input("image", (1, 8, 8, 4)), "quant", (0.03, -4))
    c1 = L.conv(x, 12, 3, "conv1")
    r2 = g.qrelu(c1, "relu2", (g.grid(c1)[0] * 0.7, -100))
    g.output(g.dequantize(g.pool(r2, "AVERAGE", 8, 8, "avgpool3"), "features"))
    return g


def _per_tensor(seed: int = 4) -> TFLiteGraph:
    """Per-tensor weight scales only, so that it has a uint8 twin (as_uint8) LiteRT runs: float input ->
    QUANTIZE -> CONV_2D (RELU6) -> DEPTHWISE -> ADD -> MEAN -> FULLY_CONNECTED -> DEQUANTIZE."""
    g = TFLiteGraph()
    L = _Layers(g, seed)
    x = g.quantize(g.input("image", (1, 8, 8, 3)), "quant", (0.03, 1))
    c1 = L.conv(x, 8, 3, "conv1", per_channel=False, act="RELU6")
    d2 = L.conv(c1, 8, 3, "dw2", depthwise=True, per_channel=False)
    a3 = g.qadd(d2, c1, "add3", (g.grid(d2)[0] * 1.2, 2))
    m4 = g.mean(a3, [1, 2], "mean4", (g.grid(a3)[0] * 0.6, -3))
    w, s = L.weights((10, 8), per_channel=False)
    g.output(g.dequantize(g.qfully_connected(m4, w, s, "fc5", L.grid_after(m4, s, 8)), "logits"))
    return g


def _litert(path, x: np.ndarray) -> tuple[np.ndarray, tuple[float, int]]:
    """LiteRT's output on float `x` (quantized on the input's grid when the model takes int8), and the grid of
    its last int8 tensor."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    d, od = it.get_input_details()[0], it.get_output_details()[0]
    if d["dtype"] == np.int8:
        s, z = d["quantization"]
        x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
    it.set_tensor(d["index"], x)
    it.invoke()
    return it.get_tensor(od["index"]), od["quantization"]


def _steps(y: np.ndarray, grid: tuple[float, int]) -> np.ndarray:
    """Values on an int8 grid as integers (float outputs are dequantized int8 values)."""
    if y.dtype == np.int8:
        return y.astype(np.int64)
    s, z = grid
    return np.round(y / s).astype(np.int64) + z


def _inputs(spec, n: int, seed: int, grid=None) -> list[np.ndarray]:
    """Float inputs, on the input's grid when given: what an int8 input is fed, and for a float input, values whose
    quantization no rounding rule can disagree on."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(spec.shape).astype(np.float32) * 1.5 for _ in range(n)]
    if grid is None:
        return xs
    s, z = grid
    return [((np.clip(np.round(x / s) + z, -128, 127) - z) * s).astype(np.float32) for x in xs]


def _program(path):
    import tflite

    from edgeprune.codegen.tflite_int8 import lower

    m = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    return lower(path, m, m.Subgraphs(0))


def _check_against_litert(path, build, runs: int = 4, seed: int = 3) -> int:
    """Our build against LiteRT (within one step) and against the program's interpreter (bit for bit); the
    largest difference in steps."""
    prog, spec, in_perm, out_perm = _program(path)
    grid = (prog.ops[0].params["scale"], prog.ops[0].params["zero_point"])  # the input's
    out_grid = (prog.ops[-1].params["scale"], prog.ops[-1].params["zero_point"])
    worst = 0
    for x in _inputs(spec, runs, seed, grid):
        (ours,) = Session(build).run([x])
        ref = I.run(prog, np.transpose(x, np.argsort(in_perm)))
        np.testing.assert_array_equal(ours, np.transpose(ref, out_perm) if ref.ndim == 4 else ref)
        theirs, their_grid = _litert(path, x)
        assert ours.shape == theirs.shape
        a, b = _steps(ours, out_grid), _steps(theirs, their_grid if theirs.dtype == np.int8 else out_grid)
        assert len(np.unique(b)) > 2, "degenerate test: LiteRT's output is nearly constant"
        worst = max(worst, int(np.abs(a - b).max()))
    assert worst <= 1, f"{worst} steps from LiteRT"
    return worst


@pytest.mark.parametrize("graph", [_channels_last, _from_pytorch, _map_output, _per_tensor])
def test_lowered_programs_match_litert_for_many_weights(graph, tmp_path):
    """The lowering alone (the interpreter runs the program), over several random weight sets."""
    for seed in range(4):
        path = graph(seed).save(tmp_path / f"{seed}.tflite")
        prog, spec, in_perm, out_perm = _program(path)
        grid = (prog.ops[0].params["scale"], prog.ops[0].params["zero_point"])
        out = (prog.ops[-1].params["scale"], prog.ops[-1].params["zero_point"])
        for x in _inputs(spec, 3, seed, grid):
            ours = I.run(prog, np.transpose(x, np.argsort(in_perm)))
            theirs, their_grid = _litert(path, x)
            ours = np.transpose(ours, out_perm) if ours.ndim == 4 else ours
            diff = _steps(ours, out) - _steps(theirs, their_grid if theirs.dtype == np.int8 else out)
            assert np.abs(diff).max() <= 1, f"seed {seed}: {np.abs(diff).max()} steps from LiteRT"


def test_channels_last_int8_graph_matches_litert(tmp_path):
    path = _channels_last().save(tmp_path / "cl.tflite")
    build = compile_model(path, "host", tmp_path / "build")
    assert [(s.name, s.shape, s.dtype) for s in build.inputs] == [("image", (1, 12, 12, 3), "float32")]
    assert [s.shape for s in build.outputs] == [(1, 10)]
    assert not build.unscheduled
    _check_against_litert(path, build)


def test_pytorch_layout_int8_graph_matches_litert(tmp_path):
    path = _from_pytorch().save(tmp_path / "pt.tflite")
    prog, spec, in_perm, _ = _program(path)
    assert in_perm == (0, 1, 2, 3) and prog.input_shape == (1, 3, 10, 10)  # the TRANSPOSE costs nothing
    # the float chain, one rounding per QUANTIZE as in LiteRT: a 2-input add, and a mean of the 3-term sum
    assert [(op.kind, len(op.inputs)) for op in prog.ops if op.kind in ("add", "mean")] == [("add", 2), ("mean", 3)]
    build = compile_model(path, "host", tmp_path / "build")
    assert [(s.name, s.shape) for s in build.inputs] == [("args_0", (1, 3, 10, 10))]
    _check_against_litert(path, build)


def test_int8_map_output_keeps_the_file_layout(tmp_path):
    path = _map_output().save(tmp_path / "map.tflite")
    build = compile_model(path, "host", tmp_path / "build")
    assert [s.shape for s in build.outputs] == [(1, 1, 1, 12)]
    _check_against_litert(path, build)


def test_uint8_tflite_compiles_as_its_int8_twin(tmp_path):
    """TFLite's older uint8 scheme: the same program as the int8 graph, and LiteRT's uint8 kernels agree."""
    g = _per_tensor()
    u8 = g.as_uint8().save(tmp_path / "u8.tflite")
    twin = _program(g.save(tmp_path / "i8.tflite"))[0]
    prog = _program(u8)[0]
    for a, b in zip(prog.ops, twin.ops):
        assert a.kind == b.kind and all(np.array_equal(a.params[k], b.params[k]) for k in b.params), a.kind
    build = compile_model(u8, "host", tmp_path / "build")
    _check_against_litert(u8, build)


@pytest.mark.slow
def test_int8_tflite_package_is_bit_exact_under_qemu(tmp_path):
    path = _channels_last().save(tmp_path / "cl.tflite")
    build = compile_model(path, "cortex-a7", tmp_path / "pkg", fmt="c")
    prog, spec, in_perm, _ = _program(path)
    x = _inputs(spec, 1, 5, (prog.ops[0].params["scale"], prog.ops[0].params["zero_point"]))[0]
    ours = package.run(build, [x], "qemu://cortex-a7")[0]
    np.testing.assert_array_equal(ours, I.run(prog, np.transpose(x, np.argsort(in_perm))))
    theirs, grid = _litert(path, x)
    out = (prog.ops[-1].params["scale"], prog.ops[-1].params["zero_point"])
    assert np.abs(_steps(ours, out) - _steps(theirs, out)).max() <= 1


def _lower_error(g: TFLiteGraph, tmp_path) -> str:
    path = g.save(tmp_path / "bad.tflite")
    with pytest.raises(UserError) as e:
        import_model(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_what_int8_import_cannot_take_names_the_node(tmp_path):
    g = TFLiteGraph()
    x = g.quantize(g.input("image", (1, 6, 6, 3)), "quant", (0.03, 0))
    g.output(g.dequantize(g.custom(x, "foo_node", "FooBar"), "out"))
    msg = _lower_error(g, tmp_path)
    assert "CUSTOM" in msg and "foo_node" in msg, msg

    g = TFLiteGraph()  # a PAD that no convolution takes
    x = g.quantize(g.input("image", (1, 6, 6, 3)), "quant", (0.03, 0))
    p = g.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "pad_node")
    g.output(g.dequantize(g.qadd(p, p, "add_node", (0.05, 0)), "out"))
    msg = _lower_error(g, tmp_path)
    assert "ADD" in msg and "add_node" in msg and "PAD" in msg, msg

    g = TFLiteGraph()  # a float convolution (fine: kept in fp32) whose float output nothing quantizes
    x = g.input("image", (1, 6, 6, 3))
    q = g.quantize(x, "quant", (0.03, 0))
    y = g.conv2d(g.dequantize(q, "deq"), np.ones((4, 3, 3, 3), "f4"), np.zeros(4, "f4"), "float_conv")
    g.output(y)
    msg = _lower_error(g, tmp_path)
    assert "float_conv" in msg and "int8" in msg, msg


def test_int8_tflite_compiles_from_the_command_line(tmp_path, cli):
    path = _map_output().save(tmp_path / "map.tflite")
    rc, out, err = cli("compile", path, "--target", "host", "-o", tmp_path / "b", "--input-shape", "1,4,8,8")
    assert rc == 2
    assert_one_line_error(err, "1,4,8,8")
    rc, out, err = cli("compile", path, "--target", "host", "-o", tmp_path / "b")
    assert rc == 0, err
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = cli("run", tmp_path / "b", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert rc == 0, err
    theirs, _ = _litert(path, x)
    step = _program(path)[0].ops[-1].params["scale"]
    assert np.abs(np.load(tmp_path / "y.npy") - theirs).max() <= step * 1.001


def _small_net():
    """A MobileNetV2-like network in PyTorch (stem, a stride-2 block, a residual block, mean, linear) and an input."""
    import torch
    from torch import nn

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in), nn.BatchNorm2d(c_in), nn.ReLU6(),
                             nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
            self.down, self.same = block(16, 24, 2), block(24, 24, 1)
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            y = self.down(self.stem(x))
            y = y + self.same(y)
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval(), torch.randn(1, 3, 32, 32)


@pytest.mark.slow
def test_litert_torch_int8_file_matches_litert(tmp_path):
    """A file from litert-torch's PT2E quantizer itself (when it is installed; the default install has not got it):
    int8 NCHW input and TRANSPOSE, PAD before stride-2 depthwise layers, residual adds left in float between
    DEQUANTIZE and QUANTIZE, MEAN, FULLY_CONNECTED."""
    pytest.importorskip("litert_torch")
    import contextlib
    import sys

    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    model, x = _small_net()
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    path = tmp_path / "net.tflite"
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        m = quantize_pt2e.prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
        for _ in range(8):
            m(torch.randn(1, 3, 32, 32))
        m = quantize_pt2e.convert_pt2e(m, fold_quantize=False)
        litert_torch.convert(m, (x,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)).export(
            str(path))
    build = compile_model(path, "host", tmp_path / "build")
    assert [s.shape for s in build.inputs] == [(1, 3, 32, 32)]
    _check_against_litert(path, build, runs=8)


@pytest.mark.slow
def test_ai_edge_quantizer_int8_file_matches_litert(tmp_path):
    """A float .tflite (litert-torch) quantized to int8 by ai-edge-quantizer's static recipe (both when installed),
    which writes the weights after the flatbuffer (buffer offsets), not inside it."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    import contextlib
    import sys

    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    model, x = _small_net()
    float_path, path = tmp_path / "float.tflite", tmp_path / "net.tflite"
    with contextlib.redirect_stdout(sys.stderr):
        litert_torch.convert(model, (x,)).export(str(float_path))
        (key, sig), = Interpreter(model_path=str(float_path)).get_signature_list().items()
        rng = np.random.default_rng(0)
        qt = quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        result = qt.calibrate({key: [{sig["inputs"][0]: rng.standard_normal(x.shape).astype(np.float32)}
                                     for _ in range(8)]})
        qt.quantize(result).export_model(str(path))
    build = compile_model(path, "host", tmp_path / "build")
    _check_against_litert(path, build, runs=8)
