"""The zoo cross-compiles for the ARM targets: model.so is a shared library for 32-bit ARM (hard-float EABI5) or
AArch64, and a host Session refuses it with a one-line error.

Each network is compiled at its first (smaller) resolution only: the numerics are checked on the host
(test_zoo_numerics.py); what is checked here is that codegen and the cross link work for every construct.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from edgeprune.codegen.build import compile_model
from edgeprune.errors import UserError
from edgeprune.measure.local import Session
from edgeprune.models import zoo

pytestmark = pytest.mark.slow

EM_ARM, EM_AARCH64 = 40, 183
ET_DYN = 3
EF_ARM_EABI5, EF_ARM_ABI_FLOAT_HARD = 0x05000000, 0x00000400

TARGETS = {  # target: (cross compiler, ELF class (1: 32-bit, 2: 64-bit), e_machine)
    "cortex-a7": ("arm-linux-gnueabihf-gcc", 1, EM_ARM),
    "cortex-a53": ("aarch64-linux-gnu-gcc", 2, EM_AARCH64),
}

CASES = [pytest.param(name, sizes[0], target, id=f"{name}-{sizes[0]}-{target}")
         for target in TARGETS for name, (_, sizes) in zoo.ZOO.items()]


def elf_header(path: Path) -> dict:
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    cls, endian = data[4], data[5]
    assert endian == 1, "expected little-endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_flags = struct.unpack_from("<I", data, 36 if cls == 1 else 48)[0]
    return {"class": cls, "type": e_type, "machine": e_machine, "flags": e_flags}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("arm-onnx")
    files = {}
    for name, (_, sizes) in zoo.ZOO.items():
        model, x = zoo.make(name, sizes[0])
        files[name] = zoo.export_onnx(model, x, root / f"{name}-{sizes[0]}.onnx")
    return files


@pytest.mark.parametrize("name,res,target", CASES)
def test_zoo_cross_compiles(onnx_files, tmp_path, name, res, target):
    compiler, elf_class, machine = TARGETS[target]
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    build = compile_model(onnx_files[name], target, tmp_path / "build")
    assert build.target == target
    lib = tmp_path / "build" / build.library
    hdr = elf_header(lib)
    assert (hdr["class"], hdr["type"], hdr["machine"]) == (elf_class, ET_DYN, machine)
    if machine == EM_ARM:
        assert hdr["flags"] & 0xFF000000 == EF_ARM_EABI5
        assert hdr["flags"] & EF_ARM_ABI_FLOAT_HARD, "cortex-a7 must use the hard-float ABI"
    with pytest.raises(UserError, match=f"built for {target}") as e:
        Session(build)
    assert "\n" not in str(e.value)


def test_cli_run_refuses_an_arm_build(onnx_files, tmp_path, cli):
    import numpy as np

    if shutil.which(TARGETS["cortex-a53"][0]) is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed")
    out = tmp_path / "a53"
    rc, stdout, _ = cli("compile", onnx_files["pooling"], "--target", "cortex-a53", "-o", out)
    assert rc == 0 and "cortex-a53" in stdout
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 35, 35), np.float32))
    rc, _, err = cli("run", out, "-i", x, "-o", tmp_path / "y.npy")
    assert rc == 2
    assert_one_line_error(err, "cortex-a53")
    assert not (tmp_path / "y.npy").exists()
