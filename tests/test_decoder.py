"""Decoder operators (issue 16): ConvTranspose at every stride, padding, output padding and dilation, Resize
(nearest and bilinear, by scale and by size), against onnxruntime within 1e-4 (helpers.assert_close); and the
constructs that still cannot compile, or must not, refused in one line naming the node or tensor.
(The FPN-style decoder is the zoo's fpn_decoder: test_zoo_numerics, test_cpackage and test_arm_compile run it.)"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from edgeprune.codegen.build import compile_model
from edgeprune.errors import UserError
from edgeprune.measure import package
from edgeprune.measure.local import Session
from edgeprune.models import zoo

# (kernel, stride, padding, output padding, dilation): strides 1-3, kernels smaller than, equal to and not a
# multiple of the stride, output padding, dilation
TRANSPOSED = [(3, 2, 1, 1, 1), (4, 2, 1, 0, 1), (2, 2, 0, 0, 1), (3, 1, 1, 0, 1), (5, 3, 2, 2, 1),
              (3, 2, 0, 1, 2), (1, 2, 0, 1, 1), (3, 3, 0, 0, 1)]


class Decoders(nn.Module):
    """Every case as its own output, each fed by a conv so it is fused and scheduled like a real layer's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1)
        self.ts = nn.ModuleList([nn.ConvTranspose2d(6, 5, k, s, p, output_padding=op, dilation=d, bias=i % 2 == 0)
                                 for i, (k, s, p, op, d) in enumerate(TRANSPOSED)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.relu(self.stem(x))
        outs = [torch.relu(t(x)) if i % 3 == 0 else t(x) for i, t in enumerate(self.ts)]
        outs += [F.interpolate(x, scale_factor=2, mode="nearest"), F.interpolate(x, size=(13, 9), mode="nearest"),
                 F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                 F.interpolate(x, size=(13, 9), mode="bilinear", align_corners=True),
                 F.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)]
        return tuple(outs)


def _model(tmp_path, module: nn.Module, shape=(1, 3, 7, 6)):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return zoo.export_onnx(module.eval(), x, tmp_path / "m.onnx"), x.numpy()


@pytest.mark.slow
def test_transposed_convs_and_resizes_match_onnxruntime(tmp_path):
    torch.manual_seed(0)
    path, x = _model(tmp_path, Decoders())
    build = compile_model(path, "host", tmp_path / "b")
    assert build.unscheduled == []  # every kernel took a schedule rule
    refs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    ours = Session(build).run([x])
    assert len(ours) == len(refs) == len(TRANSPOSED) + 5
    for got, ref in zip(ours, refs):
        assert_close(got, ref)
    # each transposed conv is one fused convolution kernel, named after its ONNX node
    convs = [r for r in build.layers if r.op in ("conv", "pointwise")]
    assert sum(any("ConvTranspose" in s for s in r.sources) for r in convs) == len(TRANSPOSED)


@pytest.mark.slow
def test_transposed_conv_in_a_c_package(tmp_path):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ConvTranspose2d(3, 8, 3, 2, 1, output_padding=1)
            self.c = nn.Conv2d(8, 4, 3, 1, 1)

        def forward(self, x):
            return self.c(torch.relu(self.t(x)) + F.interpolate(x, scale_factor=2).mean(1, keepdim=True))

    path, x = _model(tmp_path, Up(), (1, 3, 9, 8))
    build = compile_model(path, "host", tmp_path / "pkg", fmt="c")
    (got,) = package.run(build, [x], "local")
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert_close(got, ref)


def test_grouped_transposed_conv_is_refused_naming_the_node(tmp_path):
    path, _ = _model(tmp_path, nn.ConvTranspose2d(4, 4, 3, 2, groups=2), (1, 4, 5, 5))
    with pytest.raises(UserError, match=r"ConvTranspose with group=2 at node '.*ConvTranspose.*'") as e:
        compile_model(path, "host", tmp_path / "b")
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


def test_resize_to_a_fractional_size_is_refused_naming_the_node(tmp_path):
    class Frac(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=False)

    path, _ = _model(tmp_path, Frac())
    with pytest.raises(UserError, match=r"Resize at node '.*' scales \[1, 3, 7, 6\] .* fractional size"):
        compile_model(path, "host", tmp_path / "b")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1, 2, 0, 0] = float(bad)
    path, _ = _model(tmp_path, conv)
    name = next(t.name for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 4)
    word = "NaN" if np.isnan(bad) else "Inf"
    with pytest.raises(UserError, match=rf"weight tensor '{name}' holds {word} \(1 of 108 values\)"):
        compile_model(path, "host", tmp_path / "b")
    pt2 = zoo.export_pt2(conv, torch.randn(1, 3, 7, 6), tmp_path / "m.pt2")
    with pytest.raises(UserError, match=rf"weight tensor 'weight' holds {word}"):
        compile_model(pt2, "host", tmp_path / "b")


def test_an_operator_no_kernel_lowers_is_named_not_reported_with_tvms_text(tmp_path):
    """A 3-D transposed conv in channels-last layout: nothing legalizes it. The error names the operator in one
    line, without TVM's text (the importers name the node when it comes from an ONNX file)."""
    from tvm import relax

    from edgeprune.artifacts import TensorSpec
    from edgeprune.codegen.importers import ImportedModel

    bb = relax.BlockBuilder()
    x = relax.Var(name="x", ty=relax.TensorType(shape=[1, 3, 6, 6, 4], dtype="float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.ones((4, 4, 3, 3, 3), "float32"))
            y = bb.emit(relax.op.nn.conv3d_transpose(x, w, strides=2, data_layout="NDHWC"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    model = ImportedModel(bb.get(), [TensorSpec("x", (1, 3, 6, 6, 4), "float32")], "handmade", "onnx", "0" * 64)
    with pytest.raises(UserError, match=r"operator ConvTranspose cannot be compiled for host .*relax\.nn\."
                                        r"conv3d_transpose") as e:
        compile_model(model, "host", tmp_path / "b")
    assert "\n" not in str(e.value) and "Metadata" not in str(e.value) and "report" not in str(e.value)
