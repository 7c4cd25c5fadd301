"""Dense fp32 latency of edgeprune against onnxruntime and PyTorch eager, at 1 and 2 threads.

Goal checked: "edgeprune's dense fp32 latency at most 1.5x onnxruntime's on each network of the benchmark, at
2 threads".

Protocol, for each network of ``edgeprune.models.reference.BENCH_NETWORKS``:

1. Build the seeded PyTorch model, count its MACs (``FlopCounterMode``; FLOPs = 2 x MACs), export it to ONNX
   (opset 17) and compile that ONNX file with edgeprune for ``host``.
2. Time each runtime in its own subprocess, one at a time: their thread pools spin after a run and would slow
   down whatever runs beside them. A worker warms up (>= 10 runs), then times runs for at least ``--seconds``
   and at least 20 runs, and reports the median.
3. A round times every runtime at 1 and 2 threads. These machines have episodic slowdowns (1.2-2.3x, for tens of
   seconds), so the round is repeated ``--rounds`` times, interleaved, and each runtime keeps its lowest median
   over the rounds. Ratios are taken between figures of the same invocation.
4. Numerics are checked once per network: edgeprune's and onnxruntime's outputs on the same seeded input must
   agree within rtol 1e-4 of the output scale (max |a - b| / max |b|). A wrong output fails the goal too.

Prints a Markdown table, then one ``GOAL dense-<network>: ...`` line per network; exits 1 if any goal is missed.
Run ``python bench/dense.py --help`` for the options; ``--worker`` is the internal subprocess entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RUNTIMES = ("edgeprune", "onnxruntime", "pytorch")
THREADS = (1, 2)
GOAL_THREADS = 2
GOAL_RATIO = 1.5
RTOL = 1e-4
WARMUP = 10
MIN_RUNS = 20


# ---------------------------------------------------------------- workers (run in their own subprocess)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def timed(run_batch, seconds: float) -> list[float]:
    """Warm up, then time runs in chunks of ~0.2 s until `seconds` have passed and MIN_RUNS are done.

    run_batch(runs, warmup) returns the latency of each of `runs` runs in ms, after `warmup` untimed runs.
    """
    probe = run_batch(WARMUP, WARMUP)
    chunk = max(1, math.ceil(200 / max(median(probe), 1e-3)))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < seconds:
        times += run_batch(chunk, 0)
    return times


def loop_batch(fn):
    """run_batch for a plain Python callable."""

    def run_batch(runs: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t) / 1e6)
        return times

    return run_batch


def worker_edgeprune(args) -> tuple[list[float], object]:
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM's pool reads it once, at start: before importing tvm
    import numpy as np

    from edgeprune.artifacts import Build
    from edgeprune.measure.local import Session, random_inputs

    build = Build.load(args.model)
    sess = Session(build)
    out = sess.run([np.load(args.input)])[0] if args.input else None
    inputs = random_inputs(build)
    return timed(lambda runs, warmup: sess.time_runs(inputs, runs, warmup), args.seconds), out


def worker_onnxruntime(args) -> tuple[list[float], object]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = sess.run(None, {name: np.load(args.input)})[0] if args.input else None
    x = np.random.default_rng(0).standard_normal(sess.get_inputs()[0].shape).astype(np.float32)
    return timed(loop_batch(lambda: sess.run(None, {name: x})), args.seconds), out


def worker_pytorch(args) -> tuple[list[float], object]:
    import torch

    from edgeprune.models.reference import build

    torch.set_num_threads(args.threads)
    model, x = build(args.model)  # same seed as the exported model: same weights
    with torch.inference_mode():
        return timed(loop_batch(lambda: model(x)), args.seconds), None


WORKERS = {"edgeprune": worker_edgeprune, "onnxruntime": worker_onnxruntime, "pytorch": worker_pytorch}


def worker_main(args) -> None:
    times, out = WORKERS[args.worker](args)
    if out is not None:
        import numpy as np

        np.save(args.output, out)
    print(json.dumps({"runtime": args.worker, "threads": args.threads, "runs": len(times),
                      "median_ms": median(times), "min_ms": min(times)}))


# ---------------------------------------------------------------- driver


def run_worker(runtime: str, model: str, threads: int, seconds: float, check: tuple[Path, Path] | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, "--model", model,
           "--threads", str(threads), "--seconds", str(seconds)]
    if check:
        cmd += ["--input", str(check[0]), "--output", str(check[1])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        sys.exit(f"{runtime} worker at {threads} thread(s) on {model} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def count_macs(model, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def prepare(name: str, workdir: Path) -> dict:
    """Export and compile one network; save its seeded input for the numerics check."""
    import numpy as np
    import torch

    from edgeprune.codegen.build import compile_model
    from edgeprune.models.reference import build

    model, x = build(name)
    macs = count_macs(model, x)
    onnx_path = workdir / f"{name}.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and says so
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(onnx_path), opset_version=17, dynamo=False, input_names=["input"])
    np.save(workdir / f"{name}.input.npy", x.numpy())
    t0 = time.perf_counter()
    built = compile_model(onnx_path, "host", workdir / f"{name}.build")
    log(f"{name}: {macs / 1e6:.1f}M MACs, compiled in {time.perf_counter() - t0:.1f} s, "
        f"{len(built.kernels)} kernels, {len(built.unscheduled)} unscheduled")
    if built.unscheduled:
        log(f"  unscheduled kernels (slow): {', '.join(built.unscheduled)}")
    return {"macs": macs, "onnx": str(onnx_path), "build": str(workdir / f"{name}.build")}


def model_arg(runtime: str, name: str, prep: dict) -> str:
    return {"edgeprune": prep["build"], "onnxruntime": prep["onnx"], "pytorch": name}[runtime]


def check_numerics(name: str, workdir: Path) -> float:
    """Max |edgeprune - onnxruntime| relative to the largest |onnxruntime| output."""
    import numpy as np

    ours = np.load(workdir / f"{name}.edgeprune.out.npy").astype(np.float64)
    ref = np.load(workdir / f"{name}.onnxruntime.out.npy").astype(np.float64)
    if ours.shape != ref.shape:
        return math.inf
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def bench_network(name: str, prep: dict, workdir: Path, rounds: int, seconds: float) -> list[dict]:
    """`rounds` interleaved rounds; each maps "runtime/threads" to the worker's median ms."""
    results = []
    for r in range(rounds):
        log(f"{name}: round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f})")
        order = RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]  # alternate who runs first, against drift
        medians = {}
        for threads in THREADS:
            for rt in order:
                check = None
                if r == 0 and threads == GOAL_THREADS and rt in ("edgeprune", "onnxruntime"):
                    check = (workdir / f"{name}.input.npy", workdir / f"{name}.{rt}.out.npy")
                res = run_worker(rt, model_arg(rt, name, prep), threads, seconds, check)
                medians[f"{rt}/{threads}"] = res["median_ms"]
                log(f"  {rt:11s} {threads}T: {res['median_ms']:8.3f} ms ({res['runs']} runs)")
        results.append(medians)
    return results


