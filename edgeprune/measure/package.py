"""Run a C package's test program: on this machine (`local`, host builds) or emulated (`qemu://TARGET`): under
qemu-user for Linux boards, and booted on qemu-system-arm's mps2-an500 board for cortex-m7 (bare metal: the program's
command line, files and output go through semihosting, codegen/baremetal/).

Emulated runs give the device's exact numerics, not its latency: qemu translates instructions, so its times say
nothing about the board.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..artifacts import Build
from ..errors import UserError
from ..targets import get_target

QEMU_PREFIX = "qemu://"


def check_inputs(build: Build, inputs: list[np.ndarray]) -> None:
    specs = build.inputs
    if len(inputs) != len(specs):
        raise UserError(f"the model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}), "
                        f"got {len(inputs)}")
    for arr, spec in zip(inputs, specs):
        if tuple(arr.shape) != tuple(spec.shape):
            raise UserError(f"input '{spec.name}' must have shape {list(spec.shape)}, got {list(arr.shape)}")
        if str(arr.dtype) != spec.dtype:
            raise UserError(f"input '{spec.name}' must be {spec.dtype}, got {arr.dtype}; "
                            f"convert it with arr.astype('{spec.dtype}')")


def command_for(build: Build, device: str) -> list[str]:
    """The command line prefix that runs this build's test program on `device`."""
    if build.format != "c":
        raise UserError(f"{build.directory} is a shared library build; emulated and firmware runs need a C package: "
                        f"compile with --format c")
    program = Path(build.directory) / f"test_{build.memory.get('package', 'model')}"
    if "test_program" in build.memory:  # the package was built, its test program could not be
        raise UserError(f"{build.directory} has no test program: the network {build.memory['test_program']} "
                        f"(RAM {build.memory.get('ram_bytes', 0):,} B, flash {build.memory.get('flash_bytes', 0):,} B)")
    if not program.is_file():
        raise UserError(f"{program} is missing; recompile the model")
    if device == "local":
        if not get_target(build.target).is_host:
            raise UserError(f"{build.directory} is built for {build.target}; run it with --device "
                            f"{QEMU_PREFIX}{build.target}")
        return [str(program)]
    if not device.startswith(QEMU_PREFIX):
        raise UserError(f"unknown device '{device}'; use local or {QEMU_PREFIX}TARGET")
    name = device[len(QEMU_PREFIX):]
    target = get_target(name)  # a name, or the path of the board file the build was compiled for
    if target.name != build.target:
        right = "local" if get_target(build.target).is_host else f"{QEMU_PREFIX}{build.target}"
        raise UserError(f"{build.directory} is built for {build.target}, not {name}; use --device {right}")
    if target.is_host:
        return [str(program)]
    emulator = shlex.split(target.emulator)
    if not emulator or shutil.which(emulator[0]) is None:
        package = "qemu-system-arm" if emulator and emulator[0].startswith("qemu-system") else "qemu-user"
        raise UserError(f"emulator '{target.emulator or '(none)'}' for {name} is not installed; "
                        f"install it (Debian: apt-get install {package})")
    return [*emulator, str(program)]


def with_arguments(cmd: list[str], args: list[str]) -> list[str]:
    """The command line that runs `cmd` (an emulator and a program, or a program) with `args`. A whole-system
    emulator boots the program as its kernel and hands it the arguments through semihosting."""
    if not cmd[0].startswith("qemu-system"):
        return [*cmd, *args]
    *emulator, program = cmd
    semihosting = ",".join(["enable=on,target=native"] + [f"arg={a.replace(',', ',,')}" for a in (program, *args)])
    return [*emulator, "-semihosting-config", semihosting, "-kernel", program]


def run(build: Build, inputs: list[np.ndarray], device: str = "local", timeout: float = 600) -> list[np.ndarray]:
    return _invoke(build, inputs, device, timeout)[0]


def time_runs(build: Build, inputs: list[np.ndarray], device: str, runs: int, warmup: int,
              timeout: float = 1800) -> list[float]:
    """Each run's time in ms, from the test program's monotonic clock (under qemu: emulated time)."""
    _, stdout = _invoke(build, inputs, device, timeout, [str(runs), str(warmup)])
    times = [float(v) for v in re.findall(r"^time_ms (\S+)$", stdout, re.M)]
    if len(times) != runs:
        raise UserError(f"the test program reported {len(times)} runs, expected {runs}; recompile the model")
    return times


def _invoke(build: Build, inputs: list[np.ndarray], device: str, timeout: float,
            extra: list[str] | None = None) -> tuple[list[np.ndarray], str]:
    check_inputs(build, inputs)
    cmd = command_for(build, device)
    out_spec = build.outputs[0]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        np.ascontiguousarray(inputs[0], dtype=np.float32).tofile(src)
        try:
            proc = subprocess.run(with_arguments(cmd, [str(src), str(dst), *(extra or [])]), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"the test program did not finish within {timeout:.0f} s on {device}") from None
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
            raise UserError(f"the model failed on {device}: {why[:200]}")
        out = np.fromfile(dst, dtype=np.float32)
    expected = int(np.prod(out_spec.shape))
    if out.size != expected:
        raise UserError(f"the test program wrote {out.size} values, expected {expected}; recompile the model")
    return [out.reshape(out_spec.shape)], proc.stdout
