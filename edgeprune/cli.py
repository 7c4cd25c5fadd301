"""edgeprune's command line: build · train-supernet · targets · compile · run · measure · check · calibrate · predict.

Every user mistake becomes one line on stderr and exit code 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

from . import api
from .errors import UserError
from .version import __version__

DEVICES = "local, rpc://HOST:PORT/KEY, serial://PATH?baud=N or qemu://TARGET (default: local)"
TARGET_HELP = "device target: a name (edgeprune targets lists them) or the path of a board TOML"


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape; write it like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' has a non-positive dimension")
    return dims


def _at_least(minimum: int):
    """argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be at least {minimum}")
        return v

    return parse


def _size(flag: str):
    """argparse type: a size in bytes, written 512KiB, 2MiB, 640KB or 4096."""

    def parse(text: str) -> int:
        from .artifacts import parse_bytes

        try:
            return parse_bytes(text, flag)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def cmd_targets(args) -> int:
    from .resources import shipped
    from .targets import target_files, template, user_targets_dir

    if args.template:
        sys.stdout.write(template(args.template))
        return 0
    files, found = target_files(), api.targets()
    if args.json:
        print(json.dumps([{**_target_json(t), "from": files[t.name].origin, "file": str(files[t.name].path)}
                          for t in found], indent=2))
        return 0
    print(f"{'name':<12} {'triple':<26} {'cpu':<14} {'SIMD':>5} {'cores':>5} {'MHz':>6}  {'from':<8} description")
    for t in found:
        print(f"{t.name:<12} {t.triple:<26} {t.cpu:<14} {t.simd_bits:>5} {t.cores:>5} {t.clock_mhz:>6}  "
              f"{files[t.name].origin:<8} {t.description}")
    print(f"\nshipped: {shipped('targets')}")
    print(f"yours:   {user_targets_dir()} (a board TOML there is found by its file name; start one with "
          f"edgeprune targets --template cortex-a7 > myboard.toml)")
    replaced = [f.name for f in files.values() if f.replaces_shipped]
    if replaced:
        print(f"yours replace the shipped targets of the same name: {', '.join(replaced)}")
    return 0


def _target_json(t) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in t.__dict__.items() if k != "extra"}


def cmd_compile(args) -> int:
    build = api.compile(args.model, args.target, args.output, input_shape=args.input_shape, format=args.format,
                        name=args.name, tune_trials=args.tune_trials, sparse=args.sparse, ram=args.ram,
                        flash=args.flash)
    if args.json:
        print(json.dumps(build.to_json(), indent=2))
    else:
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in build.inputs)
        print(f"compiled {args.model} for {build.target} in {build.compile_seconds:.1f} s -> {args.output} "
              f"({len(build.kernels)} kernels; input {ins})")
        sparse = [r for r in build.layers if r.family == "bsr"]
        if sparse:
            print(f"block-sparse: {len(sparse)} layers ("
                  + ", ".join(f"{(r.sources or (r.kernel,))[0]} 1x{r.block} at {r.density:.0%}" for r in sparse[:4])
                  + (", ..." if len(sparse) > 4 else "") + "); the rest dense")
        if build.memory:
            m = build.memory
            print(f"C package {m['package']}: arena {m['arena_bytes']:,} B for {m['intermediate_bytes']:,} B of "
                  f"intermediate tensors ({m['arena_bytes'] / max(1, m['intermediate_bytes']):.0%}), "
                  f"workspace {m['workspace_bytes']:,} B (in the arena), weights {m['weight_bytes']:,} B")
            if "ram_bytes" in m:
                print(_memory_line(m))
        if build.unscheduled:
            print(f"note: {len(build.unscheduled)} kernel(s) run unscheduled: {', '.join(build.unscheduled[:5])}")
    return 0


def _memory_line(m: dict) -> str:
    """RAM and flash beside their budgets, as compile and build print them."""
    from .artifacts import format_bytes

    def part(name: str, what: str, key: str) -> str:
        limit = m.get(f"{key}_budget_bytes")
        return f"{name} {format_bytes(m[f'{key}_bytes'])} ({what})" + (
            f" of {format_bytes(limit)} budget" if limit else "")

    code = f"code {format_bytes(m['code_bytes'])} + weights"
    return f"{part('RAM', 'arena + workspace', 'ram')}; {part('flash', code, 'flash')}"


