"""Depthwise + pointwise fusion (issue 12, deliverable 5): each network compiled with and without it, timed against
itself, and its C package's RAM with and without it.

Protocol, for each network with depthwise layers in ``edgeprune.models.reference.BENCH_NETWORKS``:

1. Export the seeded PyTorch model to ONNX (opset 17) and compile it for ``host`` twice: as edgeprune builds it
   (depthwise + pointwise pairs merged where the map has at least ``dwpw.MIN_PIXELS`` pixels) and with
   ``fuse_depthwise=False``. The two builds' outputs must agree within rtol 1e-5 of the output scale.
2. Time both in one process, interleaved (``measure_interleaved``: ``--rounds`` rounds, each running both builds),
   at 1 and 2 threads; each build's figure is its median over all rounds. The ratio is unfused / fused.
3. Compile both as C packages for ``--package-target`` (default cortex-a7) and report their RAM (arena +
   workspace), which build.json records.

Goals, per network: the fused build at least as fast as the unfused one at each thread count (the issue: "keep it
where it measures faster"), and its C package's RAM no larger. One ``GOAL`` line each; exits 1 on any miss.

    python bench/dwpw.py [--networks NAME ...] [--rounds 10] [--runs 200] [--package-target cortex-a7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

THREADS = (1, 2)
RTOL = 1e-5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(name: str, workdir: Path) -> Path:
    from edgeprune.models import zoo
    from edgeprune.models.reference import build

    model, x = build(name)
    path = workdir / f"{name}.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zoo.export_onnx(model, x, path)
    return path


def bench_network(name: str, workdir: Path, rounds: int, runs: int, package_target: str) -> dict | None:
    import numpy as np

    from edgeprune.codegen.build import compile_model
    from edgeprune.measure.local import Session, measure_interleaved, random_inputs

    onnx = export(name, workdir)
    builds = {fuse: compile_model(onnx, "host", workdir / f"{name}-{'fused' if fuse else 'unfused'}",
                                  sparse="dense", fuse_depthwise=fuse) for fuse in (True, False)}
    merged = sum(1 for r in builds[True].layers if "dwpw" in r.kernel) // 2
    if merged == 0:
        log(f"{name}: no depthwise + pointwise pair to merge")
        return None
    x = random_inputs(builds[True])
    outs = [Session(builds[f]).run(x)[0] for f in (True, False)]
    err = float(np.abs(outs[0] - outs[1]).max() / max(1e-30, np.abs(outs[1]).max()))
    times = {}
    for t in THREADS:
        fused, unfused = measure_interleaved([builds[True], builds[False]], runs=runs, warmup=10, threads=t,
                                             rounds=rounds, layers=False)
        times[t] = (float(np.median(fused.runs_ms)), float(np.median(unfused.runs_ms)))
        log(f"{name} {t}T: fused {times[t][0]:.3f} ms, unfused {times[t][1]:.3f} ms")
    ram = {}
    for fuse in (True, False):
        pkg = compile_model(onnx, package_target, workdir / f"{name}-{package_target}-{int(fuse)}", fmt="c",
                            fuse_depthwise=fuse)
        ram[fuse] = int(pkg.memory["ram_bytes"])
    return {"network": name, "pairs": merged, "kernels": (len(builds[True].kernels), len(builds[False].kernels)),
            "err": err, "times": times, "ram": ram}


def report(rows: list[dict], package_target: str) -> tuple[list[str], bool]:
    lines = [f"| network | pairs merged | threads | unfused ms | fused ms | unfused / fused | "
             f"{package_target} RAM unfused | fused |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    goals, ok = [], True
    for r in rows:
        for t, (fused, unfused) in r["times"].items():
            lines.append(f"| {r['network']} | {r['pairs']} | {t} | {unfused:.3f} | {fused:.3f} | {unfused / fused:.3f} "
                         f"| {r['ram'][False] / 1024:.0f} KiB | {r['ram'][True] / 1024:.0f} KiB |")
            met = unfused / fused >= 1.0 and r["err"] <= RTOL
            ok &= met
            goals.append(f"GOAL dwpw-{r['network']}-{t}t: {unfused / fused:.3f}x the unfused build "
                         f"(goal >= 1.0) {'met' if met else 'missed'}")
        met = r["ram"][True] <= r["ram"][False]
        ok &= met
        goals.append(f"GOAL dwpw-ram-{r['network']}: {r['ram'][True] / r['ram'][False]:.3f} of the unfused "
                     f"package's RAM (goal <= 1.0) {'met' if met else 'missed'}")
    lines.append("")
    lines += [f"numerics {r['network']}: fused against unfused, max rel error {r['err']:.1e} (rtol {RTOL:g})"
              for r in rows]
    return lines + [""] + goals, ok


def main(argv: list[str] | None = None) -> int:
    from edgeprune.models.reference import BENCH_NETWORKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=[n for n in BENCH_NETWORKS if "mobilenet" in n],
                   help="benchmark networks (default: those with depthwise layers)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds per thread count")
    p.add_argument("--runs", type=int, default=200, help="timed runs per build and thread count, over the rounds")
    p.add_argument("--package-target", default="cortex-a7", help="target of the C packages whose RAM is compared")
    p.add_argument("--workdir", help="where ONNX files and builds go (default: a new temporary directory)")
    args = p.parse_args(argv)
    unknown = [n for n in args.networks if n not in BENCH_NETWORKS]
    if unknown:
        p.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(BENCH_NETWORKS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeprune-dwpw-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory: {workdir}")
    rows = [r for n in args.networks if (r := bench_network(n, workdir, args.rounds, args.runs, args.package_target))]
    lines, ok = report(rows, args.package_target)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
