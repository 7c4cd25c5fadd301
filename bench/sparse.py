"""1xN block sparsity: our block-sparse kernels and builds against our dense ones and the peers (issue 13).

Sections, all in one run, each printing a table, then one GOAL line per goal; exit 1 if any goal is missed.

1. Kernels (host, 1 thread). Every distinct pointwise layer shape of MobileNetV2 1.0 @224 (NHWC input, HWIO
   weight, bias + ReLU6 fused, as in the network), with random weights whose weakest 1xN blocks are zeroed to 50, 75
   and 90% sparsity, N = 4, 8, 16. Each sparse layer is compiled with both of the family's kernels (vectors over a
   block's outputs, "channels", or over transposed pixel tiles, "pixels"), the dense layer with our dense kernel.
   All executables of a shape are timed interleaved, over rounds; each keeps its lowest round median. The speed-up
   of a layer is dense / the faster sparse kernel; a goal's figure is the geometric mean over the shapes. The
   channels-first kernel (what channels-first runs use: [C, H, W] in and out, no transposes) is timed too; a build
   runs one layout for its whole network, so a goal takes the better layout's geomean, never a mix per shape.
   Goals at N=4: >= 1.6x at 50%, >= 3.0x at 75%, >= 6.0x at 90%.
2. Whole network (host, 2 threads). MobileNetV2 1.0 @224 with 1x4 blocks at 50, 75 and 90% in every pointwise
   layer (the stem and the classifier stay dense), exported to ONNX once per sparsity, then
   - compiled by us with --sparse auto (what a user gets: the compiler times channels-last against channels-first
     runs of the sparse layers and keeps the faster) and with --sparse dense (its dense build); each layout forced
     too, for comparison,
   - converted by MNN with --detectSparseSpeedUp and 1x4 blocks (bench/peers.py), and run by onnxruntime.
   Each runtime runs in its own subprocess, interleaved over rounds, lowest round median kept; our four builds
   share one subprocess, timed in turn in slices of ~0.1 s, so that each sees the same spells of a noisy host.
   Outputs are checked against onnxruntime's (rtol 1e-4 of the output scale).
   Goals: ours >= 1.4x our dense at 50% and >= 2.0x at 75%; faster than MNN's sparse build at 50, 75 and 90%;
   faster than onnxruntime at 50 and 75%.
3. Accuracy (bench/sparse_accuracy.py): a subnet pruned and fine-tuned to 50% with N=4, against its dense twin and
   filter pruning at the same parameter count.
4. The build loop: `build --target host --device local --sparsity auto` against the dense-only build at 30% and 50%
   of the largest subnet's latency. Goals: at least as accurate on test images, and measured within budget.

Run `python bench/sparse.py --help` for the options (--quick for a smoke run: fewer shapes, rounds and seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SPARSITIES = (0.5, 0.75, 0.9)
BLOCKS = (4, 8, 16)
KERNEL_GOALS = {0.5: 1.6, 0.75: 3.0, 0.9: 6.0}  # N=4, geometric mean over the shapes
NETWORK_GOALS = {0.5: 1.4, 0.75: 2.0}  # against our dense build
NETWORK = "mobilenetv2-1.0-224"
RTOL = 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def goal_line(name: str, figure: float, op: str, value: float, unit: str = "x") -> tuple[str, bool]:
    met = figure >= value if op == ">=" else figure > value
    return f"GOAL {name}: {figure:.2f}{unit} (goal {op} {value}{unit}) {'met' if met else 'missed'}", met


# ---------------------------------------------------------------- 1. kernels


def pointwise_shapes() -> list[tuple[int, int, int, int]]:
    """(H, W, K, M) of every distinct 1x1 convolution of MobileNetV2 1.0 @224, in network order."""
    import torch
    from torch import nn

    from edgeprune.models.reference import build

    model, x = build(NETWORK)
    shapes: list[tuple[int, int, int, int]] = []

    def hook(m, inp, out):
        s = (out.shape[2], out.shape[3], m.in_channels, m.out_channels)
        if s not in shapes:
            shapes.append(s)

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model(x)
    return shapes


def block_sparse_weight(k: int, m: int, n: int, sparsity: float, seed: int):
    """A [K, M] weight whose weakest (by L1 norm) `sparsity` of 1xN blocks along M are zero."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, m)).astype("float32") * 0.1
    scores = np.abs(w).reshape(k, m // n, n).sum(-1).ravel()
    drop = np.argsort(scores)[: int(round(sparsity * scores.size))]
    mask = np.ones(scores.size, "float32")
    mask[drop] = 0
    return w * np.repeat(mask.reshape(k, m // n), n, axis=1)


def layer_module(h: int, w: int, weight, bias):
    """conv1x1 (NHWC, HWIO) + bias + ReLU6 as a Relax module: the layer as the network lowers it."""
    from tvm import relax

    k, m = weight.shape
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, h, w, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight.reshape(1, 1, k, m)), data_layout="NHWC",
                                           kernel_layout="HWIO"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def chw_layer(h: int, w: int, weight, bias, n: int, x, target):
    """The layer's channels-first BSR kernel, made from its fused channels-last kernel as a channels_first build
    makes it (kernels/bsr.py "chw"), compiled alone: (the function, its arguments, the output last)."""
    import numpy as np
    import tvm

    from edgeprune.codegen.kernels import bsr, tag_kernels
    from edgeprune.codegen.kernels.common import OP, CpuSpec, tag_of
    from edgeprune.codegen.lower import fused_module

    mod = tag_kernels(fused_module(layer_module(h, w, weight, bias), target))
    func = next(f for _, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and tag_of(f, OP) == "pointwise")
    b = bsr.to_bsr(weight, n)
    kernel = bsr.kernel(bsr.read_fused(func), list(func.params), b, "chw", CpuSpec.of(target))  # threads as the others
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
    k, m = weight.shape
    arrays = [np.ascontiguousarray(x.transpose(0, 3, 1, 2)), b.data, b.indices, b.indptr, bias,
              np.zeros((1, m, h, w), "float32")]
    return lib["main"], [tvm.runtime.tensor(a) for a in arrays]


def kernel_worker(args: argparse.Namespace) -> None:
    """Compile and time every variant of each shape; print one JSON line per shape."""
    import numpy as np
    import tvm
    from tvm import relax

    from edgeprune.codegen.lower import compile_module
    from edgeprune.targets import get_target

    target = get_target("host").tvm_target()
    shapes = pointwise_shapes()
    if args.quick:
        shapes = shapes[:: max(1, len(shapes) // 4)]
    for si, (h, w, k, m) in enumerate(shapes):
        rng = np.random.default_rng(si)
        x = tvm.runtime.tensor(rng.standard_normal((1, h, w, k)).astype("float32"))
        bias = rng.standard_normal(m).astype("float32")
        exes: dict[str, object] = {}
        dense_w = rng.standard_normal((k, m)).astype("float32") * 0.1
        exes["dense"] = compile_module(layer_module(h, w, dense_w, bias), target, sparse=None)[0]
        refs = {}
        for n in [b for b in BLOCKS if m % b == 0]:  # a layer's outputs must split into whole blocks
            for s in SPARSITIES:
                wt = block_sparse_weight(k, m, n, s, seed=si * 100 + n)
                refs[(n, s)] = wt
                for variant in ("channels", "pixels"):
                    pick = f"{variant}:{n}"
                    exes[f"{variant}:{n}:{s}"] = compile_module(layer_module(h, w, wt, bias), target,
                                                                sparse=lambda *_a, p=pick: p)[0]
        vms = {name: relax.VirtualMachine(ex, tvm.cpu()) for name, ex in exes.items()}
        # the channels-first kernel (what a channels_first build runs inside a run): [K, P] in, [M, P] out
        chw_calls = {}
        for (n, s), wt in refs.items():
            chw_calls[f"chw:{n}:{s}"] = chw_layer(h, w, wt, bias, n, x.numpy(), target)
        # numerics once per variant: the sparse kernel against numpy on the same weights
        xin = x.numpy().reshape(h * w, k)
        err = 0.0
        for name, vm in vms.items():
            if name == "dense":
                continue
            variant, n, s = name.split(":")
            ref = np.clip(xin @ refs[(int(n), float(s))] + bias, 0, 6)
            out = vm["main"](x).numpy().reshape(h * w, m)
            err = max(err, float(np.abs(out - ref).max() / max(1e-6, np.abs(ref).max())))
        for name, (kernel, tensors) in chw_calls.items():
            _, n, s = name.split(":")
            ref = np.clip(xin @ refs[(int(n), float(s))] + bias, 0, 6)
            kernel(*tensors)
            out = tensors[-1].numpy().reshape(m, h * w).T
            err = max(err, float(np.abs(out - ref).max() / max(1e-6, np.abs(ref).max())))
        best: dict[str, float] = {}
        for vm in vms.values():
            vm.set_input("main", x)
            for _ in range(3):
                vm.invoke_stateful("main")
        runs = {name: (lambda vm=vm: vm.invoke_stateful("main")) for name, vm in vms.items()}
        runs.update({name: (lambda k=kernel, a=tensors: k(*a)) for name, (kernel, tensors) in chw_calls.items()})
        for _ in range(args.rounds):
            for name, run in runs.items():
                reps = 0
                t0 = time.perf_counter()
                while True:
                    run()
                    reps += 1
                    if reps >= 10 and time.perf_counter() - t0 > args.kernel_seconds:
                        break
                ms = (time.perf_counter() - t0) / reps * 1e3
                best[name] = min(best.get(name, float("inf")), ms)
        print(json.dumps({"shape": [h, w, k, m], "ms": best, "rel_err": err}), flush=True)
        log(f"kernels {h}x{w} {k}->{m}: dense {best['dense']:.4f} ms, err {err:.1e}")


def kernels_section(args: argparse.Namespace) -> tuple[str, list[tuple[str, bool]]]:
    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "kernels", "--rounds", str(args.rounds),
           "--kernel-seconds", str(args.kernel_seconds)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not rows:
        sys.exit("kernel worker failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]))
    lines = ["| layer (HxW, K->M) | dense ms | " + " | ".join(f"1x{n} {int(s * 100)}%" for n in BLOCKS
                                                            for s in SPARSITIES) + " |",
             "|---|---|" + "---|" * (len(BLOCKS) * len(SPARSITIES))]
    speedups: dict[tuple[int, float], list[float]] = {}
    wins: dict[str, int] = {"channels": 0, "pixels": 0}
    worst_err = 0.0
    for r in rows:
        h, w, k, m = r["shape"]
        ms = r["ms"]
        worst_err = max(worst_err, r["rel_err"])
        cells = []
        for n in BLOCKS:
            for s in SPARSITIES:
                if f"channels:{n}:{s}" not in ms:
                    cells.append("-")
                    continue
                ch, px = ms[f"channels:{n}:{s}"], ms[f"pixels:{n}:{s}"]
                wins["channels" if ch <= px else "pixels"] += 1
                up = ms["dense"] / min(ch, px)
                speedups.setdefault((n, s), []).append(up)
                cells.append(f"{up:.2f}x {'c' if ch <= px else 'p'}")
        lines.append(f"| {h}x{w}, {k}->{m} | {ms['dense']:.4f} | " + " | ".join(cells) + " |")
    lines.append("| **geomean** | | " + " | ".join(f"**{geomean(speedups[(n, s)]):.2f}x**" for n in BLOCKS
                                                  for s in SPARSITIES) + " |")
    table = "\n".join(lines)
    table += (f"\n\nSpeed-up = our dense kernel / the faster of our two sparse kernels (c: vectors over a block's "
              f"outputs, p: over transposed pixel tiles; c won {wins['channels']}, p won {wins['pixels']}). "
              f"Largest relative error against numpy: {worst_err:.1e}.")
    chw = {key: geomean([r["ms"]["dense"] / r["ms"][f"chw:{key[0]}:{key[1]}"] for r in rows
                         if f"chw:{key[0]}:{key[1]}" in r["ms"]]) for key in speedups}
    table += ("\n\nThe channels-first kernel (kernels/bsr.py \"chw\": [C, H, W] maps, no transposes), which host "
              "builds run inside channels-first runs when the whole network measures faster so (geomean speed-up "
              "over our dense kernel): "
              + ", ".join(f"1x{n} {int(s * 100)}% {v:.2f}x" for (n, s), v in sorted(chw.items())) + ".")
    # A build runs one layout for the whole network (codegen/build.py measures both): a goal's figure is the better
    # layout's geomean, channels-last (c or p per layer, as the price chooses) or channels-first, never mixed.
    goals, layouts = [], []
    for s in SPARSITIES:
        last, first = geomean(speedups[(4, s)]), chw.get((4, s), float("nan"))
        layout = "channels-first" if first > last else "channels-last"
        layouts.append(f"{int(s * 100)}% {last:.2f}x / {first:.2f}x ({layout})")
        line, met = goal_line(f"kernel-1x4-{int(s * 100)}", max(last, first), ">=", KERNEL_GOALS[s])
        goals.append((line.replace(" (goal", f" {layout} (goal", 1), met))
    table += "\n\nGoals at 1x4, channels-last / channels-first, the better taken: " + ", ".join(layouts) + "."
    goals.append(goal_line("kernel-numerics", -worst_err, ">=", -RTOL, unit=""))
    return table, goals


# ---------------------------------------------------------------- 2. whole network


def network_worker(args: argparse.Namespace) -> None:
    """Time edgeprune builds at T threads in one process, interleaved in slices of ~0.1 s (TVM's pool reads
    TVM_NUM_THREADS once: set before importing). Timed in turn, each for seconds in its own process, two builds of
    one network measured 1.3x apart on this shared host when one of them met a slow spell; interleaved finely, each
    sees the same spells, so their ratio holds (measure.local.measure_interleaved)."""
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np

    from edgeprune.artifacts import Build
    from edgeprune.measure.local import Session, measure_interleaved, random_inputs

    builds = [Build.load(m) for m in args.model.split(",")]
    for build, out_path in zip(builds, args.output.split(",")):
        sess = Session(build)
        np.save(out_path, sess.run([np.load(args.input)])[0])
        if build is builds[0]:  # the first build's run time sizes the slices
            probe = sess.time_runs(random_inputs(build), 10, 5)
    per_slice = max(1, round(100 / max(np.median(probe), 1e-3)))  # ~0.1 s of runs
    rounds = max(3, round(args.seconds * 1000 / (per_slice * np.median(probe))))
    timed = measure_interleaved(builds, runs=per_slice * rounds, warmup=5, threads=args.threads, rounds=rounds,
                                layers=False)
    print(json.dumps({"median_ms": [float(np.median(m.runs_ms)) for m in timed]}))


def _time_ours(build_dirs: list[Path], threads: int, seconds: float, x_path: Path, out_paths: list[Path]
               ) -> list[float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "network",
           "--model", ",".join(str(b) for b in build_dirs), "--threads", str(threads), "--seconds", str(seconds),
           "--input", str(x_path), "--output", ",".join(str(o) for o in out_paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"edgeprune worker on {build_dirs} failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]))
    return json.loads(lines[-1])["median_ms"]


def network_section(args: argparse.Namespace, workdir: Path) -> tuple[str, list[tuple[str, bool]]]:
    import numpy as np
    import torch
    from peers import PeerMissing, model_file, time_peer

    from edgeprune.codegen.build import compile_model
    from edgeprune.compress.block1xn import apply_masks
    from edgeprune.models.reference import build

    x_path = workdir / "input.npy"
    files: dict[float, dict[str, Path]] = {}
    sparse_layers: dict[float, int] = {}
    chose: dict[float, str] = {}
    for s in SPARSITIES:
        model, x = build(NETWORK)
        np.save(x_path, x.numpy())
        pruned = apply_masks(model, s, 4)  # every 1x1 convolution but the stem's: 1x4 blocks by L1 norm
        onnx_path = workdir / f"mbv2-{int(s * 100)}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(onnx_path), opset_version=17, dynamo=False, input_names=["input"])
        t0 = time.perf_counter()
        ours = compile_model(onnx_path, "host", workdir / f"ours-{int(s * 100)}", sparse="auto")
        dense = compile_model(onnx_path, "host", workdir / f"dense-{int(s * 100)}", sparse="dense")
        for layout, first in (("last", False), ("first", True)):  # each layout forced, beside ours' measured pick
            compile_model(onnx_path, "host", workdir / f"{layout}-{int(s * 100)}", sparse="auto",
                          channels_first=first)
        sparse_layers[s] = sum(r.family == "bsr" for r in ours.layers)
        chose[s] = "channels-first" if any("chw" in r.kernel for r in ours.layers) else "channels-last"
        log(f"network {int(s * 100)}%: {len(pruned.masks)} layers pruned, {sparse_layers[s]} compiled sparse, "
            f"{chose[s]} ({time.perf_counter() - t0:.0f} s)")
        files[s] = {"ours": workdir / f"ours-{int(s * 100)}", "dense": workdir / f"dense-{int(s * 100)}",
                    "last": workdir / f"last-{int(s * 100)}", "first": workdir / f"first-{int(s * 100)}",
                    "onnx": onnx_path}
        try:
            files[s]["mnn-sparse"] = model_file("mnn-sparse", onnx_path, workdir, sparse_block=4)
        except PeerMissing as e:
            log(f"MNN not timed: {e}")
    best: dict[tuple[float, str], float] = {}
    x = np.load(x_path)
    errors: dict[tuple[float, str], float] = {}
    for rnd in range(args.rounds):
        for s in SPARSITIES:
            f = files[s]
            ref = time_peer("onnxruntime", f["onnx"], threads=2, seconds=args.seconds, inputs=x)
            best[(s, "onnxruntime")] = min(best.get((s, "onnxruntime"), 1e9), ref.median_ms)
            names = ("ours", "dense", "last", "first")
            out_paths = [workdir / f"out-{name}.npy" for name in names]
            # our four builds paired in one process (their ratios are the goals), each timed as long as a peer
            times = _time_ours([f[name] for name in names], 2, args.seconds, x_path, out_paths)
            for name, ms, out_path in zip(names, times, out_paths):
                best[(s, name)] = min(best.get((s, name), 1e9), ms)
                out, want = np.load(out_path), np.asarray(ref.output)
                errors[(s, name)] = float(np.abs(out - want).max() / max(1e-9, np.abs(want).max()))
            if "mnn-sparse" in f:
                r = time_peer("mnn-sparse", f["mnn-sparse"], threads=2, seconds=args.seconds, inputs=x)
                best[(s, "mnn-sparse")] = min(best.get((s, "mnn-sparse"), 1e9), r.median_ms)
        log(f"network round {rnd + 1}/{args.rounds} done")
    lines = ["| sparsity | layers sparse | ours (auto) ms | our dense ms | MNN sparse ms | onnxruntime ms | "
             "ours vs dense | vs MNN | vs onnxruntime | layout chosen | channels-last ms | channels-first ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    goals = []
    for s in SPARSITIES:
        ours, dense, ort = best[(s, "ours")], best[(s, "dense")], best[(s, "onnxruntime")]
        mnn = best.get((s, "mnn-sparse"), float("nan"))
        lines.append(f"| {int(s * 100)}% | {sparse_layers[s]} | {ours:.3f} | {dense:.3f} | {mnn:.3f} | {ort:.3f} | "
                     f"{dense / ours:.2f}x | {mnn / ours:.2f}x | {ort / ours:.2f}x | {chose[s]} | "
                     f"{best[(s, 'last')]:.3f} | {best[(s, 'first')]:.3f} |")
        if s in NETWORK_GOALS:
            goals.append(goal_line(f"network-vs-dense-{int(s * 100)}", dense / ours, ">=", NETWORK_GOALS[s]))
            goals.append(goal_line(f"network-vs-onnxruntime-{int(s * 100)}", ort / ours, ">", 1.0))
        goals.append(goal_line(f"network-vs-mnn-sparse-{int(s * 100)}", mnn / ours if mnn == mnn else 0.0, ">", 1.0))
    worst = max(errors.values())
    goals.append(goal_line("network-numerics", -worst, ">=", -RTOL, unit=""))
    table = "\n".join(lines) + (f"\n\nMobileNetV2 1.0 @224, 1x4 blocks in every pointwise layer, 2 threads; lowest "
                                f"of {args.rounds} interleaved round medians (our builds paired, ~0.1 s slices, within "
                                f"each round). Largest relative error against "
                                f"onnxruntime: {worst:.1e}. Ours is the default build, whose layout (runs of sparse "
                                f"layers channels-first, kernels/chw.py, or not) the compiler chose by timing both "
                                f"here; the last two columns force each layout, for comparison.")
    return table, goals


# ---------------------------------------------------------------- 4. the build loop


LOOP_FRACTIONS = (0.3, 0.5)


def loop_section(args: argparse.Namespace, workdir: Path) -> tuple[str, list[tuple[str, bool]]]:
    """`edgeprune build --target host --device local` with --sparsity auto against the dense-only build, at budgets
    of 30% and 50% of the largest subnet's measured latency (its lowest median of three, as bench/search.py)."""
    from edgeprune import data
    from edgeprune.cost import new_table, save_table
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.pipeline import SUPERNET, Request, realize, run
    from edgeprune.search import space as S
    from edgeprune.search.select import BudgetError, network_of
    from edgeprune.search.train import load
    from edgeprune.targets import get_target

    target, device = get_target("host"), LocalDevice()
    supernet, ckpt = load(SUPERNET)
    ds = data.load(None, seed=0)
    largest = S.Space(resolutions=tuple(ckpt["space"]["resolutions"])).largest(max(ckpt["space"]["resolutions"]))
    table_path = workdir / "table.json"
    table = new_table(device.identity(target))
    save_table(table_path, table)
    tops = []
    for i in range(3):
        net = network_of(supernet, largest, ds.train[0], name=f"largest-{i}")
        tops.append(realize(net, target, workdir / f"largest-{i}", device, table, table_path, 50, "median",
                            layers=False).value_ms)
    top = min(tops)
    log(f"loop: largest subnet {top:.3f} ms")
    rows, goals = [], []
    for f in LOOP_FRACTIONS:
        budget = round(top * f, 3)
        result = {}
        for name, sparsity in (("dense", None), ("sparse", "auto")):
            t0 = time.perf_counter()
            # Each build learns in its own copy of the table: both start from the same measurements (the largest
            # subnet's), so neither is helped by what the other measured before it.
            own = workdir / f"table-{name}-{f}.json"
            shutil.copyfile(table_path, own)
            try:
                report = run(Request(target="host", budget_ms=budget, out=workdir / f"{name}-{f}", device="local",
                                     table=own, runs=50, statistic="median", quiet=True, sparsity=sparsity))
            except BudgetError as e:  # the build's answer when nothing it measured or predicts fits: a result
                result[name] = None
                log(f"loop {f:.0%} {name}: {e} ({time.perf_counter() - t0:.0f} s)")
                continue
            result[name] = report
            log(f"loop {f:.0%} {name}: {report['latency']['measured_ms']:.3f} ms of {budget:.3f}, test "
                f"{report['accuracy']['test']:.1%} ({time.perf_counter() - t0:.0f} s)")
        d, s = result["dense"], result["sparse"]
        none = "no subnet within the budget |"

        def measured(r: dict) -> str:
            return f"{r['latency']['measured_ms']:.3f} ms{'' if r['met'] else ' (over)'}, {r['accuracy']['test']:.1%}"

        row = f"| {f:.0%} ({budget:.3f} ms) | "
        row += none if d is None else f"{measured(d)} | "
        if s is None:
            row += none + " - | - |"
        else:
            sp = s["sparsity"]
            row += (f"{measured(s)} | {sp['chosen']:.0%} "
                    f"({sp['layers_sparse']} of {sp['layers_pointwise']} pointwise layers sparse) | "
                    + "; ".join(f"{t['sparsity']:.0%}: {t['val_accuracy']:.1%} val" for t in sp["tried"]) + " |")
        rows.append(row)
        # a build that found no subnet within the budget, or whose last measurement missed it (`edgeprune build`
        # exits 1), delivers nothing at that budget: any build that meets it is at least as accurate
        acc = {k: 0.0 if r is None or not r["met"] else r["accuracy"]["test"] for k, r in (("dense", d), ("sparse", s))}
        goals.append(goal_line(f"loop-accuracy-vs-dense-{int(f * 100)}", (acc["sparse"] - acc["dense"]) * 100, ">=",
                               0.0, unit=" points"))
        goals.append(goal_line(f"loop-within-budget-{int(f * 100)}",
                               0.0 if s is None else budget / s["latency"]["measured_ms"], ">=", 1.0))
    table_text = ("| budget (of the largest) | dense-only build: measured, test | --sparsity auto: measured, test | "
                  "chosen | tried (validation) |\n|---|---|---|---|---|\n" + "\n".join(rows))
    return table_text, goals


# ---------------------------------------------------------------- driver


def main(args: argparse.Namespace) -> int:
    results: list[tuple[str, list[tuple[str, bool]]]] = []
    if "kernels" in args.sections:
        results.append(kernels_section(args))
        print("## Kernels (host, 1 thread)\n\n" + results[-1][0] + "\n", flush=True)
    if "network" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(network_section(args, Path(tmp)))
        print("## Whole network\n\n" + results[-1][0] + "\n", flush=True)
    if "loop" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(loop_section(args, Path(tmp)))
        print("## The build loop (host, local)\n\n" + results[-1][0] + "\n", flush=True)
    if "accuracy" in args.sections:
        from sparse_accuracy import accuracy_goals

        table, lines = accuracy_goals()
        results.append((table, [(ln, ln.rstrip().endswith(" met")) for ln in lines]))
        print("## Accuracy\n\n" + table + "\n", flush=True)
    goals = [g for _, gs in results for g in gs]
    for line, _ in goals:
        print(line)
    return 0 if all(met for _, met in goals) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=["kernels", "network", "accuracy", "loop"],
                   choices=["kernels", "network", "accuracy", "loop"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (lowest round median kept)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per network run and round")
    p.add_argument("--kernel-seconds", type=float, default=0.05, help="timed seconds per kernel and round")
    p.add_argument("--quick", action="store_true", help="a quarter of the kernel shapes")
    p.add_argument("--worker", choices=["kernels", "network"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    if a.worker == "kernels":
        kernel_worker(a)
    elif a.worker == "network":
        network_worker(a)
    else:
        sys.exit(main(a))