def _load_inputs(paths: list[str], build) -> list:
    import numpy as np

    arrays = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"input file {p} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{p} is not a .npy/.npz array file ({str(e).splitlines()[0][:120]}); "
                            "save inputs with numpy.save") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            names = {s.name for s in build.inputs}
            if set(data.files) >= names:
                arrays += [data[s.name] for s in build.inputs]
            else:
                arrays += [data[k] for k in data.files]
        else:
            arrays.append(data)
    return arrays


def _atomic_save(path: Path, arrays: list, names: list[str]) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **dict(zip(names, arrays)))
            else:
                np.save(f, arrays[0])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_run(args) -> int:
    build = api.load(args.build)
    out = Path(args.output)
    if out.suffix not in (".npy", ".npz"):
        raise UserError(f"output {out} must end in .npy (one output) or .npz (all outputs by name)")
    if out.suffix == ".npy" and len(build.outputs) > 1:
        raise UserError(f"the model has {len(build.outputs)} outputs; write them with -o FILE.npz")
    inputs = _load_inputs(args.input, build)
    results = api.run(build, inputs, args.device, args.threads)
    _atomic_save(out, results, [s.name for s in build.outputs])
    print(f"wrote {out} ({', '.join(str(list(r.shape)) for r in results)})")
    if args.debug_layers:
        return _debug_layers(build, inputs, args)
    return 0


def _debug_layers(build, inputs, args) -> int:
    from .measure.debug_layers import TOLERANCE, debug_layers

    if build.format != "c":
        raise UserError("--debug-layers compares a C package's layers; compile with --format c")
    out_dir = Path(args.debug_dir or Path(build.directory) / "debug-layers")
    diffs, first = debug_layers(build, inputs, args.device, out_dir)
    print(f"{'step':>4}  {'kernel':<60} {'values':>9} {'max |diff|':>11} {'relative':>10}")
    for d in diffs:
        mark = "  <- first divergence" if d.step == first else ""
        print(f"{d.step:>4}  {d.kernel[:60]:<60} {d.size:>9} {d.max_abs:>11.3g} {d.rel:>10.3g}{mark}")
    print(f"dumps: {out_dir}/device and {out_dir}/reference (layer_NNNN.bin, float32)")
    if first >= 0:
        d = diffs[first]
        print(f"layer {d.step} ({d.kernel}) is the first to diverge: relative error {d.rel:.3g} > {TOLERANCE:g}")
        return 1
    print(f"all {len(diffs)} layers match the reference within {TOLERANCE:g} (relative)")
    return 0


