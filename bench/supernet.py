"""Supernet benchmark: subnets taken from the supernet against the same architectures trained alone.

Protocol (issue 11), on the default data, validation split:
  1. five subnets spanning the space: the checkpoint's pool subnets plus its largest, sorted by MACs, the smallest,
     the largest, and between them the ones nearest to evenly spaced steps in log MACs;
  2. each from the supernet: sliced out, BatchNorm recalibrated as `build` does, no fine-tuning;
  3. each trained alone from scratch: 600 steps, batch 32, AdamW at 3e-3, warmup and cosine decay (the supernet's
     recipe, `train_alone`), BatchNorm recalibrated likewise.

Goal: for every subnet, alone minus supernet is at most 3 points. One GOAL line each; exits 1 when any is missed.
Seeded and single-threaded, so a rerun gives the same figures; --cache keeps the trained-alone accuracies (keyed by
architecture, steps and seed), the slow half.

    python bench/supernet.py [--supernet PATH] [--count 5] [--steps 600] [--cache FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

GOAL_POINTS = 3.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spanning(archs: list, count: int, macs) -> list:
    """`count` of `archs`: the smallest, the largest, and the nearest to evenly spaced log-MACs steps between."""
    archs = sorted(set(archs), key=macs)
    logs = np.log([macs(a) for a in archs])
    chosen: list[int] = []
    for t in np.linspace(logs[0], logs[-1], count):
        free = [i for i in range(len(archs)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(logs[i] - t)))
    return [archs[i] for i in sorted(chosen)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supernet", help="checkpoint (default: the shipped one)")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600, help="steps of the trained-alone baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", help="JSON file of trained-alone accuracies, read and extended")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from edgeprune import data
    from edgeprune.search import space as S
    from edgeprune.search.evaluate import accuracy, recalibrate, score
    from edgeprune.search.train import load, train_alone

    path = args.supernet or Path(__file__).resolve().parents[1] / "edgeprune/search/assets/supernet-digit-scenes.pt"
    supernet, ckpt = load(path)
    ds = data.load(None, seed=args.seed)
    candidates = [S.Arch.from_dict(p["arch"]) for p in ckpt["pools"]] + [S.Arch.from_dict(ckpt["largest"]["arch"])]
    chosen = spanning(candidates, args.count, S.macs)
    cache_path = Path(args.cache) if args.cache else None
    cache: dict[str, float] = {}

    def sync() -> None:  # merged both ways, so runs sharing a cache keep each other's results
        if cache_path:
            if cache_path.exists():
                cache.update({k: v for k, v in json.loads(cache_path.read_text()).items() if k not in cache})
            cache_path.write_text(json.dumps(cache, indent=1))

    rows = []
    for arch in chosen:
        name = f"subnet-{S.macs(arch) / 1e6:.1f}M@{arch.resolution}"
        ours = score(supernet, arch, ds)
        key = f"{arch.key()}|steps={args.steps}|seed={args.seed}"
        sync()
        if key not in cache:
            t = time.time()
            net = recalibrate(train_alone(arch, ds, steps=args.steps, seed=args.seed), ds.train[0], arch.resolution)
            cache[key] = accuracy(net, *ds.val, arch.resolution)
            log(f"{name}: trained alone in {time.time() - t:.0f} s")
            sync()
        rows.append((name, arch, ours, cache[key]))
        log(f"{name}: supernet {ours:.1%}, alone {cache[key]:.1%}")

    print(f"supernet {path} ({ckpt['config']['steps']} steps, phases {list(ckpt['config']['phases'])}); "
          f"alone: {args.steps} steps, batch 32, AdamW 3e-3 cosine; validation accuracy, BatchNorm recalibrated")
    print(f"{'subnet':<22}{'MACs':>8}{'px':>5}{'supernet':>10}{'alone':>8}{'gap (points)':>14}")
    for name, arch, ours, alone in rows:
        print(f"{name:<22}{S.macs(arch) / 1e6:>7.1f}M{arch.resolution:>5}{ours:>10.1%}{alone:>8.1%}"
              f"{100 * (alone - ours):>14.1f}")
    missed = 0
    for name, _, ours, alone in rows:
        gap = 100 * (alone - ours)
        met = gap <= GOAL_POINTS
        missed += not met
        print(f"GOAL {name}: {gap:.1f} points (goal <= {GOAL_POINTS:g}) {'met' if met else 'missed'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
