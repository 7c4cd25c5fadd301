"""The C package (--format c): every zoo network built for host, cortex-a7 and cortex-a53, run natively or under
qemu-user, matches onnxruntime on the same .onnx file (1e-4 relative to the output's scale); the memory plan
reuses the arena; the package is plain C with no heap.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from helpers import assert_close, assert_one_line_error

from edgeprune.codegen.build import compile_model
from edgeprune.codegen.cpackage import Plan, Step, Tensor, plan_memory
from edgeprune.errors import UserError
from edgeprune.measure import package
from edgeprune.models import zoo

# cortex-m7: booted on qemu-system-arm's mps2-an500 board (bare metal, semihosting I/O)
TARGETS = {"host": "local", "cortex-a7": "qemu://cortex-a7", "cortex-a53": "qemu://cortex-a53",
           "cortex-m7": "qemu://cortex-m7"}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    files = {}
    for name, (_, sizes) in zoo.ZOO.items():
        model, x = zoo.make(name, sizes[0])
        files[name] = (zoo.export_onnx(model, x, root / f"{name}.onnx"), x.numpy())
    return files


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_matches_onnxruntime(name, target, onnx_files, tmp_path):
    path, x = onnx_files[name]
    build = compile_model(path, target, tmp_path / "pkg", fmt="c")
    ours = package.run(build, [x], TARGETS[target])[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert_close(ours, ref)
    assert build.memory["arena_bytes"] <= build.memory["intermediate_bytes"]


def test_m7_network_beyond_the_emulated_board_is_a_library_without_a_test_program(tmp_path):
    """A 600x600 image and its conv output (10 MB of arena): more than the mps2-an500's 4 MiB of RAM. The library
    is built (a real board may have the room), the test program is not, and a run says why instead of failing to
    link."""
    import torch

    big = torch.nn.Conv2d(3, 4, 1)
    path = zoo.export_onnx(big.eval(), torch.zeros(1, 3, 600, 600), tmp_path / "big.onnx")
    build = compile_model(path, "cortex-m7", tmp_path / "pkg", fmt="c")
    assert (tmp_path / "pkg" / f"lib{build.memory['package']}.a").is_file()
    assert "does not fit the emulated board" in build.memory["test_program"]
    with pytest.raises(UserError, match="has no test program: the network does not fit the emulated board"):
        package.run(build, [np.zeros((1, 3, 600, 600), np.float32)], "qemu://cortex-m7")


@pytest.mark.slow
def test_package_is_plain_c_and_builds_with_cmake(onnx_files, tmp_path):
    path, _ = onnx_files["resnet_tiny"]
    compile_model(path, "host", tmp_path / "pkg", fmt="c", package_name="net")
    model_c = (tmp_path / "pkg" / "model.c").read_text() + (tmp_path / "pkg" / "edgeprune_rt.c").read_text()
    for banned in ("malloc", "calloc", "free(", "pthread", "fopen", "printf"):
        assert banned not in model_c, banned
    header = (tmp_path / "pkg" / "net.h").read_text()
    for macro in ("NET_BUILD_ID", "NET_INPUT_SHAPE", "NET_OUTPUT_SHAPE", "NET_ARENA_BYTES", "NET_WEIGHT_BYTES"):
        assert re.search(rf"#define {macro} ", header), macro
    assert "int net_run(const float *in, float *out);" in header
    build = tmp_path / "cmake"
    subprocess.run(["cmake", "-S", tmp_path / "pkg", "-B", build], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build], check=True, capture_output=True)
    assert (build / "test_net").is_file()


def test_memory_plan_reuses_dead_tensors():
    """A chain a -> b -> c -> d: a and c can share, b and d can share."""
    t = {n: Tensor(n, (1024,), "float32", "temp") for n in "abcd"}
    t["x"] = Tensor("x", (1024,), "float32", "input")
    for i, n in enumerate("abcd"):
        t[n].first = i
    steps = [Step("k", ["x", "a"]), Step("k", ["a", "b"]), Step("k", ["b", "c"]), Step("k", ["c", "d"])]
    plan = Plan(steps, t, ["x"], ["d"])
    plan_memory(plan)
    assert plan.intermediate_bytes == 4 * 4096
    assert plan.arena_bytes <= 3 * 4096  # input plus two alternating buffers
    live = [(t[n].offset, t[n].first, t[n].last) for n in "abcd"]
    for i, (o1, f1, l1) in enumerate(live):  # no two tensors alive at once overlap
        for o2, f2, l2 in live[i + 1:]:
            if not (l1 < f2 or l2 < f1):
                assert abs(o1 - o2) >= 4096


def test_run_on_the_wrong_device_is_refused(onnx_files, tmp_path, cli):
    path, x = onnx_files["resnet_tiny"]
    compile_model(path, "cortex-a53", tmp_path / "pkg", fmt="c")
    np.save(tmp_path / "x.npy", x)
    for device, needle in (("local", "qemu://cortex-a53"), ("qemu://cortex-a7", "qemu://cortex-a53"),
                           ("rpc://x", "unknown device")):
        rc, _, err = cli("run", tmp_path / "pkg", "--device", device, "-i", tmp_path / "x.npy", "-o",
                         tmp_path / "y.npy")
        assert rc == 2
        assert_one_line_error(err, needle)
        assert not (tmp_path / "y.npy").exists()


@pytest.mark.slow
def test_debug_layers_names_the_first_diverging_layer(onnx_files, tmp_path, cli):
    path, x = onnx_files["resnet_tiny"]
    np.save(tmp_path / "x.npy", x)
    compile_model(path, "cortex-a7", tmp_path / "pkg", fmt="c", package_name="net")
    args = ["run", tmp_path / "pkg", "--device", "qemu://cortex-a7", "-i", tmp_path / "x.npy", "-o",
            tmp_path / "y.npy", "--debug-layers", "--debug-dir", tmp_path / "dbg"]
    rc, out, err = cli(*args)
    assert rc == 0, err
    assert "layers match the reference" in out
    steps = len(list((tmp_path / "dbg" / "device").glob("layer_*.bin")))
    assert steps == len(list((tmp_path / "dbg" / "reference").glob("layer_*.bin"))) > 3

    # Corrupt the last constant (the classifier's bias): only the last layer may diverge, and it must be named.
    blob = bytearray((tmp_path / "pkg" / "weights.bin").read_bytes())
    blob[-16:] = np.full(4, 1e3, np.float32).tobytes()
    (tmp_path / "pkg" / "weights.bin").write_bytes(bytes(blob))
    rc, out, err = cli(*args)
    assert rc == 1, err
    first = re.search(r"layer (\d+) \((\w+)\) is the first to diverge", out)
    assert first, out
    assert int(first.group(1)) == steps - 1


@pytest.mark.slow
def test_mobilenetv2_arena_is_at_most_60_percent_of_its_intermediates(tmp_path, cli):
    """The memory-planner goal, on the network it names; and no padded copies as workspace: padding is inlined in C
    packages (padded copies asked for 4.8 MB here). What workspace is left is the merged kernels' rows
    (codegen/dwpw.py), at most three expanded rows of the first stride-2 block and a row of its depthwise output
    (3 x 112 x 96 + 56 x 96 floats); the figure is read from the lowered kernels, so it is what the package really
    requests, and it lies in the arena."""
    rc, out, err = cli("compile", "builtin:mobilenetv2-1.0-224", "--format", "c", "-o", tmp_path / "pkg", "--json")
    assert rc == 0, err
    memory = json.loads(out[out.index("{"):])["memory"]
    assert memory["arena_bytes"] <= 0.6 * memory["intermediate_bytes"], memory
    assert memory["workspace_bytes"] <= (3 * 112 * 96 + 56 * 96) * 4 + 4096, memory  # rows, a register tile
    assert memory["ram_bytes"] == memory["arena_bytes"]
