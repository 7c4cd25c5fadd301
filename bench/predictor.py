"""Latency predictor benchmark: how well the latency model predicts builds it was not calibrated on.

Protocol, all on this machine (device `local`, target `host`), in one run:
  1. calibrate: time the calibration suite (edgeprune.measure.calibrate.suite, seed 1234) and fit the model;
  2. draw 20 other subnets from the same space with another seed, compile each, and measure its median latency;
  3. predict each with the target's prior (no table) and with the calibrated model;
  4. report the median absolute error, in percent of the measured latency, before and after calibration.

Goal (issue 4): median absolute error <= 10% after calibration. Ends with a GOAL line; exits 1 when missed.

    python bench/predictor.py [--subnets 20] [--calibration 36] [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subnets", type=int, default=20)
    ap.add_argument("--calibration", type=int, default=36)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--goal", type=float, default=10.0, help="median absolute error goal, percent")
    ap.add_argument("--save", help="also write the measurements (table and subnets) to this JSON file")
    ap.add_argument("--load", help="re-score the model on measurements saved by --save instead of measuring "
                                   "(for developing the model; the benchmark's figure is from a measuring run)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from edgeprune.codegen.build import compile_model
    from edgeprune.measure.calibrate import calibrate, suite
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.measure.latency import load_table, model_for
    from edgeprune.models.zoo import export_onnx
    from edgeprune.targets import get_target

    target, device = get_target("host"), LocalDevice()
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        prior, fitted = model_for(target), model_for(target, saved["table"])
        rows = [(s["name"], s["ms"], prior.predict(s["layers"]).ms, *_after(fitted, s["layers"]))
                for s in saved["subnets"]]
        return report(rows, args.goal)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"calibrating on {args.calibration} builds ...", file=sys.stderr, flush=True)
        table_path = calibrate(target, device, tmp / "table.json", count=args.calibration, runs=args.runs,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        table = load_table(table_path)
        prior, fitted = model_for(target), model_for(target, table)

        rows, saved_subnets = [], []
        for name, model, x in suite(args.subnets, seed=98765):
            path = export_onnx(model, x, tmp / f"{name}.onnx")
            build = compile_model(path, target, tmp / f"sub-{name}")
            measured = device.measure(build, runs=args.runs, warmup=5, layers=False).median_ms
            before, after = prior.predict(build.layers), fitted.predict(build.layers)
            rows.append((name, measured, before.ms, after.ms, after.source))
            saved_subnets.append({"name": name, "ms": measured, "layers": build.layers})
            print(f"{name}: measured {measured:.3f} ms", file=sys.stderr, flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps({"table": table, "subnets": saved_subnets}))
    return report(rows, args.goal)


def _after(model, layers) -> tuple[float, str]:
    p = model.predict(layers)
    return p.ms, p.source


def report(rows: list[tuple], goal: float) -> int:
    print("| subnet | measured ms | prior ms (err) | calibrated ms (err) | source |")
    print("|---|---|---|---|---|")
    err_before, err_after = [], []
    for name, measured, before, after, source in rows:
        eb, ea = abs(before - measured) / measured * 100, abs(after - measured) / measured * 100
        err_before.append(eb)
        err_after.append(ea)
        print(f"| {name} | {measured:.3f} | {before:.3f} ({eb:.0f}%) | {after:.3f} ({ea:.1f}%) | {source} |")
    mb, ma = float(np.median(err_before)), float(np.median(err_after))
    print(f"\nmedian absolute error over {len(rows)} subnets: before calibration {mb:.1f}%, after {ma:.1f}%")
    met = ma <= goal
    print(f"GOAL predictor-median-abs-error: {ma:.1f}% (goal <= {goal:g}%) {'met' if met else 'missed'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