def cmd_measure(args) -> int:
    build = api.load(args.build)
    m = api.measure(build, args.device, runs=args.runs, warmup=args.warmup, threads=args.threads,
                    layers=not args.no_layers)
    s = m.summary()
    if args.json:
        print(json.dumps(s))
        return 0
    threads = f", {m.threads} threads" if m.threads else ""
    print(f"{build.directory} on {m.device} ({m.target}{threads}, {len(m.runs_ms)} runs after {args.warmup} warm-up)")
    print(f"  median {s['median_ms']:.3f} ms   p10 {s['p10_ms']:.3f} ms   p90 {s['p90_ms']:.3f} ms")
    if not m.real_time:
        print("  note: emulated runs; these times are not the device's latency")
    if m.contended:
        print(f"  {m.contention_note()}")
    if m.layers:
        print(f"  {'layer (kernel where the model has no name for it)':<56} {'kernel':<16} {'ms':>8} {'share':>6} "
              f"{'GFLOP/s':>8}")
        for row in m.layers:
            names = row.get("sources") or [row["name"]]
            calls = max(1, int(row.get("calls", 1)))
            per_call = max(1, len(names) // calls)  # 2: a depthwise and a pointwise layer as one kernel
            label = names[0] + (f" (+{calls - 1} alike)" if calls > 1 else "")
            kind = row.get("kernel", "dense") + (" dw+pw" if per_call > 1 else "")
            print(f"  {label[:56]:<56} {kind:<16} {row['ms']:>8.4f} "
                  f"{row['share'] * 100:>5.1f}% {row['gflops']:>8.1f}")
    return 0


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; write it like 50ms, 0.05s or 1500us")
    value = float(m.group(1)) * {"ms": 1.0, "s": 1e3, "us": 1e-3, None: 1.0}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than zero")
    return value


def cmd_check(args) -> int:
    """Exit 1 when the build misses its latency budget on the device (p90 by default)."""
    build = api.load(args.build)
    result = api.check(build, args.latency, args.device, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       statistic="median" if args.median else "p90")
    m, stat, value, ok = result.measurement, result.statistic, result.value_ms, result.met
    verdict = "within" if ok else "misses"
    line = (f"{build.directory} on {m.device}: {stat} {value:.3f} ms {verdict} the budget of {args.latency:g} ms "
            f"({len(m.runs_ms)} runs)")
    if args.junit:
        _write_junit(Path(args.junit), build, m, stat, value, args.latency, ok, line)
    if args.json:
        print(json.dumps({**m.summary(), "statistic": stat, "value_ms": round(value, 4),
                          "budget_ms": args.latency, "met": ok}))
    else:
        print(line)
    if m.contended:
        print(f"edgeprune: {m.contention_note()}", file=sys.stderr)
    return 0 if ok else 1


def _write_junit(path: Path, build, m, stat: str, value: float, budget: float, ok: bool, line: str) -> None:
    from xml.sax.saxutils import quoteattr

    name = quoteattr(f"latency[{Path(build.directory).name}@{m.device}]")
    body = "" if ok else f"<failure message={quoteattr(line)} type=\"LatencyBudget\"/>"
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
           f'<testsuite name="edgeprune" tests="1" failures="{0 if ok else 1}" errors="0" '
           f'time="{sum(m.runs_ms) / 1e3:.3f}">\n'
           f'  <testcase classname="edgeprune.check" name={name} time="{value / 1e3:.6f}">{body}'
           f'<system-out>{stat}={value:.4f}ms budget={budget:g}ms device={m.device}</system-out></testcase>\n'
           f'</testsuite>\n')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(xml)
    os.replace(tmp, path)


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .measure.devices import get_device
    from .targets import get_target

    target = get_target(args.target)
    device = get_device(args.device)
    out = calibrate(target, device, Path(args.output) if args.output else None, count=args.count, runs=args.runs,
                    warmup=args.warmup, threads=args.threads,
                    progress=(lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True)))
    print(f"wrote {out}")
    return 0


def cmd_predict(args) -> int:
    from .cost import load_table, model_for
    from .targets import get_target

    build = api.load(args.build)
    table = load_table(args.table) if args.table else None
    p = model_for(get_target(build.target), table).predict(build.layers)
    report = {"predicted_ms": round(p.ms, 4), "band_ms": [round(v, 4) for v in p.band_ms], "source": p.source,
              "kernels_by_source": p.sources, "table": args.table}
    if args.json:
        print(json.dumps(report))
    else:
        note = "" if args.table else " (no table: the target's prior, not a measurement)"
        lo, hi = p.band_ms
        band = f"; boards of this core: {lo:.3f}-{hi:.3f} ms" if hi > lo else ""
        print(f"{build.directory}: predicted {p.ms:.3f} ms on {build.target} from {p.source}{note}{band}")
    return 0


