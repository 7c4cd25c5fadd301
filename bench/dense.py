"""Dense fp32 latency of edgeprune against onnxruntime, LiteRT (XNNPACK), MNN and PyTorch eager, at 1 and 2 threads.

Goals checked on each network of the benchmark:

- "edgeprune's dense fp32 latency at most 1.5x onnxruntime's", at 2 threads;
- issue 12's target: "edgeprune's latency at most 1.0x the best of onnxruntime, LiteRT/XNNPACK and MNN", at 1 and
  at 2 threads (the ``GOAL dense-vs-best-peer-<network>-<n>t`` lines).

The peers run through bench/peers.py, which explains how each is converted and timed and how to install them (MNN
comes with the optional extra ``bench``; litert-torch is a second step). LiteRT runs a ``.tflite`` that litert-torch
writes from the same seeded PyTorch module; MNN runs its conversion of the same ONNX file. The best peer's ratio is
edgeprune's ms over the fastest peer's ms at the same thread count, each runtime's lowest median over the rounds.

Protocol, for each network of ``edgeprune.models.reference.BENCH_NETWORKS``:

1. Build the seeded PyTorch model, count its MACs (``FlopCounterMode``; FLOPs = 2 x MACs), export it to ONNX
   (opset 17) and compile that ONNX file with edgeprune for ``host``; convert it for MNN, and write the ``.tflite``.
2. Time each runtime in its own subprocess, one at a time: their thread pools spin after a run and would slow
   down whatever runs beside them. A worker warms up (>= 10 runs), then times runs for at least ``--seconds``
   and at least 20 runs, and reports the median.
3. A round times every runtime at 1 and 2 threads. These machines have episodic slowdowns (1.2-2.3x, for tens of
   seconds), so the round is repeated ``--rounds`` times, interleaved, and each runtime keeps its lowest median
   over the rounds. Ratios are taken between figures of the same invocation.
4. Numerics are checked once per network: edgeprune's and onnxruntime's outputs on the same seeded input must
   agree within rtol 1e-4 of the output scale (max |a - b| / max |b|). A wrong output fails the goals too. The
   other peers' outputs are compared with onnxruntime's as well, for information.

Prints a Markdown table, then per network a ``GOAL dense-<network>: ...`` line and one
``GOAL dense-vs-best-peer-<network>-<n>t: ...`` line per thread count; exits 1 if any goal is missed.
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

from peers import PeerMissing, loop_batch, median, model_file, time_peer, timed

PEERS = ("onnxruntime", "litert", "mnn")  # the best of these is what issue 12 asks edgeprune to beat
PEER_NAMES = {"onnxruntime": "onnxruntime", "litert": "LiteRT (XNNPACK)", "mnn": "MNN"}
RUNTIMES = ("edgeprune", *PEERS, "pytorch")
THREADS = (1, 2)
GOAL_THREADS = 2
GOAL_RATIO = 1.5
GOAL_PEER_RATIO = 1.0
RTOL = 1e-4


# ---------------------------------------------------------------- workers (run in their own subprocess)


def worker_edgeprune(args: argparse.Namespace) -> tuple[list[float], object]:
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM's pool reads it once, at start: before importing tvm
    import numpy as np

    from edgeprune.artifacts import Build
    from edgeprune.measure.local import Session, random_inputs

    build = Build.load(args.model)
    sess = Session(build)
    out = sess.run([np.load(args.input)])[0] if args.input else None
    inputs = random_inputs(build)
    return timed(lambda runs, warmup: sess.time_runs(inputs, runs, warmup), args.seconds), out


def worker_pytorch(args: argparse.Namespace) -> tuple[list[float], object]:
    import torch

    from edgeprune.models.reference import build

    torch.set_num_threads(args.threads)
    model, x = build(args.model)  # same seed as the exported model: same weights
    with torch.inference_mode():
        return timed(loop_batch(lambda: model(x)), args.seconds), None


WORKERS = {"edgeprune": worker_edgeprune, "pytorch": worker_pytorch}  # the peers' workers are in peers.py


def worker_main(args: argparse.Namespace) -> None:
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
    """Export and compile one network, write each peer's model file; save its seeded input for the numerics check."""
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
    files = {"edgeprune": str(workdir / f"{name}.build"), "pytorch": name}
    for peer in PEERS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            files[peer] = str(model_file(peer, onnx_path, workdir, model, x))
        log(f"  {peer}: {Path(files[peer]).name} ({time.perf_counter() - t0:.1f} s)")
    return {"macs": macs, "files": files}


