"""examples/firmware builds against a generated package for host, cortex-a7 and cortex-m7, runs (natively, under
qemu-arm, booted on qemu-system-arm's mps2-an500 with semihosting), and prints the class onnxruntime gives for the
same pixels. Also: the bare-metal cortex-m7 library links with nothing but mem* and libm (the compile itself checks
the library's undefined symbols)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeprune.codegen.build import compile_model
from edgeprune.models import zoo

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "firmware"
M7_FLAGS = "-O2 -mcpu=cortex-m7 -mthumb -mfpu=fpv5-d16 -mfloat-abi=hard"
CROSS = {  # target: (emulator, compiler, flags, link flags (None: the Makefile's))
    "host": ([], "cc", "-O2", None),
    "cortex-a7": (["qemu-arm", "-cpu", "cortex-a7"], "arm-linux-gnueabihf-gcc",
                  "-O2 -mcpu=cortex-a7 -mfpu=neon-vfpv4 -mfloat-abi=hard", None),
    # the package's start-up and linker script for the emulated board; printf goes out through semihosting
    "cortex-m7": (["qemu-system-arm", "-machine", "mps2-an500", "-nographic", "-monitor", "none", "-serial", "none",
                   "-semihosting-config", "enable=on,target=native", "-kernel"], "arm-none-eabi-gcc", M7_FLAGS,
                  "-nostartfiles --specs=rdimon.specs -T {pkg}/mps2_an500.ld {pkg}/startup_m7.c"),
}


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory):
    model, x = zoo.make("mobilenetv3", 32)
    return zoo.export_onnx(model, x, tmp_path_factory.mktemp("fw") / "net.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(CROSS))
def test_firmware_example_classifies_like_onnxruntime(target, model_onnx, tmp_path):
    emulator, cc, cflags, ldflags = CROSS[target]
    compile_model(model_onnx, target, tmp_path / "net", fmt="c", package_name="net")
    work = tmp_path / "example"
    shutil.copytree(EXAMPLE, work)
    link = [f"LDFLAGS={ldflags.format(pkg=tmp_path / 'net')}"] if ldflags else []
    subprocess.run(["make", f"PKG={tmp_path / 'net'}", f"CC={cc}", f"CFLAGS={cflags}", f"PYTHON={sys.executable}",
                    *link], cwd=work, check=True, capture_output=True)
    out = subprocess.run([*emulator, str(work / "classify")], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    got = re.search(r"class (\d+) score (\S+)", out)
    assert got, out
    image = np.load(work / "image.npy")
    ref = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": image})[0]
    assert int(got.group(1)) == int(ref.argmax())
    np.testing.assert_allclose(float(got.group(2)), float(ref.max()), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cortex_m7_package_is_bare_metal(model_onnx, tmp_path):
    build = compile_model(model_onnx, "cortex-m7", tmp_path / "m7", fmt="c", package_name="net")
    lib = tmp_path / "m7" / "libnet.a"
    assert lib.is_file()
    assert (tmp_path / "m7" / "test_net").exists()  # for the emulated board (test_cpackage runs it)
    header = subprocess.run(["arm-none-eabi-readelf", "-h", str(tmp_path / "m7" / "model.o")], capture_output=True,
                            text=True, check=True).stdout
    assert "ARM" in header
    attrs = subprocess.run(["arm-none-eabi-readelf", "-A", str(tmp_path / "m7" / "kernels.o")], capture_output=True,
                           text=True, check=True).stdout
    assert "Cortex-M7" in attrs or "v7E-M" in attrs
    assert build.memory["arena_bytes"] < build.memory["intermediate_bytes"]