def cmd_build(args) -> int:
    from .search.select import BudgetError

    out = Path(args.output or f"out/build-{args.target}")
    try:
        report = api.build(args.target, args.latency, out, device=args.device, data=args.data,
                           supernet=args.supernet, table=args.table, rounds=args.rounds, format=args.format,
                           runs=args.runs, statistic="median" if args.median else "p90", seed=args.seed,
                           finetune_steps=args.finetune_steps, optimistic=args.optimistic,
                           quiet=args.quiet or args.json, sparsity=args.sparsity, block=args.block,
                           prune_steps=args.prune_steps, quantize=args.quantize, calibration=args.calibration,
                           max_drop=args.max_drop, per_class=args.per_class, ram=args.ram, flash=args.flash,
                           binarize=args.binarize, binary_fraction=args.binary_fraction,
                           binarize_steps=args.binarize_steps, distill_steps=args.distill_steps)
    except BudgetError as e:
        print(f"edgeprune: {e}", file=sys.stderr)
        return 1
    lat, acc = report["latency"], report["accuracy"]
    if args.json:
        print(json.dumps(report))
    else:
        lo, hi = lat["band_ms"]
        band = f" (boards of this core: {lo:.3g}-{hi:.3g} ms; judged at the {lat['judged']})" if hi > lo else ""
        how = (f"measured {report['statistic']} {lat['measured_ms']:.3f} ms on {report['device']}"
               if lat["measured_ms"] is not None else
               f"predicted {lat['predicted_ms']:.3f} ms from the {lat['predicted_source']} model{band} (no device "
               "attached: not measured)")
        print(f"{out}: {how}; budget {report['budget_ms']:g} ms {'met' if report['met'] else 'MISSED'}")
        print(f"  test accuracy {acc['test']:.1%} after {acc['finetune_steps']} fine-tuning steps (before "
              f"{acc['before_finetune']['test']:.1%}; unpruned {acc['unpruned_test']:.1%}), "
              f"{report['macs'] / 1e6:.1f}M MACs, {report['parameters'] / 1e6:.2f}M parameters, "
              f"{report['architecture']['resolution']} px")
        sp = report.get("sparsity") or {}
        if sp.get("requested") is not None:
            tried = "; ".join(f"{t['sparsity']:.0%}: {t['val_accuracy']:.1%} val at {t['predicted_ms']:.3g} ms "
                              f"predicted" for t in sp["tried"])
            print(f"  1x{sp['block']} sparsity {sp['chosen']:.0%} ({sp['why']}; tried {tried}); "
                  f"{sp['layers_sparse']} of {sp['layers_pointwise']} pointwise layers compiled sparse")
        qz = report.get("quantize") or {}
        if qz.get("requested") is not None:
            tried = "; ".join(f"{t['precision']}: {t['val_accuracy']:.1%} val at {t['predicted_ms']:.3g} ms predicted"
                              for t in qz["tried"])
            int8 = sum(1 for layer in qz["layers"] if layer["precision"] == "int8")
            print(f"  precision {qz['chosen']} ({qz['why']}; tried {tried}); {int8} of {len(qz['layers'])} layers "
                  f"compiled int8, calibrated on {qz['calibration']}")
        bz = report.get("binarize") or {}
        if bz.get("requested") is not None:
            tried = "; ".join(f"{t['precision']}: {t['val_accuracy']:.1%} val at {t['predicted_ms']:.3g} ms predicted"
                              for t in bz["tried"])
            weights = (f", their weights {bz['weight_bytes']} bytes against {bz['fp32_weight_bytes']} in fp32"
                       if bz.get("layers") else "")
            print(f"  precision {bz['chosen']} ({bz['why']}; tried {tried}); {len(bz['kernels_binary'])} layers "
                  f"compiled binary{weights}")
        if report.get("memory"):
            print(f"  {_memory_line(report['memory'])}")
        print(f"  report: {out / 'report.html'}")
    if not report["met"]:
        print(f"edgeprune: the budget was missed; the smallest latency reached is {report.get('smallest_ms') or 0:.3f} "
              "ms", file=sys.stderr)
        return 1
    return 0


def _sparsity(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a sparsity; write a fraction like 0.5, or auto") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 0 and below 1 (the fraction of blocks pruned)")
    return value


