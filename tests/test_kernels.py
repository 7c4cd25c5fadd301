"""The kernel library, one operator at a time, against onnxruntime.

Each case is a one- or two-layer network exported to ONNX, compiled for the host and compared with onnxruntime on the
same file. Shapes are chosen to hit the schedule's corner cases: channel counts that no SIMD width divides, odd
widths, strides, dilation, groups, and wide reductions. Tolerance: 1e-4 relative to the output's scale, the
accuracy fp32 reassociation allows for reductions of a few thousand terms.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeprune.codegen.build import compile_model
from edgeprune.codegen.importers import import_model
from edgeprune.codegen.lower import schedule_module
from edgeprune.measure.local import Session
from edgeprune.targets import get_target


def _check(model: nn.Module, shape: tuple[int, ...], tmp_path, rtol: float = 1e-4) -> list[str]:
    model = model.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
    build = compile_model(path, "host", tmp_path / "build")
    ours = Session(build).run([x.numpy()])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale)
    return build.unscheduled


CONVS = [
    # (in, out, kernel, stride, padding, dilation, groups, size)
    (3, 16, 3, 2, 1, 1, 1, 33),  # stem: 3 input channels, odd size
    (16, 24, 1, 1, 0, 1, 1, 14),  # pointwise, 24 outputs: no 16-lane tile
    (24, 24, 3, 1, 1, 1, 24, 15),  # depthwise, odd width
    (32, 32, 3, 2, 1, 1, 32, 16),  # depthwise, stride 2
    (20, 30, 5, 2, 2, 1, 1, 19),  # 5x5 stride 2, channels divisible by no vector width
    (16, 16, 3, 1, 2, 2, 1, 12),  # dilation 2
    (12, 24, 3, 1, 1, 1, 3, 10),  # grouped, 3 groups
    (8, 8, 7, 1, 3, 1, 8, 9),  # depthwise 7x7
    (64, 40, 3, 1, 0, 1, 1, 9),  # no padding
    (512, 64, 1, 1, 0, 1, 1, 4),  # long reduction
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,size", CONVS)
def test_conv2d_matches_onnxruntime(cin, cout, k, stride, pad, dil, groups, size, tmp_path):
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dil, groups), nn.ReLU6())
    unscheduled = _check(model, (1, cin, size, size), tmp_path)
    # Only the NCHW<->NHWC edges of a one-layer network may be left to the generic rule; the conv never is.
    assert not [n for n in unscheduled if "conv" in n]


class _Tail(nn.Module):
    """Residual add with hardswish, then pools and a dense layer: epilogues and the non-conv reductions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, 1, 1)
        self.b = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = nn.functional.hardswish(self.b(torch.relu(self.a(x))) + x)
        y = nn.functional.max_pool2d(y, 3, 2, 1)
        y = nn.functional.avg_pool2d(y, 2)
        return self.fc(torch.flatten(y.mean((2, 3)), 1))


def test_epilogue_pool_dense_match_onnxruntime(tmp_path):
    _check(_Tail(), (1, 16, 20, 20), tmp_path)


def test_every_conv_kernel_is_scheduled():
    """The rule must fit all of MobileNetV2's kernels: an unscheduled conv runs ~100x slower."""
    from edgeprune.models.reference import MobileNetV2

    model = MobileNetV2(0.35).eval()
    x = torch.randn(1, 3, 64, 64)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"])
        mod = schedule_module(import_model(path).mod, get_target("host").tvm_target())
    from tvm import tirx

    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert any("conv2d" in n for n in funcs)
    raw = [n for n, f in funcs.items() if "tirx.is_scheduled" not in (f.attrs or {})]
    assert raw == []
