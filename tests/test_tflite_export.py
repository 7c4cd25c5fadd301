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

from edgeprune.codegen.importers import import_model
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


@pytest.mark.parametrize("model", [Tiny, Pools])
def test_exported_tflite_runs_in_litert_as_the_program(model, tmp_path):
    torch.manual_seed(0)
    x, _ = _images(48)
    q = Q.quantize(model().eval(), x)
    prog = I.program(q, (1, 3, RES, RES))
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
    # and our own import reads it back: the same layers, the same arithmetic but for LiteRT's recomputed constants
    back = import_model(path)
    assert [s.shape for s in back.inputs] == [(1, RES, RES, 3)]


def test_export_refuses_what_tflite_cannot_hold(tmp_path):
    from edgeprune.artifacts import IntegerOp, IntegerProgram
    from edgeprune.errors import UserError

    prog = IntegerProgram("x", (1, 3, 4, 4), [IntegerOp("quantize", ["x"], "q", {"scale": 0.1, "zero_point": 0}),
                                             IntegerOp("fconv", ["q"], "y", {}, "layer3"),
                                             IntegerOp("dequantize", ["y"], "output", {"scale": 0.1,
                                                                                      "zero_point": 0})], "output")
    with pytest.raises(UserError) as e:
        export_tflite(prog, tmp_path / "x.tflite")
    assert "layer3" in str(e.value) and "\n" not in str(e.value)
