"""edgeprune's C package for a Cortex-M7 against TensorFlow Lite Micro (issue 16): RAM, flash and outputs.

For each zoo network (at its first resolution) and MobileNetV2 0.35 @96, fp32:

- TFLite Micro: the network written as a ``.tflite`` by litert-torch (bench/peers.py), run by the ``tflite-micro``
  package's Python interpreter (``pip install --no-deps tflite-micro``); its arena is what
  ``print_allocations()`` reports ("Arena allocation total"), its model bytes the ``.tflite`` file's size. TFLM needs
  its interpreter in flash too: INTERPRETER_BYTES, the "core runtime ... fits in 16 KB" of TFLM's README, without
  the operator kernels (so the figure flatters TFLM).
- edgeprune: the network compiled for cortex-m7 as a C package; RAM is its arena (which holds the workspace),
  flash is code (kernels, executor, runtime, as linked) plus weights, both from build.json; the outputs come from
  the package's test program booted on qemu-system-arm's mps2-an500 (``run --device qemu://cortex-m7``).

Goals: our RAM at most TFLM's arena, our flash at most TFLM's model bytes plus its interpreter, and our outputs
within 1e-4 (relative to the output's scale) of TFLM's and of onnxruntime's, on every network. Prints a table and
GOAL lines; exits 1 when a goal is missed.

    python bench/firmware.py [--networks resnet_tiny,mobilenetv2-0.35-96] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

INTERPRETER_BYTES = 16 * 1024  # TFLM README: "The core runtime just fits in 16 KB on an Arm Cortex M3"
TOLERANCE = 1e-4
REFERENCE = "mobilenetv2-0.35-96"


def networks() -> list[str]:
    from edgeprune.models import zoo

    return [*zoo.ZOO, REFERENCE]


def make(name: str):
    """(module, example input) of a zoo network at its first resolution, or of the reference network."""
    from edgeprune.models import reference, zoo

    if name in zoo.ZOO:
        return zoo.make(name, zoo.ZOO[name][1][0])
    return reference.build(name)


def tflm_arena(interpreter) -> int:
    """The arena TFLM planned, read from print_allocations(), which writes to the C stderr only."""
    read, write = os.pipe()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(write, 2)
    try:
        interpreter.print_allocations()
    finally:
        os.dup2(saved, 2)
        os.close(write)
        os.close(saved)
    with os.fdopen(read) as f:
        text = f.read()
    m = re.search(r"Arena allocation total (\d+) bytes", text)
    if not m:
        raise RuntimeError(f"print_allocations() did not report the arena: {text[:200]!r}")
    return int(m.group(1))


def run_tflm(tflite: Path, x: np.ndarray) -> tuple[np.ndarray, int]:
    from tflite_micro import runtime

    interpreter = runtime.Interpreter.from_file(str(tflite), arena_size=64 << 20)
    interpreter.set_input(x, 0)
    interpreter.invoke()
    return np.array(interpreter.get_output(0)), tflm_arena(interpreter)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.reshape(b.shape) - b).max() / max(1.0, float(np.abs(b).max())))


def bench(name: str, work: Path) -> dict:
    import onnxruntime as ort
    from peers import write_tflite

    from edgeprune.codegen.build import compile_model
    from edgeprune.measure import package
    from edgeprune.models import zoo

    module, x = make(name)
    xn = x.numpy().astype(np.float32)
    try:
        tflite = write_tflite(module, x, work / f"{name}.tflite")
    except Exception as e:  # noqa: BLE001 - litert-torch's converter raises its own types
        return {"name": name, "skipped": f"litert-torch could not convert it ({str(e).splitlines()[0][:100]})"}
    try:
        tflm_out, arena = run_tflm(tflite, xn)
    except RuntimeError as e:  # an operator TFLM has no kernel for (it prints which on stderr)
        return {"name": name, "skipped": f"TFLM could not run the .tflite ({e})"}
    onnx = zoo.export_onnx(module, x, work / f"{name}.onnx")
    ref = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": xn})[0]
    build = compile_model(onnx, "cortex-m7", work / f"{name}-m7", fmt="c", package_name="net")
    ours = package.run(build, [xn], "qemu://cortex-m7")[0]
    m = build.memory
    return {"name": name, "tflm_arena": arena, "tflm_model": tflite.stat().st_size, "ram": m["ram_bytes"],
            "arena": m["arena_bytes"], "workspace": m["workspace_bytes"], "flash": m["flash_bytes"],
            "code": m["code_bytes"], "err_tflm": rel_error(ours, tflm_out), "err_ort": rel_error(ours, ref),
            "tflm_vs_ort": rel_error(tflm_out, ref)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", help=f"comma-separated (default: every zoo network and {REFERENCE})")
    ap.add_argument("--work", help="keep the .tflite, .onnx and packages here (default: a temporary directory)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("tflite_micro") is None:  # its tensorflow dependency is never imported
        sys.exit("bench/firmware.py runs TensorFlow Lite Micro: pip install --no-deps tflite-micro")
    names = args.networks.split(",") if args.networks else networks()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in names:
            rows.append(bench(name, work))
            print(f"done {name}", file=sys.stderr, flush=True)
    print("| network | TFLM arena | ours RAM (arena, workspace in it) | ours/TFLM | TFLM model + 16 KiB interpreter | "
          "ours flash (code + weights) | ours/TFLM | max rel. diff vs TFLM / onnxruntime |")
    print("|---|---|---|---|---|---|---|---|")
    goals = []
    for r in rows:
        if "skipped" in r:  # said in the table and after the goals: no figure to hold against ours
            print(f"| {r['name']} | {r['skipped']} | | | | | | |")
            goals.append((f"peer-{r['name']}", r["skipped"], None))
            continue
        tflm_flash = r["tflm_model"] + INTERPRETER_BYTES
        print(f"| {r['name']} | {r['tflm_arena']:,} | {r['ram']:,} (workspace {r['workspace']:,}) | "
              f"{r['ram'] / r['tflm_arena']:.2f}x | {tflm_flash:,} ({r['tflm_model']:,} + {INTERPRETER_BYTES:,}) | "
              f"{r['flash']:,} ({r['code']:,} + {r['flash'] - r['code']:,}) | {r['flash'] / tflm_flash:.2f}x | "
              f"{r['err_tflm']:.1e} / {r['err_ort']:.1e} |")
        goals += [(f"ram-{r['name']}", f"our RAM {r['ram'] / r['tflm_arena']:.2f}x TFLM's arena (goal <= 1)",
                   r["ram"] <= r["tflm_arena"]),
                  (f"flash-{r['name']}", f"our flash {r['flash'] / tflm_flash:.2f}x TFLM's model + interpreter "
                   "(goal <= 1)", r["flash"] <= tflm_flash),
                  (f"agree-{r['name']}", f"max rel. diff {r['err_tflm']:.1e} vs TFLM, {r['err_ort']:.1e} vs "
                   f"onnxruntime (goal <= {TOLERANCE:g})", max(r["err_tflm"], r["err_ort"]) <= TOLERANCE)]
    print()
    for name, text, met in goals:
        print(f"SKIPPED {name}: {text}" if met is None else f"GOAL {name}: {text} {'met' if met else 'missed'}")
    return 0 if all(met is not False for *_, met in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
