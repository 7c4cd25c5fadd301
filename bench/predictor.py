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

    from edgeprune.artifacts import LatencyTable, LayerCost
    from edgeprune.calibration import compile_all, measure_entries, suite
    from edgeprune.cost import model_for, new_table
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.search import space as S
    from edgeprune.search.select import architecture_network
    from edgeprune.targets import get_target

    target, device = get_target("host"), LocalDevice()
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        prior, fitted = model_for(target), model_for(target, LatencyTable.from_json(saved["table"]))
        rows = []
        for s in saved["subnets"]:
            analytic = [LayerCost.from_json(r) for r in s["analytic"]]
            rows.append((s["name"], s["ms"], prior.predict(analytic).ms, *_after(fitted, analytic)))
        return report(rows, args.goal)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        say(f"compiling {args.calibration} calibration builds and {args.subnets} held-out subnets ...")
        # The held-out subnets: drawn from the search space (seed 98765), never in the calibration suite.
        rng = np.random.default_rng(98765)
        held = [architecture_network(S.Space().sample(rng), i, name=f"subnet{i:02d}") for i in range(args.subnets)]
        builds = list(compile_all(suite(args.calibration) + held, target, tmp))
        # One interleaved session for both sets, as `edgeprune calibrate` times its suite: a drift of this machine's
        # speed between a calibration phase and a test phase would otherwise read as the model's error.
        entries = measure_entries(builds, device, args.runs, 5, None, say)
        table = new_table(device.identity(target))
        table.entries = entries[:args.calibration]
        prior, fitted = model_for(target), model_for(target, table)

        rows, saved_subnets = [], []
        for net, entry in zip(held, entries[args.calibration:]):
            arch = S.Arch.from_dict(net.arch)
            analytic = S.layers(arch)  # the rows the search prices a subnet by
            before, after = prior.predict(analytic), fitted.predict(analytic)
            rows.append((net.name, entry.ms, before.ms, after.ms, after.source))
            saved_subnets.append({"name": net.name, "arch": net.arch, "ms": entry.ms,
                                  "analytic": [r.to_json() for r in analytic], **entry.to_json()})
    if args.save:
        Path(args.save).write_text(json.dumps({"table": table.to_json(), "subnets": saved_subnets}))
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
