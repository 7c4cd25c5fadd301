"""`edgeprune run --debug-layers`: find the first kernel whose output diverges between a C package on its device
and an independent reference.

The reference is the same source model compiled for this machine as a C package *without our schedule rules*:
TVM's plain legalized loops, slow but written independently of ours. Kernel boundaries come from graph-level
fusion, which happens before any target-specific scheduling, so step i is the same layer on both sides.
Both sides dump every kernel's output; the report lists each layer's error and names the first one above the
tolerance.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import Build
from ..codegen.importers import sha256_of
from ..errors import UserError
from . import package

TOLERANCE = 1e-4  # relative to the layer's largest reference magnitude (at least 1), as the numerics tests use


@dataclass
class LayerDiff:
    step: int
    kernel: str
    size: int
    max_abs: float
    rel: float


def _kernels(package_dir: Path) -> list[str]:
    text = (package_dir / "model.c").read_text()
    return [k for _, k in sorted((int(i), k) for i, k in re.findall(r'EP_DEBUG_LAYER\((\d+), "(\w+)"', text))]


def _dump(package_dir: Path, prefix: list[str], name: str, x: np.ndarray, dump_dir: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="ep-debug-"))
    try:
        shutil.copytree(package_dir, work, dirs_exist_ok=True)
        proc = subprocess.run(["make", "-s", "debug"], cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [""])[0]
            raise UserError(f"the debug build of {package_dir} failed ({why})")
        program = work / f"test_{name}"
        cmd = [*prefix[:-1], str(program)] if prefix else [str(program)]
        dump_dir.mkdir(parents=True, exist_ok=True)
        x.astype(np.float32).tofile(work / "in.bin")
        env = {**os.environ, "EP_DEBUG_DIR": str(dump_dir)}
        proc = subprocess.run([*cmd, str(work / "in.bin"), str(work / "out.bin")], capture_output=True, text=True,
                              env=env, timeout=1800)
        if proc.returncode not in (0, 1):  # 1: a kernel failed; the layers before it are still dumped
            raise UserError(f"the debug run failed: {(proc.stderr.strip().splitlines() or [''])[0][:200]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def debug_layers(build: Build, inputs: list[np.ndarray], device: str, out_dir: Path) -> tuple[list[LayerDiff], int]:
    """Per-layer errors of `build` on `device` against the reference; returns (diffs, first diverging step or -1)."""
    from ..codegen.build import compile_model

    prefix = package.command_for(build, device)
    package.check_inputs(build, inputs)
    source = Path(build.source)
    if not source.is_file() or sha256_of(source) != build.source_sha256:
        raise UserError(f"--debug-layers rebuilds the reference from the source model, and {source} is missing or "
                        "changed since this build; recompile from the model you have")
    name = build.memory["package"]
    with tempfile.TemporaryDirectory() as tmp:
        shape = tuple(build.inputs[0].shape) if source.suffix != ".pt2" else None
        ref = compile_model(source, "host", Path(tmp) / "ref", fmt="c", package_name=name, use_rules=False,
                            input_shape=shape)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        _dump(Path(build.directory), prefix, name, inputs[0], out_dir / "device")
        _dump(Path(ref.directory), [], name, inputs[0], out_dir / "reference")
    kernels = _kernels(Path(build.directory))
    diffs, first = [], -1
    for step, kernel in enumerate(kernels):
        dev, ref_path = out_dir / "device" / f"layer_{step:04d}.bin", out_dir / "reference" / f"layer_{step:04d}.bin"
        if not dev.exists() or not ref_path.exists():
            diffs.append(LayerDiff(step, kernel, 0, float("inf"), float("inf")))
            first = step if first < 0 else first
            break
        a, b = np.fromfile(dev, np.float32), np.fromfile(ref_path, np.float32)
        if a.size != b.size:
            raise UserError(f"layer {step} ({kernel}) has {a.size} values on the device and {b.size} in the "
                            "reference; the two builds do not correspond, recompile")
        max_abs = float(np.abs(a - b).max()) if a.size else 0.0
        rel = max_abs / max(1.0, float(np.abs(b).max()) if b.size else 1.0)
        if not np.isfinite(a).all():
            rel = float("inf")
        diffs.append(LayerDiff(step, kernel, a.size, max_abs, rel))
        if rel > TOLERANCE and first < 0:
            first = step
    return diffs, first
