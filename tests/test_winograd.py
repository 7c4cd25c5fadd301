"""Winograd convolution (codegen/winograd.py, kernels/winograd.py): the transforms in numpy, then small networks
compiled for the host against onnxruntime on the same .onnx file.

Tolerance: 1e-4 of the output's largest magnitude (not floored at 1 as helpers.assert_close is: these outputs are
O(1) or smaller, and a floor would hide a Winograd error of that size). F(4,3) in fp32 measures ~5e-6 here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from tvm import tirx

from edgeprune.codegen import winograd
from edgeprune.codegen.build import compile_model
from edgeprune.codegen.importers import import_model
from edgeprune.codegen.lower import schedule_module
from edgeprune.measure.local import Session
from edgeprune.models import zoo
from edgeprune.targets import get_target

RTOL = 1e-4


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_compute_a_correlation(m):
    """A^T [(G g G^T) . (B^T d B)] A is the 3x3 correlation of one (m+2)^2 tile, in float64."""
    bt, _, at = winograd.matrices(m)
    rng = np.random.default_rng(0)
    d = rng.standard_normal((m + 2, m + 2))
    g = rng.standard_normal((3, 3))
    u = winograd.transform_weight(g[:, :, None, None], m)[:, :, 0, 0]
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


class _Block(nn.Module):
    """A residual block: conv, bias + ReLU; conv, bias + residual add + ReLU (the epilogues Winograd must fuse)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, 1, 1)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y)


def _export(model: nn.Module, shape: tuple[int, ...], tmp_path):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return zoo.export_onnx(model.eval(), x, tmp_path / "m.onnx"), x.numpy()


def _kernels(path, **kw) -> dict[str, tirx.PrimFunc]:
    mod = schedule_module(import_model(path).mod, get_target("host").tvm_target(), **kw)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.mark.parametrize("cin,cout,h,w,m", [
    (64, 64, 8, 8, 4),  # whole tiles
    (64, 96, 9, 7, 4),  # ragged in both directions
    (80, 64, 13, 10, 4),  # channels no 16-lane vector divides
    (8, 24, 6, 5, 4),  # few channels (8-lane vectors), 5 = the smallest map that qualifies
    (64, 64, 9, 7, 2),  # F(2,3), ragged
])
def test_residual_block_matches_onnxruntime(cin, cout, h, w, m, tmp_path, monkeypatch):
    monkeypatch.setattr(winograd, "tile_size", lambda *_: m)
    path, x = _export(_Block(cin, cout), (1, cin, h, w), tmp_path)
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    assert build.unscheduled == []
    ours = Session(build).run([x])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


class _Fire(nn.Module):
    """SqueezeNet's expand: a 1x1 and a 3x3 branch concatenated, so fusion puts the concat after the transform."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.e1 = nn.Conv2d(cin, cout, 1)
        self.e3 = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x):
        return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)


def test_transforms_are_named_after_their_layer(tmp_path):
    """`measure` and the report name each kernel's layers: the transforms are the Conv node's work, like its GEMM."""
    path, _ = _export(_Block(64, 64), (1, 64, 8, 8), tmp_path)
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    rows = [r for r in build.layers if "winograd" in r.kernel]
    assert len(rows) == 6  # two convolutions, three kernels each
    for first in (0, 3):
        names = {r.sources for r in rows[first:first + 3]}
        assert len(names) == 1 and len(next(iter(names))) == 1
    assert rows[0].sources != rows[3].sources


def test_concatenated_branch_matches_onnxruntime(tmp_path):
    path, x = _export(_Fire(16, 64), (1, 16, 11, 9), tmp_path)
    build = compile_model(path, "host", tmp_path / "build", sparse="dense")
    assert build.unscheduled == []
    ours = Session(build).run([x])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


def test_kernels_are_winograd_and_tagged_as_the_convolution(tmp_path):
    cin, cout, size = 64, 64, 9
    path, _ = _export(_Block(cin, cout), (1, cin, size, size), tmp_path)
    funcs = _kernels(path)
    gemms = [f for n, f in funcs.items() if "winograd_gemm" in n]
    assert gemms and not [n for n in funcs if "conv2d" in n]  # (both convs' GEMMs may be one function)
    assert all("tirx.is_scheduled" in (f.attrs or {}) for f in funcs.values())
    for f in gemms:  # the direct convolution's FLOPs, so rates compare with the direct kernel's
        assert str(f.attrs["edgeprune.op"]) == "conv"
        assert int(f.attrs["edgeprune.flops"]) == 2 * size * size * cout * cin * 9
    # the epilogue (bias, residual add, ReLU) is fused into the output transform, not a pass of its own
    assert not [n for n in funcs if n.startswith(("add", "relu", "fused_add"))]


@pytest.mark.parametrize("cin,stride,size", [(4, 1, 16), (64, 2, 16), (64, 1, 4)])
def test_small_or_strided_convs_stay_direct(cin, stride, size, tmp_path):
    path, _ = _export(nn.Conv2d(cin, 64, 3, stride, 1), (1, cin, size, size), tmp_path)
    assert not [n for n in _kernels(path) if "winograd" in n]


def test_f23_where_the_f43_weight_is_large_and_barely_reused():
    assert winograd.tile_size(7, 7, 512, 512) == 2  # F(4,3): 36 MiB of weight for 4 tiles
    assert winograd.tile_size(14, 14, 512, 512) == 4  # 16 tiles
    assert winograd.tile_size(7, 7, 256, 256) == 4  # 9 MiB


def test_c_packages_stay_direct(tmp_path):
    """A C package inlines padding to save RAM; Winograd's tiles would be workspace again, its weights 4x flash."""
    path, _ = _export(_Block(64, 64), (1, 64, 8, 8), tmp_path)
    assert not [n for n in _kernels(path, inline_padding=True) if "winograd" in n]