def rel_error(ours: object, ref: object) -> float:
    """Max |ours - ref| relative to the largest |ref| output; inf when the shapes differ."""
    import numpy as np

    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.size != b.size:
        return math.inf
    return float(np.max(np.abs(a.reshape(b.shape) - b)) / max(np.max(np.abs(b)), 1e-30))


def time_one(runtime: str, name: str, prep: dict, threads: int, seconds: float, workdir: Path,
             check: bool) -> tuple[float, int]:
    """(median ms, runs) of one runtime in its own subprocess; with `check`, its output on the seeded input is
    saved as <network>.<runtime>.out.npy for the numerics check."""
    import numpy as np

    model = prep["files"][runtime]
    if runtime in WORKERS:
        paths = (workdir / f"{name}.input.npy", workdir / f"{name}.{runtime}.out.npy")
        res = run_worker(runtime, model, threads, seconds, paths if check else None)
        return res["median_ms"], res["runs"]
    x = np.load(workdir / f"{name}.input.npy") if check else None
    try:
        res = time_peer(runtime, model, threads, seconds, x)
    except RuntimeError as e:
        sys.exit(str(e))
    if check:
        np.save(workdir / f"{name}.{runtime}.out.npy", res.output)
    return res.median_ms, res.runs


def bench_network(name: str, prep: dict, workdir: Path, rounds: int, seconds: float) -> list[dict]:
    """`rounds` interleaved rounds; each maps "runtime/threads" to the worker's median ms."""
    results = []
    for r in range(rounds):
        log(f"{name}: round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.2f})")
        order = RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]  # alternate who runs first, against drift
        medians = {}
        for threads in THREADS:
            for rt in order:
                check = r == 0 and threads == GOAL_THREADS and rt != "pytorch"
                ms, runs = time_one(rt, name, prep, threads, seconds, workdir, check)
                medians[f"{rt}/{threads}"] = ms
                log(f"  {rt:11s} {threads}T: {ms:8.3f} ms ({runs} runs)")
        results.append(medians)
    return results


def check_numerics(name: str, workdir: Path) -> dict[str, float]:
    """Each runtime's max relative error against onnxruntime's output on the same seeded input."""
    import numpy as np

    ref = np.load(workdir / f"{name}.onnxruntime.out.npy")
    return {rt: rel_error(np.load(workdir / f"{name}.{rt}.out.npy"), ref)
            for rt in ("edgeprune", *PEERS) if rt != "onnxruntime"}


def summarize(name: str, prep: dict, rounds: list[dict], errors: dict[str, float]) -> dict:
    best = {k: min(r[k] for r in rounds) for k in rounds[0]}
    ep = best[f"edgeprune/{GOAL_THREADS}"]
    ratio = ep / best[f"onnxruntime/{GOAL_THREADS}"]
    best_peer = {t: min(PEERS, key=lambda p, t=t: best[f"{p}/{t}"]) for t in THREADS}
    peer_ratio = {t: best[f"edgeprune/{t}"] / best[f"{best_peer[t]}/{t}"] for t in THREADS}
    rel_err = errors["edgeprune"]
    ok = rel_err <= RTOL
    return {"network": name, "macs": prep["macs"], "rounds": rounds, "best_ms": best,
            "ratio_ort": ratio, "ratio_pytorch": ep / best[f"pytorch/{GOAL_THREADS}"],
            "best_peer": {str(t): p for t, p in best_peer.items()},
            "ratio_best_peer": {str(t): r for t, r in peer_ratio.items()},
            "gflops": 2 * prep["macs"] / (ep * 1e6), "max_rel_err": rel_err, "peer_rel_err": errors,
            "numerics_ok": ok, "goal_met": ratio <= GOAL_RATIO and ok,
            "goal_peer_met": {str(t): r <= GOAL_PEER_RATIO and ok for t, r in peer_ratio.items()}}


def fmt_macs(macs: int) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}"


