"""Depthwise + pointwise fusion (codegen/dwpw.py, kernels/dwpw.py): which pairs merge, the merged kernel's numerics
against onnxruntime on the same .onnx file and against the unfused build, its cost rows, and the C package's arena.

Tolerance: 1e-4 of the output's largest magnitude, the project's budget against onnxruntime. Fused and unfused
builds add in the same order (window taps, then input channels), so they agree to rounding (1e-6 asserted).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from tvm import tirx

import edgeprune
from edgeprune.artifacts import LayerCost
from edgeprune.codegen import dwpw
from edgeprune.codegen.build import compile_model
from edgeprune.codegen.importers import import_model
from edgeprune.codegen.lower import schedule_module
from edgeprune.cost.table import call_shares
from edgeprune.measure.local import Session
from edgeprune.models import zoo
from edgeprune.models.reference import randomize_bn
from edgeprune.targets import get_target

RTOL = 1e-4


class _Inverted(nn.Module):
    """MobileNetV2's inverted residual: expand 1x1 + ReLU6, depthwise k x k + ReLU6 (or hardswish), project 1x1, and
    the residual add where the shape allows (the projection's epilogue)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, k: int = 3, act: type = nn.ReLU6):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid), nn.BatchNorm2d(mid), act())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def _export(model: nn.Module, shape: tuple[int, ...], tmp_path):
    randomize_bn(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return zoo.export_onnx(model.eval(), x, tmp_path / "m.onnx"), x.numpy()


def _kernels(path, **kw) -> dict[str, tirx.PrimFunc]:
    mod = schedule_module(import_model(path).mod, get_target("host").tvm_target(), **kw)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _merged(funcs: dict[str, tirx.PrimFunc]) -> list[str]:
    return [n for n, f in funcs.items() if (f.attrs or {}).get("edgeprune.op") == dwpw.OP_NAME]


@pytest.mark.parametrize("cin,mid,cout,hw,stride,k,act", [
    (16, 96, 16, 20, 1, 3, nn.ReLU6),  # residual add in the pointwise epilogue
    (16, 96, 24, 24, 2, 3, nn.ReLU6),  # stride 2: the tile's depthwise reads twice its width
    (24, 72, 40, 14, 1, 5, nn.Hardswish),  # MobileNetV3's 5x5 with hardswish, 14 = no 8-pixel tile
    (8, 40, 12, 11, 1, 3, nn.ReLU6),  # channels no 16-lane vector divides, an odd map
])
def test_fused_block_matches_onnxruntime(cin, mid, cout, hw, stride, k, act, tmp_path):
    path, x = _export(_Inverted(cin, mid, cout, stride, k, act), (1, cin, hw, hw), tmp_path)
    assert len(_merged(_kernels(path))) == 1
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    assert build.unscheduled == []
    ours = Session(build).run([x])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))

    # the same network as two kernels: the same sums in the same order
    from edgeprune.codegen.lower import compile_module

    ex, _ = compile_module(import_model(path).mod, get_target("host").tvm_target(), fuse_depthwise=False)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    unfused = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(ours, unfused, rtol=1e-6, atol=1e-6 * float(np.abs(unfused).max()))


def test_fused_rows_price_two_layers(tmp_path):
    """One kernel, two rows named after the two Conv nodes, each the row of its layer as the unfused build reports
    it (what the search prices a subnet with)."""
    cin, mid, cout, hw = 16, 96, 16, 20
    path, _ = _export(_Inverted(cin, mid, cout), (1, cin, hw, hw), tmp_path)
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    rows = [r for r in build.layers if "dwpw" in r.kernel]
    assert [r.op for r in rows] == ["depthwise", "pointwise"]
    dw, pw = rows
    assert dw.kernel == pw.kernel
    assert dw.macs == hw * hw * mid * 9 and pw.macs == hw * hw * mid * cout
    assert len(dw.sources) == 1 and len(pw.sources) == 1 and dw.sources != pw.sources
    plain = compile_model(path, "host", tmp_path / "plain", sparse="dense", fuse_depthwise=False)
    unfused = [r for r in plain.layers if r.sources in (dw.sources, pw.sources)]
    assert [(r.op, r.shapes, r.macs, r.act_bytes, r.weight_bytes, r.out_bytes) for r in unfused] == \
        [(r.op, r.shapes, r.macs, r.act_bytes, r.weight_bytes, r.out_bytes) for r in rows]
    shares = call_shares(build.layers)
    i = build.layers.index(dw)
    assert shares[i] + shares[i + 1] == pytest.approx(1.0)
    assert 0 < shares[i] < 1 and all(s == 1.0 for j, s in enumerate(shares) if j not in (i, i + 1))


def test_measure_lists_a_merged_kernel_once_under_its_first_layer(tmp_path, cli):
    path, _ = _export(_Inverted(16, 96, 16), (1, 16, 20, 20), tmp_path)
    compile_model(path, "host", tmp_path / "build", sparse="dense")
    rc, out, err = cli("measure", tmp_path / "build", "--threads", "1", "--runs", "5")
    assert rc == 0, err
    merged = [line for line in out.splitlines() if "dw+pw" in line]
    assert len(merged) == 1 and "dw/dw.0/Conv" in merged[0] and "alike" not in merged[0]


