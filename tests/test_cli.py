"""The command line: every user mistake is one line on stderr, exit code 2, and nothing written.

The commands run in this process (edgeprune.cli.main), with stderr read at the file descriptor; one test runs the
installed ``edgeprune`` script to check the real exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import assert_close, assert_one_line_error
from onnx import TensorProto, helper

from edgeprune.models import zoo

RES = 35
EDGEPRUNE = Path(sys.executable).parent / "edgeprune"


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory) -> Path:
    model, x = zoo.make("pooling", RES)
    return zoo.export_onnx(model, x, tmp_path_factory.mktemp("model") / "pooling.onnx")


@pytest.fixture(scope="module")
def build_dir(model_onnx, tmp_path_factory) -> Path:
    from edgeprune.cli import main

    out = tmp_path_factory.mktemp("builds") / "pooling"
    assert main(["compile", str(model_onnx), "--target", "host", "-o", str(out)]) == 0
    return out


@pytest.fixture
def x_npy(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((1, 3, RES, RES)).astype(np.float32))
    return path


def _onnx_with_node(path: Path, node: onnx.NodeProto, opsets: list, out_shape: list) -> Path:
    relu = helper.make_node("Relu", ["input"], ["r"], name="relu0")
    graph = helper.make_graph(
        [relu, node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- targets


def test_targets_lists_the_devices(cli):
    rc, out, err = cli("targets")
    assert rc == 0 and err == ""
    table, _, folders = out.partition("\n\n")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert {"host", "cortex-a7", "cortex-a53"} <= set(rows)
    assert rows["cortex-a7"][6] == "shipped"
    assert folders.startswith("shipped: ") and "yours: " in folders


def test_targets_json(cli):
    rc, out, _ = cli("targets", "--json")
    assert rc == 0
    targets = {t["name"]: t for t in json.loads(out)}
    assert {"host", "cortex-a7", "cortex-a53"} <= set(targets)
    assert targets["cortex-a53"]["triple"].startswith("aarch64")


def test_unknown_target_is_one_line_listing_known_ones(cli, model_onnx, tmp_path):
    rc, out, err = cli("compile", model_onnx, "--target", "cortex-z9", "-o", tmp_path / "out")
    assert rc == 2 and out == ""
    assert_one_line_error(err, "cortex-z9", "host", "cortex-a7", "cortex-a53")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- compile: bad models


@pytest.mark.parametrize("kind", ["missing", "random-bytes", "empty", "random-pt2", "unknown-extension", "directory"])
def test_compile_bad_model_writes_nothing(cli, tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    if kind == "missing":
        model, needle = src / "nope.onnx", "does not exist"
    elif kind == "random-bytes":
        model, needle = src / "junk.onnx", "junk.onnx"
        model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        model, needle = src / "empty.onnx", "empty.onnx"
        model.write_bytes(b"")
    elif kind == "random-pt2":
        model, needle = src / "junk.pt2", "junk.pt2"
        model.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "unknown-extension":
        model, needle = src / "model.h5", ".h5"
        model.write_bytes(b"\x89HDF\r\n\x1a\n")
    else:
        model, needle = src / "dir.onnx", "dir.onnx"
        model.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    before = _listing(work)
    rc, out, err = cli("compile", model, "--target", "host", "-o", work / "out")
    assert rc == 2 and out == ""
    assert_one_line_error(err, needle)
    assert _listing(work) == before, "nothing may be written, not even a temporary directory"


@pytest.mark.parametrize("op", ["Det", "FooBar"])
def test_unsupported_onnx_operator_names_operator_and_node(cli, tmp_path, op):
    if op == "Det":
        node = helper.make_node("Det", ["r"], ["output"], name="det_node")
        opsets, out_shape = [helper.make_opsetid("", 17)], [1, 3]
    else:
        node = helper.make_node("FooBar", ["r"], ["output"], name="foo_node", domain="com.example")
        opsets, out_shape = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], [1, 3, 4, 4]
    model = _onnx_with_node(tmp_path / f"{op}.onnx", node, opsets, out_shape)
    rc, out, err = cli("compile", model, "-o", tmp_path / "out")
    assert rc == 2 and out == ""
    assert_one_line_error(err, op, node.name)
    assert not (tmp_path / "out").exists()


def test_dynamic_input_needs_input_shape(cli, tmp_path):
    relu = helper.make_node("Relu", ["input"], ["output"], name="relu0")
    graph = helper.make_graph(
        [relu], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    rc, _, err = cli("compile", model, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(err, "--input-shape")
    assert not (tmp_path / "out").exists()


def test_dynamic_input_with_input_shape_compiles_and_runs(cli, tmp_path):
    relu = helper.make_node("Relu", ["input"], ["output"], name="relu0")
    graph = helper.make_graph(
        [relu], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    rc, stdout, err = cli("compile", model, "--input-shape", "2,3,8,8", "-o", tmp_path / "out", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["inputs"] == [{"name": "input", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, _, err = cli("run", tmp_path / "out", "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.maximum(x, 0))


@pytest.mark.slow
def test_input_shape_conflicting_with_a_static_model(model_onnx, tmp_path):
    """The user sees exactly one line, on stderr (run as a subprocess: TVM prints from C++ and at exit)."""
    p = subprocess.run([str(EDGEPRUNE), "compile", str(model_onnx), "--input-shape", "1,3,48,48", "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert not (tmp_path / "out").exists()
    assert p.stdout == ""
    assert_one_line_error(p.stderr)


def test_two_inputs_two_outputs_by_name(cli, tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"), helper.make_node("Mul", ["a", "b"], ["p"],
                                                                                      name="mul")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "absp"]
    model = tmp_path / "two.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", vi[:2], vi[2:]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(model))
    rc, _, err = cli("compile", model, "-o", tmp_path / "out")
    assert rc == 0, err
    a, b = np.arange(4, dtype=np.float32).reshape(1, 4), np.full((1, 4), 3, np.float32)
    np.savez(tmp_path / "ab.npz", b=b, a=a)  # stored in the other order: matched by name
    rc, _, err = cli("run", tmp_path / "out", "-i", tmp_path / "ab.npz", "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err, ".npz")
    assert not (tmp_path / "y.npy").exists()
    rc, _, err = cli("run", tmp_path / "out", "-i", tmp_path / "ab.npz", "-o", tmp_path / "y.npz")
    assert rc == 0, err
    with np.load(tmp_path / "y.npz") as res:
        np.testing.assert_array_equal(res["output0"], a + b)
        np.testing.assert_array_equal(res["output1"], a * b)


# ---------------------------------------------------------------- compile: output directory


def test_compile_into_non_build_directory_is_refused(cli, model_onnx, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, stdout, err = cli("compile", model_onnx, "-o", out)
    assert rc == 2 and stdout == ""
    assert_one_line_error(err, str(out))
    assert _listing(out) == {"notes.txt"} and (out / "notes.txt").read_text() == "keep me"
    assert _listing(tmp_path) == {"mine"}


def test_compile_onto_a_file_is_refused(cli, model_onnx, tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    rc, _, err = cli("compile", model_onnx, "-o", out)
    assert rc == 2
    assert_one_line_error(err)
    assert out.read_text() == "x"


@pytest.mark.slow
def test_recompile_replaces_an_existing_build(cli, tmp_path):
    small, x = zoo.make("pooling", 35)
    large, y = zoo.make("pooling", 48)
    a = zoo.export_onnx(small, x, tmp_path / "a.onnx")
    b = zoo.export_onnx(large, y, tmp_path / "b.onnx")
    out = tmp_path / "builds" / "net"
    rc, stdout, _ = cli("compile", a, "-o", out, "--json")
    assert rc == 0
    first = json.loads(stdout)
    assert first["inputs"][0]["shape"] == [1, 3, 35, 35]
    (out / "stale.txt").write_text("from the first build")
    rc, stdout, err = cli("compile", b, "-o", out, "--json")
    assert rc == 0, err
    second = json.loads(stdout)
    assert second["inputs"][0]["shape"] == [1, 3, 48, 48]
    assert json.loads((out / "build.json").read_text())["source_sha256"] == second["source_sha256"]
    assert second["source_sha256"] != first["source_sha256"]
    assert not (out / "stale.txt").exists(), "the old build directory must be replaced, not merged into"
    assert _listing(out.parent) == {"net"}, "no staging or old directory may be left behind"
    # and the replaced build runs at its new shape
    xin = tmp_path / "x.npy"
    np.save(xin, y.numpy())
    rc, _, err = cli("run", out, "-i", xin, "-o", tmp_path / "y.npy")
    assert rc == 0, err
    assert_close(np.load(tmp_path / "y.npy"), large(y).detach().numpy())


# ---------------------------------------------------------------- run


def test_run_matches_onnxruntime(cli, build_dir, model_onnx, x_npy, tmp_path):
    out = tmp_path / "sub" / "y.npy"
    rc, stdout, err = cli("run", build_dir, "-i", x_npy, "-o", out, "--threads", "1")
    assert rc == 0, err
    assert str(out) in stdout
    (ref,) = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.load(x_npy)})
    assert_close(np.load(out), ref)
    assert [p.name for p in out.parent.iterdir()] == ["y.npy"], "no temporary file may be left"


def test_run_npz_in_and_out(cli, build_dir, x_npy, tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, input=np.load(x_npy))
    rc, _, err = cli("run", build_dir, "-i", npz, "-o", tmp_path / "y.npz")
    assert rc == 0, err
    with np.load(tmp_path / "y.npz") as res:
        assert res.files == ["output0"] and res["output0"].shape == (1, 10)


@pytest.mark.parametrize("case", ["shape", "rank", "dtype-float64", "dtype-int32"])
def test_run_wrong_input_writes_nothing(cli, build_dir, tmp_path, case):
    arr = {"shape": np.zeros((1, 3, RES + 1, RES), np.float32), "rank": np.zeros((3, RES, RES), np.float32),
           "dtype-float64": np.zeros((1, 3, RES, RES), np.float64),
           "dtype-int32": np.zeros((1, 3, RES, RES), np.int32)}[case]
    xin = tmp_path / "x.npy"
    np.save(xin, arr)
    out = tmp_path / "y.npy"
    rc, stdout, err = cli("run", build_dir, "-i", xin, "-o", out)
    assert rc == 2 and stdout == ""
    line = assert_one_line_error(err, "input")
    assert ("shape" in line) if case in ("shape", "rank") else ("float32" in line)
    assert _listing(tmp_path) == {"x.npy"}


def test_run_missing_input_file(cli, build_dir, tmp_path):
    rc, _, err = cli("run", build_dir, "-i", tmp_path / "nope.npy", "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err, "nope.npy")
    assert not (tmp_path / "y.npy").exists()


def test_run_input_that_is_not_an_array(cli, build_dir, tmp_path):
    xin = tmp_path / "x.npy"
    xin.write_text("1, 2, 3\n")
    rc, _, err = cli("run", build_dir, "-i", xin, "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err, "x.npy")
    assert not (tmp_path / "y.npy").exists()


def test_run_too_many_inputs(cli, build_dir, x_npy, tmp_path):
    rc, _, err = cli("run", build_dir, "-i", x_npy, "-i", x_npy, "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err, "1 input")
    assert not (tmp_path / "y.npy").exists()


def test_run_bad_output_suffix(cli, build_dir, x_npy, tmp_path):
    rc, _, err = cli("run", build_dir, "-i", x_npy, "-o", tmp_path / "y.txt")
    assert rc == 2
    assert_one_line_error(err, ".npy")
    assert not (tmp_path / "y.txt").exists()


@pytest.mark.parametrize("damage", ["not-a-build", "missing-build", "bad-json", "missing-library"])
def test_run_on_a_bad_build_directory(cli, build_dir, x_npy, tmp_path, damage):
    broken = tmp_path / "b"
    if damage == "not-a-build":
        broken.mkdir()
        (broken / "readme.txt").write_text("hi")
    elif damage == "bad-json":
        broken.mkdir()
        (broken / "build.json").write_text("{ not json")
    elif damage == "missing-library":
        broken.mkdir()
        (broken / "build.json").write_text((build_dir / "build.json").read_text())
    rc, _, err = cli("run", broken, "-i", x_npy, "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err)
    assert not (tmp_path / "y.npy").exists()


# ---------------------------------------------------------------- measure


def test_measure_json(cli, build_dir):
    rc, out, err = cli("measure", build_dir, "--device", "local", "--runs", "5", "--warmup", "1", "--threads", "1",
                       "--json")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1, "one JSON object on one line"
    m = json.loads(out)
    assert isinstance(m, dict)
    for key in ("median_ms", "p10_ms", "p90_ms", "layers"):
        assert key in m, key
    assert 0 < m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
    assert m["runs"] == 5 and m["threads"] == 1
    assert m["layers"] and all({"name", "ms", "share"} <= set(row) for row in m["layers"])
    assert abs(sum(row["share"] for row in m["layers"]) - 1) < 0.01


def test_measure_unknown_device(cli, build_dir):
    rc, _, err = cli("measure", build_dir, "--device", "pi4", "--runs", "1")
    assert rc == 2
    assert_one_line_error(err, "pi4")


def test_measure_missing_build(cli, tmp_path):
    rc, _, err = cli("measure", tmp_path / "nothing", "--runs", "1")
    assert rc == 2
    assert_one_line_error(err, "nothing")


# ---------------------------------------------------------------- the installed script


@pytest.mark.slow
def test_installed_script_exit_code_and_stderr(tmp_path):
    if not EDGEPRUNE.exists():
        pytest.skip(f"{EDGEPRUNE} is not installed")
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(os.urandom(512))
    p = subprocess.run([str(EDGEPRUNE), "compile", str(bad), "-o", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line_error(p.stderr, "junk.onnx")
    assert not (tmp_path / "out").exists()
