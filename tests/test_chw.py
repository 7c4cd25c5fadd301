"""Channels-first kernels (kernels/chw.py and kernels/bsr.py's "chw" variant): made from the fused channels-last
kernels TVM legalizes, run on [1, C, H, W] tensors, checked against PyTorch and numpy at 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from edgeprune.codegen import lower
from edgeprune.codegen.kernels import bsr, chw, tag_kernels
from edgeprune.codegen.kernels.common import OP, CpuSpec, tag_of
from edgeprune.targets import get_target

TARGET = get_target("host").tvm_target()
SPEC = CpuSpec.of(TARGET)
RTOL = 1e-5


def fused(module: tvm.IRModule, op: str) -> tvm.tirx.PrimFunc:
    """The fused kernel of class `op` that our pipeline would schedule for `module`."""
    mod = tag_kernels(lower.fused_module(module, TARGET))
    return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and tag_of(f, OP) == op)


def run(func: tvm.tirx.PrimFunc, *arrays: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays), out)
    return out.numpy()


def to_chw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def layer(x_shape, conv, tail) -> tvm.IRModule:
    """main(x, r) = tail(conv(x), r), channels-last: the form our import gives a layer before fusion."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(tail(bb, bb.emit(conv(x))))
        bb.emit_func_output(out)
    return bb.get()


def relu6_bias(bias):
    return lambda bb, y: bb.emit(relax.op.clip(bb.emit(relax.op.add(y, relax.const(bias))), 0.0, 6.0))


@pytest.mark.parametrize("h,w,k,m,residual", [(7, 9, 32, 64, True), (2, 2, 16, 8, False), (14, 14, 96, 24, True),
                                               (5, 1, 12, 4, False), (7, 7, 32, 64, True), (3, 6, 16, 8, False)])
