"""Latency predictor benchmark: how well the latency model predicts builds it was not calibrated on.

Protocol, all on this machine (device `local`, target `host`), in one run:
  1. compile the calibration suite (edgeprune.measure.calibrate.suite, seed 1234) and 20 subnets drawn from the
     search space (seed 98765), which calibration never sees;
  2. time all of them as `edgeprune calibrate` does, in interleaved rounds, so both sets see the same machine;
  3. fit the latency model on the calibration entries only, and predict each held-out subnet from the analytic
     kernel rows the search prices it by (edgeprune.search.space.layers), with the target's prior (no table) and
     with the calibrated model;
  4. report the median absolute error, in percent of the measured median latency, before and after calibration.

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

    from edgeprune.measure.calibrate import compile_suite, device_identity, measure_suite
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.measure.latency import model_for
    from edgeprune.search import space as S
    from edgeprune.targets import get_target

    target, device = get_target("host"), LocalDevice()
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        prior, fitted = model_for(target), model_for(target, saved["table"])
        rows = [(s["name"], s["ms"], prior.predict(s["analytic"]).ms, *_after(fitted, s["analytic"]))
                for s in saved["subnets"]]
        return report(rows, args.goal)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        say(f"compiling {args.calibration} calibration builds and {args.subnets} held-out subnets ...")
        cal = list(compile_suite(target, args.calibration, tmp))
        held = list(_held_out(args.subnets, tmp))
        # One interleaved session for both sets, as `edgeprune calibrate` times its suite: a drift of this machine's
        # speed between a calibration phase and a test phase would otherwise read as the model's error.
        entries = measure_suite(cal + [b for _, _, b in held], device, args.runs, 5, None, say)
        table = {"device": device_identity(device, target), "threads": None, "entries": entries[:len(cal)]}
        prior, fitted = model_for(target), model_for(target, table)

        rows, saved_subnets = [], []
        for (name, arch, build), entry in zip(held, entries[len(cal):]):
            measured, analytic = entry["ms"], S.layers(arch)  # the rows the search prices a subnet by
            before, after = prior.predict(analytic), fitted.predict(analytic)
            rows.append((name, measured, before.ms, after.ms, after.source))
            saved_subnets.append({"name": name, "arch": arch.to_dict(), "ms": measured, "layers": build.layers,
                                  "analytic": analytic, "per_kernel_ms": entry.get("per_kernel_ms")})
    if args.save:
        Path(args.save).write_text(json.dumps({"table": table, "subnets": saved_subnets}))
    return report(rows, args.goal)


def _held_out(count: int, tmp: Path):
    """`count` subnets of the search space (seeded, not in the calibration suite), each compiled for the host."""
    import torch

    from edgeprune.codegen.build import compile_model
    from edgeprune.models.zoo import export_onnx
    from edgeprune.search import space as S
    from edgeprune.search.supernet import Subnet

    rng = np.random.default_rng(98765)
    for i in range(count):
        arch = S.Space().sample(rng)
        torch.manual_seed(i)
        net = Subnet(arch).eval()
        x = torch.randn(1, 3, arch.resolution, arch.resolution)
        name = f"subnet{i:02d}"
        path = export_onnx(net, x, tmp / f"{name}.onnx")
        yield name, arch, compile_model(path, "host", tmp / name)


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
