"""Quantization accuracy benchmark (issue 14's accuracy goal): fp32 against W8A8 and W4A8 post-training quantization
with each calibration source, on the built-in data, for the demo's subnet and the largest subnet.

Protocol, seeded and single-threaded:
  1. subnets: the demo's (what `make demo` builds: the search for cortex-a7 at 50 ms on the prior, judged at its band's
     slow edge, then fine-tuned as build does) and the supernet's largest; BatchNorm recalibrated as build does;
  2. calibration images, made once per subnet and shared by both bit widths:
       real   256 training images;
       fdda   4 real training images per class give the BN-statistics centres; 4 synthetic images per class;
       zeroq  as many images aligned to the global BN statistics (no classes, no real data);
       noise  as many Gaussian-noise images (the floor);
  3. quantize.quantize: BatchNorm folded after the data is made; W8A8, and W4A8 with the first and last layers at 8,
     each as `build --quantize` makes it (compress.quantize_network): at W4A8 the quantized network is then
     distilled from fp32 on the calibration images (FDDA's fine-tuning, compress/distill.py; --distill-steps,
     default 200), kept when that raises validation accuracy; at W8A8 not. W4A8 with activation ranges only (no
     distillation) is listed beside it;
  4. top-1 on the test split (held-out digits) of the fake-quantized network, and how often it agrees with fp32's
     top-1 (a finer view than accuracy when sources differ by a test image or two: one is 0.12 points).

Goals, per subnet, in points of test accuracy: FDDA - real >= -1.0 at W8A8 and at W4A8; FDDA - ZeroQ > 0 and
FDDA - noise > 0 at W4A8. One GOAL line each; exits 1 when any is missed.

    python bench/quant_accuracy.py [--seed 0] [--steps 40] [--finetune-steps 200] [--distill-steps 200] [--cache FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

BUDGET_MS, TARGET = 50.0, "cortex-a7"  # make demo's build
SOURCES = ("real", "fdda", "zeroq", "noise")
PRECISION = {"W8A8": "int8", "W4A8": "w4a8"}  # the table's labels: compress.PRECISIONS' names
GOALS = (  # (name, other source, bits, threshold, strict)
    ("fdda-vs-real-w8a8", "real", "W8A8", -1.0, False),
    ("fdda-vs-real-w4a8", "real", "W4A8", -1.0, False),
    ("fdda-vs-zeroq-w4a8", "zeroq", "W4A8", 0.0, True),
    ("fdda-vs-noise-w4a8", "noise", "W4A8", 0.0, True),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_subnet(supernet, ckpt: dict, ds, seed: int, finetune_steps: int | None, cache: Path | None,
                say: Callable[[str], None]):
    """The subnet `make demo` builds (pipeline.run's search on the cortex-a7 prior, then its fine-tuning), as a
    module and its resolution. With `cache`, the fine-tuned weights are kept there, keyed by architecture."""
    import torch

    from edgeprune.cost import model_for, new_table
    from edgeprune.pipeline import FINETUNE_STEPS
    from edgeprune.search import space as S
    from edgeprune.search.evaluate import subnet
    from edgeprune.search.finetune import finetune
    from edgeprune.search.select import network_of, priced_by, search
    from edgeprune.targets import get_target

    steps = FINETUNE_STEPS if finetune_steps is None else finetune_steps
    model = model_for(get_target(TARGET), new_table(None))
    resolutions = tuple(ckpt["space"]["resolutions"])
    best, _ = search(supernet, ckpt, ds, priced_by(model), BUDGET_MS / model.band[1], resolutions, say)
    arch = best.arch
    key = f"{arch.key()}|{steps}|{seed}"
    net = network_of(supernet, arch, ds.train[0]).module
    if cache and cache.exists() and (saved := torch.load(cache, weights_only=True)).get("key") == key:
        net.load_state_dict(saved["state"])
        say(f"demo subnet: fine-tuned weights from {cache}")
    elif steps > 0:
        largest = S.Space(resolutions=resolutions).largest(max(resolutions))
        teacher = subnet(supernet, largest, ds.train[0])
        t = time.perf_counter()
        net = finetune(net, arch.resolution, teacher, largest.resolution, ds, steps, seed)
        say(f"demo subnet: fine-tuned {steps} steps in {time.perf_counter() - t:.0f} s")
        if cache:
            torch.save({"key": key, "state": net.state_dict()}, cache)
    return net.eval(), arch


def predictions(net, x, resolution: int):
    """Top-1 classes of `net` on uint8 images `x`."""
    import numpy as np
    import torch

    from edgeprune import data
    from edgeprune.training import EVAL_BATCH

    with torch.no_grad():
        return np.concatenate([net(data.tensors(x[i:i + EVAL_BATCH], resolution)).argmax(1).numpy()
                               for i in range(0, len(x), EVAL_BATCH)])


def _subnet_rows(name: str, net, resolution: int, ds, seed: int, steps: int, distill: int | None,
                 say: Callable[[str], None]) -> tuple[float, dict[str, dict]]:
    """fp32 test accuracy, and per source: images, seconds to make them, and W8A8/W4A8 test accuracy as build
    quantizes (compress.quantize_network: W4A8 distilled when that raises validation accuracy), W4A8 also with
    activation ranges only."""
    from edgeprune.artifacts import Network
    from edgeprune.compress import quantize as Q
    from edgeprune.compress import quantize_network

    x, y = ds.test
    reference = predictions(net, x, resolution)
    fp32 = float((reference == y).mean())
    say(f"{name}: fp32 test accuracy {fp32:.2%}")
    rows: dict[str, dict] = {}
    for source in SOURCES:
        t = time.perf_counter()
        last = [0.0]

        def progress(step: int, total: int, label: str, loss: float, last=last) -> None:
            if time.perf_counter() - last[0] > 30 or step == total:
                last[0] = time.perf_counter()
                say(f"  {name} {label}: step {step}/{total}, loss {loss:.3f}")

        syn = Q.calibration_images(net, source, resolution, *ds.train, classes=len(ds.classes), steps=steps,
                                   seed=seed, progress=progress)
        row = {"images": len(syn.images), "seconds": time.perf_counter() - t}
        # --distill-steps is W4A8's; W8A8 keeps build's default (none)
        runs = [(label, precision, None if precision == "int8" else distill) for label, precision in PRECISION.items()]
        runs.append(("W4A8 ranges only", "w4a8", 0))
        for label, precision, distill_steps in runs:
            t = time.perf_counter()
            quantized, info = quantize_network(Network(net, (1, 3, resolution, resolution)), ds, precision=precision,
                                               calibration=source, seed=seed, distill_steps=distill_steps,
                                               synthetic=syn)
            pred = predictions(quantized.module, x, resolution)
            row[label] = float((pred == y).mean())
            row[f"{label} agree"] = float((pred == reference).mean())
            row[f"{label} seconds"] = time.perf_counter() - t
            row[f"{label} distilled"] = info["distill_steps"]
        say(f"  {name} {source}: {row['images']} images in {row['seconds']:.0f} s; W8A8 {row['W8A8']:.2%}, "
            f"W4A8 {row['W4A8']:.2%} ({row['W4A8 distilled']} steps distilled, {row['W4A8 seconds']:.0f} s), "
            f"ranges only {row['W4A8 ranges only']:.2%}")
        rows[source] = row
    return fp32, rows


def accuracy_goals(seed: int = 0, steps: int | None = None, finetune_steps: int | None = None,
                   cache: Path | None = None, say: Callable[[str], None] = log,
                   distill: int | None = None) -> tuple[str, list[str]]:
    """The table (Markdown) and the GOAL lines of issue 14's accuracy goal, for the demo's and the largest subnet."""
    import torch

    from edgeprune import data
    from edgeprune.compress import fdda
    from edgeprune.pipeline import SUPERNET
    from edgeprune.search import space as S
    from edgeprune.search.evaluate import subnet
    from edgeprune.search.train import load

    torch.manual_seed(seed)
    steps = fdda.STEPS if steps is None else steps
    supernet, ckpt = load(SUPERNET)
    ds = data.load(None, seed=seed)
    resolutions = tuple(ckpt["space"]["resolutions"])
    largest = S.Space(resolutions=resolutions).largest(max(resolutions))
    demo, demo_arch = demo_subnet(supernet, ckpt, ds, seed, finetune_steps, cache, say)
    subnets = [("demo", demo, demo_arch), ("largest", subnet(supernet, largest, ds.train[0]).eval(), largest)]
    table = ["| subnet | calibration | images | made in | W8A8 test | W4A8 test (first, last at 8; distilled) | "
             "W4A8 ranges only | W8A8 / W4A8 / ranges-only top-1 agreement with fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    goals = []
    for name, net, arch in subnets:
        title = f"{name} ({S.macs(arch) / 1e6:.1f}M MACs @{arch.resolution} px)"
        fp32, rows = _subnet_rows(name, net, arch.resolution, ds, seed, steps, distill, say)
        table.append(f"| {title} | fp32 | | | {fp32:.2%} | {fp32:.2%} | {fp32:.2%} | |")
        for source, row in rows.items():
            kept = "" if row["W4A8 distilled"] else " (not distilled: it lowered val accuracy)"
            table.append(f"| {title} | {source} | {row['images']} | {row['seconds']:.0f} s | {row['W8A8']:.2%} | "
                         f"{row['W4A8']:.2%}{kept} | {row['W4A8 ranges only']:.2%} | {row['W8A8 agree']:.2%} / "
                         f"{row['W4A8 agree']:.2%} / {row['W4A8 ranges only agree']:.2%} |")
        for goal, other, bits, threshold, strict in GOALS:
            points = 100 * (rows["fdda"][bits] - rows[other][bits])
            met = points > threshold if strict else points >= threshold
            goals.append(f"GOAL {goal} [{name}]: {points:+.2f} points (goal {'>' if strict else '>='} "
                         f"{threshold:.1f}) {'met' if met else 'missed'}".replace("> 0.0)", "> 0)"))
    return "\n".join(table), goals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="optimization steps of the synthetic data")
    ap.add_argument("--finetune-steps", type=int, default=None, help="the demo subnet's (default: build's)")
    ap.add_argument("--cache", type=Path, help="keep the demo subnet's fine-tuned weights in this file")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="W4A8's distillation steps (default: build's, 200)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    table, goals = accuracy_goals(args.seed, args.steps, args.finetune_steps, args.cache,
                                  distill=args.distill_steps)
    print(table)
    print()
    print("\n".join(goals))
    log(f"{time.perf_counter() - t:.0f} s")
    return 0 if all(g.endswith(" met") for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
