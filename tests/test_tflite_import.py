""".tflite import: a small model built without TensorFlow (tflite_builder.py, from the ``tflite`` package's
flatbuffer builders; ``litert_torch`` is not installed), run by the LiteRT interpreter as the reference, compiled
by edgeprune for the host and compared.

Tolerance (helpers.assert_close): 1e-4 relative to the output's scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, assert_one_line_error
from tflite_builder import TFLiteGraph

from edgeprune.codegen.build import compile_model
from edgeprune.codegen.importers import import_model
from edgeprune.errors import UserError
from edgeprune.measure.local import Session

SHAPE = (1, 12, 12, 3)  # NHWC; even, so SAME padding at stride 2 is uneven (none before, one after)


def _graph(seed: int = 0) -> TFLiteGraph:
    """CONV_2D (stride 2, SAME, fused RELU6) -> DEPTHWISE_CONV_2D -> ADD const (fused RELU) -> MUL by the conv."""
    rng = np.random.default_rng(seed)
    g = TFLiteGraph()
    x = g.input("input", SHAPE)
    y = g.conv2d(x, rng.standard_normal((8, 3, 3, 3)).astype("f4"), rng.standard_normal(8).astype("f4"), "conv",
                 stride=2, act="RELU6")
    z = g.depthwise_conv2d(y, rng.standard_normal((1, 3, 3, 8)).astype("f4"), rng.standard_normal(8).astype("f4"),
                           "dwconv")
    z = g.add(z, g.const("offset", rng.standard_normal(8).astype("f4")), "add", act="RELU")
    g.output(g.mul(z, y, "mul"))
    return g


def _interpret(path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _torch_reference(g: TFLiteGraph, x: np.ndarray) -> np.ndarray:
    """The same graph in PyTorch, to check that the builder writes what it means (layouts, padding, options)."""
    conv_w, conv_b, dw_w, dw_b, offset = (torch.from_numpy(t.data) for t in g.tensors if t.data is not None)
    xi = torch.from_numpy(x).permute(0, 3, 1, 2)
    # TFLite SAME at stride 2 on 12 px: output 6, total padding 1, all of it at the end (bottom/right)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(xi, (0, 1, 0, 1)), conv_w.permute(0, 3, 1, 2), conv_b,
                                   stride=2).clamp(0, 6)
    z = torch.nn.functional.conv2d(y, dw_w.permute(3, 0, 1, 2), dw_b, padding=1, groups=8)
    z = torch.relu(z + offset.view(1, 8, 1, 1)) * y
    return z.permute(0, 2, 3, 1).numpy()


def test_litert_torch_is_not_needed():
    """The builder stands in for litert_torch; if that ever appears it can replace it, nothing here depends on it."""
    pytest.importorskip("flatbuffers")
    pytest.importorskip("ai_edge_litert.interpreter")


def test_builder_writes_a_model_the_interpreter_runs(tmp_path):
    g = _graph()
    path = g.save(tmp_path / "m.tflite")
    assert path.read_bytes()[4:8] == b"TFL3"
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    ref = _interpret(path, x)
    assert ref.shape == (1, 6, 6, 8)
    assert float(np.abs(ref).max()) > 1.0
    assert_close(ref, _torch_reference(g, x))


@pytest.mark.slow
def test_tflite_compiles_and_matches_the_interpreter(tmp_path):
    path = _graph().save(tmp_path / "m.tflite")
    build = compile_model(path, "host", tmp_path / "build")
    assert [(s.name, s.shape, s.dtype) for s in build.inputs] == [("input", SHAPE, "float32")]
    assert [s.shape for s in build.outputs] == [(1, 6, 6, 8)]
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    (ours,) = Session(build).run([x])
    assert_close(ours, _interpret(path, x))


def test_unsupported_tflite_operator_names_the_node(tmp_path):
    g = TFLiteGraph()
    x = g.input("input", (1, 4, 4, 3))
    y = g.custom(x, "foo_node", "FooBar")
    g.output(g.relu(y, "relu"))
    path = g.save(tmp_path / "custom.tflite")
    with pytest.raises(UserError) as e:
        import_model(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "foo_node" in msg and ("CUSTOM" in msg or "FooBar" in msg), msg


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a flatbuffer at all, just text" * 4],
                         ids=["empty", "zeros", "text"])
def test_damaged_tflite_is_one_line(tmp_path, cli, content):
    path = tmp_path / "bad.tflite"
    path.write_bytes(content)
    out = tmp_path / "out"
    rc, stdout, err = cli("compile", path, "-o", out)
    assert rc == 2 and stdout == ""
    assert_one_line_error(err, "bad.tflite")
    assert not out.exists()


def test_tflite_without_identifier_is_refused(tmp_path, cli):
    data = bytearray(_graph().to_bytes())
    data[4:8] = b"XXXX"
    path = tmp_path / "noid.tflite"
    path.write_bytes(bytes(data))
    rc, _, err = cli("compile", path, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(err, "TFL3")
    assert not (tmp_path / "out").exists()