def test_call_shares_leaves_ordinary_rows_whole():
    def row(op: str, kernel: str, macs: int) -> LayerCost:
        return LayerCost(op=op, shapes=(), macs=macs, act_bytes=0, weight_bytes=0, out_bytes=0, kernel=kernel)

    rows = [row("depthwise", "a", 100), row("pointwise", "b", 100), row("depthwise", "f", 30),
            row("pointwise", "f", 100)]
    shares = call_shares(rows)
    assert shares[:2] == [1.0, 1.0]
    # 30 / 0.15 against 100 / 0.5: the prior's efficiencies, cost/model.py
    assert shares[2:] == pytest.approx([0.5, 0.5])
    # a C package's kernel with the expanding layer in it, called twice (two identical blocks)
    three = [row("pointwise", "g", 100), row("depthwise", "g", 30), row("pointwise", "g", 200)]
    assert call_shares([*three, *three]) == pytest.approx([0.25, 0.25, 0.5] * 2)  # 200, 200 and 400 of 800


def test_what_does_not_merge(tmp_path):
    """A 7x7 map (under MIN_PIXELS) stays two kernels; so does a depthwise output that another kernel reads too."""
    path, _ = _export(_Inverted(16, 96, 16, 2), (1, 16, 14, 14), tmp_path)
    assert _merged(_kernels(path)) == []

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
            self.a, self.b = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1)

        def forward(self, x):
            y = torch.relu(self.dw(x))
            return self.a(y) * self.b(y)

    path, _ = _export(TwoReaders(), (1, 32, 16, 16), tmp_path)
    assert _merged(_kernels(path)) == []
    path, _ = _export(_Inverted(16, 96, 16), (1, 16, 16, 16), tmp_path)
    assert _merged(_kernels(path, fuse_depthwise=False)) == []


@pytest.mark.parametrize("k,hw,parts", [(3, 32, ["pointwise", "depthwise", "pointwise"]),
                                         (3, 33, ["depthwise", "pointwise"]),  # odd map
                                         (5, 32, ["depthwise", "pointwise"])])  # 5x5 window: 2.5x the work
def test_c_package_merges_the_expanding_layer_where_it_narrows(k, hw, parts, tmp_path):
    """In a C package (inline_padding) a 3x3 stride-2 block's expanding layer joins the merged kernel on maps of
    even size; elsewhere TVM computed the whole expanded map for every row (codegen/dwpw.py, expand_too)."""
    path, _ = _export(_Inverted(8, 32, 8, 2, k), (1, 8, hw, hw), tmp_path)
    funcs = _kernels(path, inline_padding=True)
    merged = [f for f in funcs.values() if (f.attrs or {}).get("edgeprune.op") == dwpw.OP_NAME]
    assert [list(f.attrs[dwpw.PART_OPS]) for f in merged] == [parts]
    assert all("tirx.is_scheduled" in f.attrs for f in merged)


def test_pointwise_reading_the_depthwise_output_twice(tmp_path):
    """pw(y) + y: TVM fuses the add into the pointwise kernel, which reads y as its input and as the residual;
    merged, the residual is read from the tile of depthwise outputs, which holds every channel of its pixels."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
            self.pw = nn.Conv2d(32, 32, 1)

        def forward(self, x):
            y = torch.relu(self.dw(x))
            return self.pw(y) + y

    path, x = _export(Residual(), (1, 32, 16, 16), tmp_path)
    assert len(_merged(_kernels(path))) == 1
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    ours = Session(build).run([x])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


def test_c_package_ram_shrinks(tmp_path):
    """The tensors the merged layers pass between them leave the C package's arena; what is left of them is rows,
    the merged kernels' workspace, placed in the arena too (alive during their call only). The second block has
    stride 2, so in a C package its expanding layer is merged too, and its expanded map never exists either."""
    path, _ = _export(nn.Sequential(_Inverted(16, 96, 16), _Inverted(16, 96, 24, 2)), (1, 16, 32, 32), tmp_path)
    fused = compile_model(path, "cortex-a7", tmp_path / "fused", fmt="c")
    plain = edgeprune.compile(path, "cortex-a7", tmp_path / "plain", format="c", fuse_depthwise=False)  # the API's
    f, p = fused.memory, plain.memory
    assert p["workspace_bytes"] == 0
    # three expanded rows of the second block (32 pixels x 96 channels) and one depthwise row (16 x 96)
    assert 0 < f["workspace_bytes"] <= (3 * 32 + 16) * 96 * 4
    assert f["ram_bytes"] == f["arena_bytes"] < p["ram_bytes"] == p["arena_bytes"]
    # unmerged, the first block's expanded map and depthwise output (384 KiB each) were alive together: 832 KiB;
    # merged, the peak is that expanded map with the block's input and output (the residual): 524 KiB
    assert f["ram_bytes"] <= 0.65 * p["ram_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("target,device", [("cortex-a7", "qemu://cortex-a7"), ("cortex-a53", "qemu://cortex-a53"),
                                           ("cortex-m7", "qemu://cortex-m7")])
def test_c_package_on_arm_matches_onnxruntime(target, device, tmp_path):
    """NEON (armv7, aarch64) and a scalar FPU: the merged kernels as the C package runs them under qemu, one of
    them with the expanding layer in it."""
    from edgeprune.measure import package

    net = nn.Sequential(_Inverted(8, 48, 8), _Inverted(8, 48, 16, 2, 3, nn.Hardswish))
    path, x = _export(net, (1, 8, 24, 24), tmp_path)
    build = compile_model(path, target, tmp_path / "pkg", fmt="c")
    # both blocks merged; in a C package the second's expanding layer too (its depthwise layer has stride 2)
    assert [r.op for r in build.layers if "dwpw" in r.kernel] == ["depthwise", "pointwise", "pointwise", "depthwise",
                                                                   "pointwise"]
    ours = package.run(build, [x], device)[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


def test_search_ram_estimate_merges_as_codegen_does():
    """The search estimates a C package's RAM without importing codegen (search/memory.py): its merge threshold is
    codegen's."""
    from edgeprune.search.memory import MERGE_MIN_PIXELS

    assert MERGE_MIN_PIXELS == dwpw.MIN_PIXELS