def summarize(name: str, prep: dict, rounds: list[dict], rel_err: float) -> dict:
    best = {k: min(r[k] for r in rounds) for k in rounds[0]}
    ep, ort_, pt = (best[f"{rt}/{GOAL_THREADS}"] for rt in RUNTIMES)
    ratio = ep / ort_
    return {"network": name, "macs": prep["macs"], "rounds": rounds, "best_ms": best,
            "ratio_ort": ratio, "ratio_pytorch": ep / pt, "gflops": 2 * prep["macs"] / (ep * 1e6),
            "max_rel_err": rel_err, "numerics_ok": rel_err <= RTOL,
            "goal_met": ratio <= GOAL_RATIO and rel_err <= RTOL}


def fmt_macs(macs: int) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"


def table(rows: list[dict]) -> str:
    head = ("| network | MACs | edgeprune 1T / 2T ms | onnxruntime 1T / 2T ms | PyTorch 1T / 2T ms "
            "| edgeprune/ORT at 2T | edgeprune/PyTorch at 2T | edgeprune GFLOP/s at 2T |")
    lines = [head, "|" + "---|" * 8]
    for s in rows:
        b = s["best_ms"]
        cells = [s["network"], fmt_macs(s["macs"])]
        cells += [f"{b[f'{rt}/1']:.2f} / {b[f'{rt}/2']:.2f}" for rt in RUNTIMES]
        cells += [f"{s['ratio_ort']:.2f}x", f"{s['ratio_pytorch']:.2f}x", f"{s['gflops']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_line(s: dict) -> str:
    verdict = "met" if s["goal_met"] else "missed"
    line = (f"GOAL dense-{s['network']}: {s['ratio_ort']:.2f}x onnxruntime at {GOAL_THREADS} threads "
            f"(goal <= {GOAL_RATIO}) {verdict}")
    return line if s["numerics_ok"] else line + f" (outputs differ: max rel error {s['max_rel_err']:.2e})"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args) -> int:
    from edgeprune.models.reference import BENCH_NETWORKS

    names = args.networks or list(BENCH_NETWORKS)
    unknown = [n for n in names if n not in BENCH_NETWORKS]
    if unknown:
        sys.exit(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(BENCH_NETWORKS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeprune-dense-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory: {workdir}")
    preps = {name: prepare(name, workdir) for name in names}  # compile everything before timing anything
    summaries = []
    for name in names:
        rounds = bench_network(name, preps[name], workdir, args.rounds, args.seconds)
        rel_err = check_numerics(name, workdir)
        log(f"  numerics {name}: max rel error vs onnxruntime {rel_err:.2e} (rtol {RTOL:g}) "
            f"{'ok' if rel_err <= RTOL else 'FAILED'}")
        summaries.append(summarize(name, preps[name], rounds, rel_err))
    print(table(summaries))
    print()
    for s in summaries:
        print(f"numerics {s['network']}: max rel error vs onnxruntime {s['max_rel_err']:.2e} (rtol {RTOL:g})")
    for s in summaries:
        print(goal_line(s))
    if args.json:
        config = {"rounds": args.rounds, "seconds": args.seconds, "threads": list(THREADS), "rtol": RTOL,
                  "goal_ratio": GOAL_RATIO, "goal_threads": GOAL_THREADS}
        Path(args.json).write_text(json.dumps({"config": config, "networks": summaries}, indent=2) + "\n")
    return 0 if all(s["goal_met"] for s in summaries) else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", help="subset of the benchmark networks (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the lowest median is kept")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per runtime and thread count")
    p.add_argument("--workdir", help="where ONNX files and builds go (default: a new temporary directory)")
    p.add_argument("--json", help="also write the results to this JSON file")
    internal = p.add_argument_group("worker (internal)")
    internal.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    internal.add_argument("--model", help=argparse.SUPPRESS)
    internal.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    internal.add_argument("--input", help=argparse.SUPPRESS)
    internal.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(arguments)
    else:
        sys.exit(main(arguments))