def _resolutions(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of resolutions; write it like 64,80,96") from None
    if not values or values[0] < 32 or values[-1] > 224 or any(v % 16 for v in values):
        raise argparse.ArgumentTypeError(f"resolutions must be multiples of 16 between 32 and 224, got '{text}'")
    return values


def cmd_train_supernet(args) -> int:
    from . import data
    from .pipeline import latency_function, progress_bar
    from .search.train import SANDWICH_ONLY, TrainConfig, load_state, save, train

    out = Path(args.output)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".state")
    state = None
    if args.resume:
        state = load_state(ckpt_path if args.resume is True else Path(args.resume))
        # A resumed run is the same run: its data, steps, seed and subnet draws come from the checkpoint.
        cfg = TrainConfig.from_dict(state["config"])
        ds = data.load(state["dataset"], seed=cfg.seed)
    else:
        ds = data.load(args.data, seed=args.seed)
        cfg = TrainConfig(steps=args.steps, batch=args.batch, seed=args.seed, target=args.target,
                          resolutions=args.resolutions or TrainConfig.resolutions)
        if args.sandwich_only:
            cfg.phases = dict(SANDWICH_ONLY)
    with progress_bar(cfg.steps, "train supernet", quiet=args.quiet) as bar:
        if state is not None:
            bar(int(state["step"]), cfg.steps, "resumed", float("nan"))
        ckpt = train(ds, cfg, latency_function(cfg.target), bar, resume=state,
                     checkpoint=lambda s: save(s, ckpt_path), every_s=60 * args.checkpoint_minutes)
    if int(os.environ.get("RANK", "0")) == 0:
        save(ckpt, out)
        if not args.quiet:
            best = max((p["val_accuracy"] for p in ckpt["pools"]), default=0.0)
            print(f"wrote {out}: largest subnet {ckpt['largest']['val_accuracy']:.1%} on validation, "
                  f"{len(ckpt['pools'])} pool subnets (best {best:.1%}); training state in {ckpt_path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprune", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("build", help="search, compile and measure a network that meets a latency budget")
    s.add_argument("--target", "-t", required=True, help=TARGET_HELP)
    s.add_argument("--latency", type=_duration_ms, required=True, help="the budget, e.g. 50ms, 0.05s, 1500us")
    s.add_argument("--device", help="measure on it: " + DEVICES.replace(" (default: local)", "") +
                   " (default: none, the latency is predicted)")
    s.add_argument("--data", help="ImageFolder directory or .npz (default: the built-in digit scenes)")
    s.add_argument("--output", "-o", help="output directory (default: out/build-TARGET)")
    s.add_argument("--supernet", help="checkpoint from edgeprune train-supernet (default: the shipped one)")
    s.add_argument("--table", help="the device's latency table (default: calibrate/<device>.json if present)")
    s.add_argument("--rounds", type=_at_least(1), default=3, help="search-measure rounds at most (default: 3)")
    s.add_argument("--format", choices=("so", "c"), help="output format (default: the target's)")
    s.add_argument("--runs", type=_at_least(3), default=50, help="timed runs per measurement (default: 50)")
    s.add_argument("--median", action="store_true", help="judge the median instead of the p90")
    s.add_argument("--optimistic", action="store_true",
                   help="with no device, judge the prior's centre, not the slow edge of its band (boards of one core "
                        "differ by ~1.5x)")
    s.add_argument("--finetune-steps", type=_at_least(0),
                   help="steps fine-tuning the chosen subnet, distilled from the largest (default: 200; 0: none)")
    s.add_argument("--sparsity", type=_sparsity,
                   help="prune the subnet's pointwise layers in 1xN blocks: a fraction of blocks (0.5, 0.75), or auto "
                        "(try none, 0.5 and 0.75, each searched with sparse pricing, and keep the most accurate) "
                        "(default: none)")
    s.add_argument("--block", type=int, choices=(4, 8, 16), default=4, help="N of the 1xN blocks (default: 4)")
    s.add_argument("--prune-steps", type=_at_least(0), help="fine-tuning steps while pruning (default: 200)")
    s.add_argument("--quantize", choices=("int8", "w4a8", "auto"),
                   help="post-training quantization of the subnet, searched with int8 pricing: int8 (W8A8), w4a8 "
                        "(4-bit weights, first and last layers at 8), or auto (try fp32 and int8, keep the most "
                        "accurate, int8 only within --max-drop) (default: fp32)")
    s.add_argument("--calibration", choices=("fdda", "real", "noise"), default="fdda",
                   help="what quantization calibrates on: fdda (synthetic images aligned to per-class BatchNorm "
                        "statistics from --per-class real images per class), real images, or noise (default: fdda)")
    s.add_argument("--max-drop", type=float, default=1.0,
                   help="--quantize auto: the most validation accuracy int8 may cost, in points (default: 1)")
    s.add_argument("--per-class", type=_at_least(1), default=4, help="FDDA: real images per class (default: 4)")
    s.add_argument("--distill-steps", type=_at_least(0),
                   help="steps distilling the quantized subnet from its fp32 self on the calibration images, through "
                        "the quantizers (FDDA's fine-tuning) (default: 200 at w4a8, 0 at int8)")
    s.add_argument("--binarize", choices=("recu", "siman", "auto"),
                   help="binary 1x1 layers (1-bit weights and activations, bit-packed kernels), searched with their "
                        "pricing and trained from the fine-tuned weights: recu, siman, or auto (try fp32, recu and "
                        "siman, keep the most accurate) (default: none)")
    s.add_argument("--binary-fraction", type=float, default=0.1,
                   help="--binarize: the share of 1x1 layers made binary, those the device's costs say save the most "
                        "time (default: 0.1)")
    s.add_argument("--binarize-steps", type=_at_least(0), help="--binarize: training steps (default: 200)")
    s.add_argument("--ram", type=_size("--ram"), metavar="SIZE",
                   help="C package RAM (arena + workspace) the subnet must fit, e.g. 256KiB")
    s.add_argument("--flash", type=_size("--flash"), metavar="SIZE",
                   help="C package flash (code + weights) the subnet must fit, e.g. 1MiB")
    s.add_argument("--seed", type=int, default=0, help="data split seed")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("train-supernet", help="train the elastic supernet the search draws subnets from")
    s.add_argument("--data", help="ImageFolder directory or .npz (default: the built-in digit scenes)")
    s.add_argument("--output", "-o", default="supernet.pt", help="checkpoint to write (default: supernet.pt)")
    s.add_argument("--steps", type=_at_least(4), default=600, help="optimizer steps over all phases (default: 600)")
    s.add_argument("--batch", type=_at_least(2), default=32, help="images per step over all processes")
    s.add_argument("--resolutions", type=_resolutions, help="training resolutions (default: 64,80,96)")
    s.add_argument("--target", "-t", default="cortex-a7",
                   help="target whose latency buckets the pools: a name or a board TOML's path")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sandwich-only", action="store_true",
                   help="every subnet size from the first step, no progressive shrinking (the default shrinks: the "
                        "full network, then elastic kernel, depth and width)")
    s.add_argument("--checkpoint", help="training state written every few minutes (default: OUTPUT.state)")
    s.add_argument("--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints (default: 5)")
    s.add_argument("--resume", nargs="?", const=True, metavar="STATE",
                   help="continue the run whose state is STATE (default: the --checkpoint path); its data, steps, "
                        "seed and resolutions are the checkpoint's")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train_supernet)

    s = sub.add_parser("targets", help="list the device targets: shipped ones and yours")
    s.add_argument("--json", action="store_true", help="print them as JSON")
    s.add_argument("--template", metavar="TARGET",
                   help="print a commented board TOML to start your own from, e.g. --template cortex-a7 > my.toml")
    s.set_defaults(fn=cmd_targets)

    s = sub.add_parser("compile", help="compile a .onnx, .pt2 or .tflite model for a target")
    s.add_argument("model", help=f"model file, or {api.BUILTIN_PREFIX}NAME for a built-in reference network")
    s.add_argument("--target", "-t", default="host", help=f"{TARGET_HELP} (default: host)")
    s.add_argument("--output", "-o", required=True, help="build directory to write")
    s.add_argument("--input-shape", type=_shape, help="fixed input shape for a model with dynamic dimensions")
    s.add_argument("--format", choices=["so", "c"],
                   help="so: shared library for Linux boards with the TVM runtime; c: self-contained C package "
                        "(no heap, no threads) for firmware (default: the target's)")
    s.add_argument("--name", help="C package name, the prefix of its API (default: from the model file name)")
    s.add_argument("--tune-trials", type=_at_least(0), default=0, metavar="N",
                   help="refine the kernels with N MetaSchedule trials; records are cached per target")
    s.add_argument("--sparse", choices=["auto", "sparse", "dense"], default="auto",
                   help="layers whose weights have 1xN zero blocks: auto compiles each sparse or dense, whichever "
                        "the target's latency model prices faster; sparse always; dense ignores the zeros "
                        "(default: auto)")
    s.add_argument("--ram", type=_size("--ram"), metavar="SIZE",
                   help="C package: fail unless the arena plus workspace fit, e.g. 512KiB")
    s.add_argument("--flash", type=_size("--flash"), metavar="SIZE",
                   help="C package: fail unless the code plus weights fit, e.g. 2MiB")
    s.add_argument("--json", action="store_true", help="print the build report as JSON")
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser("run", help="run a build on inputs from .npy/.npz files")
    s.add_argument("build", help="build directory")
    s.add_argument("--input", "-i", action="append", required=True, help=".npy (one input) or .npz file")
    s.add_argument("--output", "-o", required=True, help=".npy or .npz file to write")
    s.add_argument("--device", default="local",
                   help="local, rpc://HOST:PORT/KEY, or qemu://TARGET to run a C package under emulation "
                        "(default: local)")
    s.add_argument("--threads", type=_at_least(1), help="CPU threads (default: all)")
    s.add_argument("--debug-layers", action="store_true",
                   help="C packages: dump every layer on the device and on an independent host reference, and name "
                        "the first layer that diverges (exit 1 if one does)")
    s.add_argument("--debug-dir", help="where --debug-layers writes the dumps (default: BUILD/debug-layers)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("measure", help="latency of a build: median, p10, p90 and a per-layer profile")
    s.add_argument("build", help="build directory")
    s.add_argument("--device", default="local", help=DEVICES)
    s.add_argument("--runs", type=_at_least(1), default=100)
    s.add_argument("--warmup", type=_at_least(0), default=10)
    s.add_argument("--threads", type=_at_least(1), help="CPU threads (default: all)")
    s.add_argument("--no-layers", action="store_true", help="skip the per-layer profile")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_measure)

    s = sub.add_parser("check", help="exit 1 when a build misses its latency budget on a device (for CI)")
    s.add_argument("build", help="build directory")
    s.add_argument("--device", default="local", help=DEVICES)
    s.add_argument("--latency", type=_duration_ms, required=True, help="the budget, e.g. 50ms, 0.05s, 1500us")
    s.add_argument("--median", action="store_true", help="judge the median instead of the p90")
    s.add_argument("--runs", type=_at_least(1), default=100)
    s.add_argument("--warmup", type=_at_least(0), default=10)
    s.add_argument("--threads", type=_at_least(1), help="CPU threads on local (default: all)")
    s.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("calibrate", help="time a suite of small builds on a device; write its latency table")
    s.add_argument("--target", "-t", default="host", help="the device's target: a name or a board TOML's path")
    s.add_argument("--device", default="local", help=DEVICES)
    s.add_argument("--output", "-o",
                   help="table to write (default: calibrate/<device>.json in your data directory, $EDGEPRUNE_HOME "
                        "or the platform's)")
    s.add_argument("--count", type=_at_least(3), default=36, help="builds in the suite (default: 36)")
    s.add_argument("--runs", type=_at_least(1), default=30)
    s.add_argument("--warmup", type=_at_least(0), default=5)
    s.add_argument("--threads", type=_at_least(1), help="CPU threads on local (default: all)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("predict", help="a build's latency from the latency model")
    s.add_argument("build", help="build directory")
    s.add_argument("--table", help="the device's calibration table (default: none, the target's prior)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Library deprecation chatter (torch.export, the ONNX exporter) is not for our users' terminals.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"edgeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeprune: interrupted; nothing was left half-written, re-run the command", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