def test_sparse_pointwise_channels_first_matches_numpy(h, w, k, m, residual):
    """Maps that 8 lanes do not divide (the last vector moved back, or 1-3 spare pixels as block vectors: 7x7,
    3x6), smaller than a vector, and a residual add."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, m)).astype("float32") * np.repeat(rng.random((k, m // 4)) > 0.5, 4, axis=1)
    bias = rng.standard_normal(m).astype("float32")
    x = rng.standard_normal((1, h, w, k)).astype("float32")
    r = rng.standard_normal((1, h, w, m)).astype("float32")

    def tail(bb, y):
        y = relu6_bias(bias)(bb, y)
        return bb.emit(relax.op.add(y, relax.const(r))) if residual else y

    conv = lambda v: relax.op.nn.conv2d(v, relax.const(weight.reshape(1, 1, k, m)), data_layout="NHWC",  # noqa: E731
                                        kernel_layout="HWIO")
    func = fused(layer((1, h, w, k), conv, tail), "pointwise")
    f = bsr.read_fused(func)
    params = list(func.params)
    assert bsr.chw_capable(f, params)
    b = bsr.to_bsr(weight, 4)
    kernel = bsr.kernel(f, params, b, "chw", SPEC)
    extras = [to_chw(np.asarray(p)) if np.asarray(p).ndim == 4 else np.asarray(p)
              for p in [bias, *([r] if residual else [])]]
    got = run(kernel, to_chw(x), b.data, b.indices, b.indptr, *extras, out_shape=(1, m, h, w))
    want = np.clip(x.reshape(-1, k) @ weight + bias, 0, 6) + (r.reshape(-1, m) if residual else 0)
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1).reshape(-1, m), want, rtol=RTOL, atol=RTOL * 10)


@pytest.mark.parametrize("h,w,c,k,s", [(9, 7, 16, 3, 2), (9, 7, 16, 3, 1), (14, 14, 24, 5, 2), (15, 15, 8, 5, 1),
                                        (7, 7, 40, 3, 1), (5, 3, 8, 3, 1), (28, 28, 16, 3, 2)])
def test_depthwise_channels_first_matches_torch(h, w, c, k, s):
    """3x3 and 5x5, stride 1 and 2, odd and small maps (4-lane vectors, the last moved back), bias and ReLU6."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((k, k, 1, c)).astype("float32")
    bias = rng.standard_normal(c).astype("float32")
    x = rng.standard_normal((1, h, w, c)).astype("float32")
    conv = lambda v: relax.op.nn.conv2d(v, relax.const(weight), strides=s, padding=k // 2, groups=c,  # noqa: E731
                                        data_layout="NHWC", kernel_layout="HWIO")
    func = fused(layer((1, h, w, c), conv, relu6_bias(bias)), "depthwise")
    dw = chw.read_depthwise(func)
    assert dw is not None and dw.kernel == (k, k) and dw.stride == (s, s) and dw.pad == (k // 2, k // 2)
    oihw = torch.from_numpy(weight.transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(torch.from_numpy(to_chw(x)), oihw, torch.from_numpy(bias), s, k // 2,
                                      groups=c).clamp(0, 6).numpy()
    got = run(chw.depthwise_kernel(dw, list(func.params), SPEC), to_chw(x), weight, bias, out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * 10)


@pytest.mark.parametrize("h,w,k", [(7, 7, 3), (14, 14, 3), (5, 3, 3), (9, 6, 5)])
def test_depthwise_over_whole_maps_matches_torch(h, w, k):
    """Rows shorter than a 16-lane vector at stride 1: vectors over the map's pixels in row-major order, the taps
    that wrap into the row before or after, or leave the map, zeroed (chw.flat_rows), whatever this CPU's lanes."""
    c, spec = 24, CpuSpec(16, 24)
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((k, k, 1, c)).astype("float32")
    bias = rng.standard_normal(c).astype("float32")
    x = rng.standard_normal((1, h, w, c)).astype("float32")
    conv = lambda v: relax.op.nn.conv2d(v, relax.const(weight), padding=k // 2, groups=c,  # noqa: E731
                                        data_layout="NHWC", kernel_layout="HWIO")
    func = fused(layer((1, h, w, c), conv, relu6_bias(bias)), "depthwise")
    dw = chw.read_depthwise(func)
    assert chw.flat_lanes(dw, spec) == (16 if h * w >= 16 else 0)
    oihw = torch.from_numpy(weight.transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(torch.from_numpy(to_chw(x)), oihw, torch.from_numpy(bias), 1, k // 2,
                                      groups=c).clamp(0, 6).numpy()
    got = run(chw.depthwise_kernel(dw, list(func.params), spec), to_chw(x), weight, bias, out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * 10)


def test_only_plain_depthwise_kernels_are_read():
    """A dense 3x3 convolution and a dilated depthwise one are not what the kernel computes: None, not a guess."""
    x = (1, 8, 8, 8)
    plain = lambda v: relax.op.nn.conv2d(v, relax.const(np.ones((3, 3, 8, 8), "float32")), padding=1,  # noqa: E731
                                         data_layout="NHWC", kernel_layout="HWIO")
    dilated = lambda v: relax.op.nn.conv2d(v, relax.const(np.ones((3, 3, 1, 8), "float32")), padding=2,  # noqa: E731
                                           dilation=2, groups=8, data_layout="NHWC", kernel_layout="HWIO")
    for conv, op in ((plain, "conv"), (dilated, "depthwise")):
        func = fused(layer(x, conv, lambda bb, y: y), op)
        assert chw.read_depthwise(func) is None


def test_a_sparse_block_runs_channels_first_with_one_transpose_each_way(tmp_path):
    """test_bsr's network (stem, sparse expand, depthwise, sparse project + residual, classifier) built with
    channels-first runs: the expand, depthwise and project kernels are channels-first, the residual is the run's
    own copy of the block input, one transpose enters the run and one leaves it, and the library matches
    onnxruntime; the build's layer table lists every kernel."""
    import onnxruntime as ort
    from helpers import assert_close
    from test_bsr import Net, block_sparse

    from edgeprune.codegen.build import compile_model
    from edgeprune.measure.local import Session
    from edgeprune.models import zoo

    torch.manual_seed(0)
    model = block_sparse(Net(), 4, 0.6)
    x = torch.randn(1, 3, 7, 9)
    path = zoo.export_onnx(model, x, tmp_path / "net.onnx")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    from edgeprune.codegen.importers import import_model

    pick = lambda kernel, dense, options: "pixels:4"  # noqa: E731
    _, scheduled = lower.compile_module(import_model(path).mod, TARGET, sparse=pick, channels_first=True)
    names = [gv.name_hint for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    variants = [str(f.attrs.get(bsr.VARIANT, "")) for _, f in scheduled.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)]
    assert variants.count("chw") == 3  # expand, depthwise, project
    assert sum(n.startswith("to_channels_first") for n in names) == 1
    assert sum(n.startswith("to_channels_last") for n in names) == 1
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse", channels_first=True)
    assert_close(Session(build).run([x.numpy()])[0], ref)
    assert {r.kernel for r in build.layers} >= {n for n in names if "chw" in n}


@pytest.mark.parametrize("chw_faster", [True, False])
def test_by_default_a_host_library_keeps_the_layout_measured_faster(tmp_path, monkeypatch, chw_faster):
    """channels_first=None builds a host shared library both ways where sparse runs form and keeps the one the
    measurement here calls faster (the measurement is replaced to decide each way); both match onnxruntime."""
    import onnxruntime as ort
    from helpers import assert_close
    from test_bsr import Net, block_sparse

    from edgeprune.codegen import build as build_mod
    from edgeprune.measure.local import Session
    from edgeprune.models import zoo

    torch.manual_seed(0)
    path = zoo.export_onnx(block_sparse(Net(), 4, 0.6), torch.randn(1, 3, 7, 9), tmp_path / "net.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 7, 9)).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    compared = []
    monkeypatch.setattr(build_mod, "_faster", lambda a, b, inputs: compared.append(1) or chw_faster)
    built = build_mod.compile_model(path, "host", tmp_path / "b", sparse="sparse")
    assert compared == [1]
    kernels = [r.kernel for r in built.layers]
    assert any("chw" in k for k in kernels) == chw_faster
    assert any("bsr" in k for k in kernels)  # sparse either way
    assert_close(Session(built).run([x])[0], ref)


def test_a_depthwise_layer_and_the_sparse_layer_reading_it_run_as_one_kernel_in_a_run(tmp_path):
    """On a map of dwpw.MIN_PIXELS or more (12 x 11, so row tiles do not divide it), the run's depthwise layer and
    the sparse project layer that alone reads it (with its residual) are one channels-first kernel: the expanded
    tensor between them is never a tensor of the program. The library matches onnxruntime, and the layer table
    still has a row per layer, in the layers' own channels-last shapes, the sparse one with its block and
    density."""
    import onnxruntime as ort
    from helpers import assert_close
    from test_bsr import Net, block_sparse

    from edgeprune.codegen.build import compile_model
    from edgeprune.codegen.importers import import_model
    from edgeprune.measure.local import Session
    from edgeprune.models import zoo

    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 11)
    path = zoo.export_onnx(block_sparse(Net(), 4, 0.6), x, tmp_path / "net.onnx")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    pick = lambda kernel, dense, options: "pixels:4"  # noqa: E731
    _, scheduled = lower.compile_module(import_model(path).mod, TARGET, sparse=pick, channels_first=True)
    ops = sorted(str(tag_of(f, OP)) for _, f in scheduled.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs.get(bsr.VARIANT, "")) == "chw")
    assert ops == ["dwpw", "pointwise"]  # the expand layer alone; depthwise + project merged
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse", channels_first=True)
    assert_close(Session(build).run([x.numpy()])[0], ref)
    merged = [r for r in build.layers if "dwpw_chw" in r.kernel]
    assert [r.op for r in merged] == ["depthwise", "pointwise"]
    depthwise, project = merged
    assert depthwise.shapes == ((1, 12, 11, 64), (3, 3, 1, 64), (1, 12, 11, 64))
    assert project.shapes[-1] == (1, 12, 11, 32) and project.family == "bsr" and project.block == 4
    assert 0.3 < project.density < 0.5
    expand = next(r for r in build.layers if r.op == "pointwise" and r.kernel.endswith("_chw1"))
    assert expand.shapes[1:] == ((1, 1, 32, 64), (1, 12, 11, 64))


def assert_merges_and_matches_onnxruntime(path, x: torch.Tensor, tmp_path, ops_wanted=("dwpw", "pointwise")):
    """The model's sparse layers, forced channels-first, run as one expand kernel and one merged depthwise +
    project kernel (or as `ops_wanted` says), and the library matches onnxruntime."""
    import onnxruntime as ort
    from helpers import assert_close

    from edgeprune.codegen.build import compile_model
    from edgeprune.codegen.importers import import_model
    from edgeprune.measure.local import Session

    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    pick = lambda kernel, dense, options: "pixels:4"  # noqa: E731
    _, scheduled = lower.compile_module(import_model(path).mod, TARGET, sparse=pick, channels_first=True)
    ops = sorted(str(tag_of(f, OP)) for _, f in scheduled.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs.get(bsr.VARIANT, "")) == "chw")
    assert ops == sorted(ops_wanted)
    build = compile_model(path, "host", tmp_path / "b", sparse="sparse", channels_first=True)
    assert_close(Session(build).run([x.numpy()])[0], ref)
    return build


class Down(torch.nn.Module):
    """stem, sparse expand, 3x3 stride-2 depthwise, sparse project: an inverted-residual block that downsamples."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.ReLU6())
        self.down = nn.Sequential(nn.Conv2d(48, 48, 3, stride=2, padding=1, groups=48), nn.ReLU6())
        self.project = nn.Conv2d(48, 24, 1)

    def forward(self, x):
        return self.project(self.down(self.expand(self.stem(x))))


@pytest.mark.parametrize("h,w", [(24, 20), (30, 28)])
def test_a_stride_2_depthwise_layer_merged_with_its_sparse_reader_matches_onnxruntime(tmp_path, h, w):
    """A 3x3 stride-2 depthwise layer (a load of 2L pixels, its even or odd lanes a tap) merged with the sparse
    layer reading it: the library matches onnxruntime, on maps whose output rows 16 lanes do not divide (12x10,
    15x14)."""
    from test_bsr import block_sparse

    from edgeprune.models import zoo

    torch.manual_seed(0)
    x = torch.randn(1, 3, h, w)
    path = zoo.export_onnx(block_sparse(Down(), 4, 0.6), x, tmp_path / "down.onnx")
    assert_merges_and_matches_onnxruntime(path, x, tmp_path)


@pytest.mark.parametrize("h,w,budget", [(24, 20, 256 * 1024), (31, 28, 256 * 1024), (30, 28, 1)])
def test_the_expanding_layer_before_a_stride_2_depthwise_layer_joins_the_merged_kernel(tmp_path, monkeypatch, h, w,
                                                                                        budget):
    """With the map-size floor lifted, the sparse expand layer joins the merged kernel (each tile computes the
    expanded rows its window reads): one channels-first kernel for the block, matching onnxruntime. Odd heights
    (the last tile's window ends at the map's last row) and a budget that leaves tiles the fewest rows the
    pointwise part takes (windows that overlap, the first clamped at the map's top)."""
    from test_bsr import block_sparse

    from edgeprune.codegen.kernels import chw_merged
    from edgeprune.models import zoo

    monkeypatch.setattr(chw_merged, "EXPAND_PIXELS", 0)
    monkeypatch.setattr(chw_merged, "EXPAND_BYTES", budget)
    torch.manual_seed(0)
    x = torch.randn(1, 3, h, w)
    path = zoo.export_onnx(block_sparse(Down(), 4, 0.6), x, tmp_path / "down.onnx")
    build = assert_merges_and_matches_onnxruntime(path, x, tmp_path, ops_wanted=("dwpw",))
    # a row per layer, in the layers' own shapes, each sparse part with its own block and density
    expand, down, project = [r for r in build.layers if "expand_dwpw_chw" in r.kernel]
    oh, ow = (h + 1) // 2, (w + 1) // 2
    assert (expand.op, down.op, project.op) == ("pointwise", "depthwise", "pointwise")
    assert expand.shapes[0] == (1, h, w, 16) and expand.shapes[-1] == (1, h, w, 48)
    assert down.shapes[-1] == (1, oh, ow, 48) and project.shapes[-1] == (1, oh, ow, 24)
    assert expand.family == project.family == "bsr" and expand.block == project.block == 4
    assert 0.3 < expand.density < 0.5 and 0.3 < project.density < 0.5


def test_a_depthwise_layer_keeping_its_maps_size_starts_a_run_and_merges(tmp_path):
    """A stride-1 depthwise layer fed by a dense layer and read by a sparse one starts the run (the transpose in
    moves to its input, the same size) and merges with its reader, as MobileNetV2's first block does; the library
    matches onnxruntime."""
    from test_bsr import block_sparse
    from torch import nn

    from edgeprune.models import zoo

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.ReLU6(), nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.Conv2d(32, 16, 1))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    path = zoo.export_onnx(block_sparse(net, 4, 0.6), x, tmp_path / "first.onnx")
    assert_merges_and_matches_onnxruntime(path, x, tmp_path)


def test_merged_tiles_share_the_rows_evenly_and_keep_their_buffer_in_l2():
    """tile_rows: whole rows, the busiest thread's pixel vectors fewest, the buffer within BUFFER_BYTES."""
    from edgeprune.codegen.kernels.chw_merged import BUFFER_BYTES, tile_rows

    # MobileNetV2's merged maps at 8 lanes, 2 threads: 56x56 a row a tile; 28x28 two; 14x14 seven (two tiles)
    assert [tile_rows(s, s, 8, 2, c) for s, c in ((56, 144), (28, 192), (14, 576))] == [1, 2, 7]
    for oh, ow, c in ((14, 14, 960), (28, 28, 4096), (12, 11, 64)):
        r = tile_rows(oh, ow, 8, 2, c)
        assert 1 <= r <= oh and (r == 1 or c * r * ow * 4 <= BUFFER_BYTES)
        if c * -(-32 // ow) * ow * 4 <= BUFFER_BYTES:  # a tile fills four vectors where the buffer allows it
            assert r * ow >= min(oh * ow, 32)
        else:
            assert r == 1
