"""int8 .tflite export (issue 14, deliverable 4): a quantized network's integer program written as a .tflite
(codegen/tflite_export.py) that ai-edge-litert runs, against the program's interpreter and our build.

Tolerance: one step of the output grid (LiteRT recomputes the same multipliers from the scales and rounds twice),
and the same top-1. bench/tflite_int8.py checks the issue's figure (>= 99% top-1 agreement on the validation split)
on the demo's subnet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quantize import RES, Tiny, _images
from torch import nn

from edgeprune.codegen.tflite_export import export_tflite
from edgeprune.compress import integer as I
from edgeprune.compress import quantize as Q

pytest.importorskip("ai_edge_litert.interpreter")


class Pools(nn.Module):
    """What Tiny has not: a standalone ReLU, max pooling (padded), a dilated conv, a flatten of a 2x2 map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv = nn.Conv2d(8, 12, 3, 1, 2, dilation=2)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 2 * 2, 3)

    def forward(self, x):
        y = self.pool(self.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool2(torch.relu(self.conv(y))), 1))


def _litert(path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    d, od = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(d["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))  # the export's input is NHWC
    it.invoke()
    return it.get_tensor(od["index"])


@pytest.mark.parametrize("model,keep_float", [(Tiny, ()), (Pools, ()), (Tiny, ("dw.0", "classifier"))],
                         ids=["tiny", "pools", "tiny-mixed"])
def test_exported_tflite_runs_in_litert_as_the_program(model, keep_float, tmp_path):
    """int8 layers, and with some kept in fp32 (mixed precision: DEQUANTIZE, float layer, QUANTIZE)."""
    torch.manual_seed(0)
    x, _ = _images(48)
    q = Q.quantize(model().eval(), x, keep_float=keep_float)
    prog = I.program(q, (1, 3, RES, RES))
    assert sum(op.kind == "fconv" for op in prog.ops) == len(keep_float)
    path = export_tflite(prog, tmp_path / "net.tflite")
    step = prog.ops[-1].params["scale"]
    agree = 0
    for i in range(16):
        xi = x[i:i + 1].numpy()
        ours, theirs = I.run(prog, xi), _litert(path, xi)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= step * 1.001
        agree += int(ours.argmax() == theirs.argmax())
    assert agree >= 15
    # and our own import reads it back (layers in fp32 too): the same program but for TFLite's recomputed constants
    import tflite

    from edgeprune.codegen.tflite_int8 import lower

    m = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    back, spec, _, _ = lower(path, m, m.Subgraphs(0))
    assert spec.shape == (1, RES, RES, 3)
    assert [op.kind for op in back.ops if op.kind not in ("flatten",)] == \
        [op.kind for op in prog.ops if op.kind not in ("flatten",)]
    for i in range(4):
        xi = x[i:i + 1].numpy()
        assert np.abs(I.run(back, xi) - I.run(prog, xi)).max() <= step * 1.001


def test_export_refuses_what_tflite_cannot_hold(tmp_path):
    from edgeprune.artifacts import IntegerOp, IntegerProgram
    from edgeprune.errors import UserError

    q = IntegerOp("quantize", ["x"], "q", {"scale": 0.1, "zero_point": 0})
    out = IntegerOp("dequantize", ["y"], "output", {"scale": 0.1, "zero_point": 0})
    relu = {"multiplier": 2 ** 30, "shift": 30, "input_zero_point": 0, "output_zero_point": 0, "output_scale": 0.1}
    for op, what in [(IntegerOp("binary", ["q"], "y", {}, "layer3"), "layer3"),  # a kind TFLite has no form of
                     (IntegerOp("requant", ["q"], "y", {**relu, "act_min": -5, "act_max": 9}, "clamp4"), "clamp4")]:
        with pytest.raises(UserError) as e:
            export_tflite(IntegerProgram("x", (1, 3, 4, 4), [q, op, out], "output"), tmp_path / "x.tflite")
        assert what in str(e.value) and "\n" not in str(e.value)