def table(rows: list[dict]) -> str:
    names = {"edgeprune": "edgeprune", **PEER_NAMES, "pytorch": "PyTorch"}
    head = ("| network | MACs | " + " | ".join(f"{names[rt]} 1T / 2T ms" for rt in RUNTIMES)
            + " | best peer 1T / 2T | edgeprune / best peer 1T / 2T | edgeprune/ORT at 2T "
            "| edgeprune GFLOP/s at 2T |")
    lines = [head, "|" + "---|" * (len(RUNTIMES) + 6)]
    for s in rows:
        b = s["best_ms"]
        cells = [s["network"], fmt_macs(s["macs"])]
        for rt in RUNTIMES:
            t1, t2 = (fmt_ms(b[f"{rt}/{t}"]) for t in THREADS)
            cells.append(f"**{t1}** / **{t2}**" if rt == "edgeprune" else f"{t1} / {t2}")
        cells.append(" / ".join(PEER_NAMES[s["best_peer"][str(t)]] for t in THREADS))
        cells.append(" / ".join(f"{s['ratio_best_peer'][str(t)]:.2f}x" for t in THREADS))
        cells += [f"{s['ratio_ort']:.2f}x", f"{s['gflops']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(s: dict) -> list[str]:
    """The GOAL lines of one network (a wrong output fails them all): onnxruntime at 2 threads, the best peer at
    each thread count."""
    bad = "" if s["numerics_ok"] else f" (outputs differ: max rel error {s['max_rel_err']:.2e})"
    verdict = "met" if s["goal_met"] else "missed"
    ort_line = (f"GOAL dense-{s['network']}: {s['ratio_ort']:.2f}x onnxruntime at {GOAL_THREADS} threads "
                f"(goal <= {GOAL_RATIO}) {verdict}{bad}")
    lines = [ort_line]
    for t in THREADS:
        peer, ratio = s["best_peer"][str(t)], s["ratio_best_peer"][str(t)]
        ms = s["best_ms"]
        detail = (f"{ratio:.2f}x the best peer, {PEER_NAMES[peer]} ({fmt_ms(ms[f'edgeprune/{t}'])} against "
                  f"{fmt_ms(ms[f'{peer}/{t}'])} ms) at {t} thread{'s' if t > 1 else ''}")
        verdict = "met" if s["goal_peer_met"][str(t)] else "missed"
        lines.append(f"GOAL dense-vs-best-peer-{s['network']}-{t}t: {detail} (goal <= {GOAL_PEER_RATIO}) "
                     f"{verdict}{bad}")
    return lines


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from edgeprune.models.reference import BENCH_NETWORKS

    names = args.networks or list(BENCH_NETWORKS)
    unknown = [n for n in names if n not in BENCH_NETWORKS]
    if unknown:
        sys.exit(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(BENCH_NETWORKS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeprune-dense-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory: {workdir}")
    try:
        preps = {name: prepare(name, workdir) for name in names}  # compile everything before timing anything
    except PeerMissing as e:
        sys.exit(str(e))
    summaries = []
    for name in names:
        rounds = bench_network(name, preps[name], workdir, args.rounds, args.seconds)
        errors = check_numerics(name, workdir)
        log(f"  numerics {name}: max rel error vs onnxruntime "
            + ", ".join(f"{rt} {e:.2e}" for rt, e in errors.items())
            + f" (edgeprune's rtol {RTOL:g}) {'ok' if errors['edgeprune'] <= RTOL else 'FAILED'}")
        summaries.append(summarize(name, preps[name], rounds, errors))
    print(table(summaries))
    print()
    for s in summaries:
        peers = ", ".join(f"{PEER_NAMES[p]} {e:.1e}" for p, e in s["peer_rel_err"].items() if p != "edgeprune")
        print(f"numerics {s['network']}: max rel error vs onnxruntime {s['max_rel_err']:.2e} (rtol {RTOL:g}); "
              f"peers, for information: {peers}")
    for s in summaries:
        for line in goal_lines(s):
            print(line)
    if args.json:
        config = {"rounds": args.rounds, "seconds": args.seconds, "threads": list(THREADS), "rtol": RTOL,
                  "goal_ratio": GOAL_RATIO, "goal_peer_ratio": GOAL_PEER_RATIO, "goal_threads": GOAL_THREADS,
                  "peers": list(PEERS)}
        Path(args.json).write_text(json.dumps({"config": config, "networks": summaries}, indent=2) + "\n")
    return 0 if all(s["goal_met"] and all(s["goal_peer_met"].values()) for s in summaries) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", help="subset of the benchmark networks (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the lowest median is kept")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per runtime and thread count")
    p.add_argument("--workdir", help="where ONNX, MNN and .tflite files and builds go (default: a new temporary "
                   "directory); files already there are reused")
    p.add_argument("--json", help="also write the results to this JSON file")
    internal = p.add_argument_group("worker (internal)")
    internal.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
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
