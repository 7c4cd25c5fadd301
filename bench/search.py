"""Search benchmark: edgeprune's choice against uniform width scaling, random search and networks trained alone.

Protocol, on this machine (device `local`, target `host`), the shipped supernet and the default data, in one run:
  1. budgets: the largest subnet is compiled and measured three times; the budgets are fractions of the lowest of its
     three median latencies;
  2. for each budget, three methods pick a subnet, each compiled and measured (median of --runs) until it is within
     budget (a miss adds the measurement to a latency table shared by all methods, refits, and picks again):
       edgeprune  `edgeprune build` (pool subnets + knapsack, the measurement loop);
       uniform    the largest subnet with every width scaled by one multiplier, the widest that is predicted to fit;
       random     random subnets predicted to fit, as many scored on validation data as edgeprune scored; the best;
     and the honest baselines, each trained alone from scratch for as many steps as `build` fine-tuned its choice
     (the supernet's recipe, search.train.train_alone):
       alone      the architecture `build` chose;
       mbv2       MobileNetV2 designed by hand for the budget: the widest width multiplier (0.35-1.0, at each of the
                  supernet's resolutions) measured within budget, the most MACs of those;
  3. each method's test accuracy (BatchNorm recalibrated, held-out digits) and measured latency.

Goals: at every budget edgeprune's accuracy beats uniform and random (issue 5) and is at least that of alone and
mbv2 (issue 11), and every method's measured latency is within budget (a baseline that cannot be made to fit in
--rounds tries, e.g. width scaling at 96 px under a budget set by per-call overheads, scores 0 instead). One GOAL
line each; exits 1 when any is missed.

    python bench/search.py [--fractions 0.3,0.5,0.75] [--runs 50] [--finetune-steps 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.3,0.5,0.75", help="budgets as fractions of the largest subnet's latency")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=None, help="build's fine-tuning, and the baselines' steps "
                                                                      "(default: build's own default)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from edgeprune import data
    from edgeprune.cost import load_table, model_for, new_table, save_table
    from edgeprune.measure.devices import LocalDevice
    from edgeprune.pipeline import FINETUNE_STEPS, SUPERNET, Request, realize, run
    from edgeprune.search import space as S
    from edgeprune.search.evaluate import accuracy, recalibrate, score
    from edgeprune.search.select import network_of, priced_by
    from edgeprune.search.train import load, train_alone
    from edgeprune.targets import get_target

    steps = FINETUNE_STEPS if args.finetune_steps is None else args.finetune_steps
    target, device = get_target("host"), LocalDevice()

    def trained_alone(arch: S.Arch) -> float:
        """Test accuracy of `arch` trained alone from scratch for as many steps as build fine-tunes."""
        net = recalibrate(train_alone(arch, ds, steps=steps, seed=args.seed), ds.train[0], arch.resolution)
        return accuracy(net, *ds.test, arch.resolution)
    supernet, ckpt = load(SUPERNET)
    ds = data.load(None, seed=args.seed)
    resolutions = tuple(ckpt["space"]["resolutions"])
    space = S.Space(resolutions=resolutions)
    tmp = Path(tempfile.mkdtemp(prefix="edgeprune-bench-search-"))
    table_path = tmp / "table.json"
    table = new_table(device.identity(target))
    save_table(table_path, table)

    def compile_measure(arch: S.Arch, name: str) -> tuple[float, object]:
        """The pipeline's own compile -> measure -> learn, on one subnet of the supernet."""
        net = network_of(supernet, arch, ds.train[0], name=name)
        done = realize(net, target, tmp / name, device, table, table_path, args.runs, "median", layers=False)
        return done.value_ms, net.module

    largest = space.largest(max(resolutions))
    # The budgets hang on this one figure: the lowest median of three measurements, as bench/dense.py keeps, so a
    # slow spell of the machine (up to 2x here) does not set budgets the whole largest subnet fits in.
    top_ms = min(compile_measure(largest, f"largest-{i}")[0] for i in range(3))
    budgets = [round(top_ms * float(f), 3) for f in args.fractions.split(",")]
    log(f"largest subnet: {top_ms:.3f} ms; budgets {budgets} ms")

    def until_within(name: str, budget: float, pick) -> tuple[float, float, S.Arch]:
        """pick(latency) -> arch; compile and measure, refit on a miss, at most --rounds times. An architecture
        measured over budget is not picked again (the refit model may still price it within)."""
        best, missed = None, set()
        for r in range(args.rounds):
            model = priced_by(model_for(target, table))
            latency = lambda a, model=model: float("inf") if a.key() in missed else model(a)  # noqa: E731
            arch = pick(latency)
            ms, net = compile_measure(arch, f"{name}-{budget:g}-{r}")
            log(f"  {name}: {S.macs(arch) / 1e6:.1f}M MACs @{arch.resolution}px measured {ms:.3f} ms")
            if ms <= budget:
                return ms, accuracy(net, *ds.test, arch.resolution), arch
            missed.add(arch.key())
            best = (ms, 0.0, arch) if best is None or ms < best[0] else best
        return best

    rows = []
    for budget in budgets:
        log(f"budget {budget:g} ms")
        out = tmp / f"edgeprune-{budget:g}"
        report = run(Request(target="host", budget_ms=budget, out=out, device="local", table=table_path,
                             rounds=args.rounds, runs=args.runs, statistic="median", seed=args.seed, quiet=True,
                             finetune_steps=steps))
        table.entries = load_table(table_path).entries  # with what the loop measured
        ours = (report["latency"]["measured_ms"], report["accuracy"]["test"] if report["met"] else 0.0)
        evaluated = report["search"]["evaluated"]
        log(f"  edgeprune: measured {ours[0]:.3f} ms, test {ours[1]:.1%} ({evaluated} subnets scored)")

        def widest_uniform(latency, budget=budget):
            for m in np.arange(1.0, 0.19, -0.05):
                arch = scaled(largest, m, S)
                if latency(arch) <= budget:
                    return arch
            return scaled(largest, 0.2, S)

        uni = until_within("uniform", budget, widest_uniform)

        def random_search(latency, budget=budget, evaluated=evaluated):
            rng = np.random.default_rng([args.seed, int(budget * 1000)])
            found = []
            for _ in range(20000):
                a = space.sample(rng)
                if latency(a) <= budget:
                    found.append(a)
                    if len(found) == evaluated:
                        break
            if not found:
                return space.smallest(min(resolutions))
            return max(found, key=lambda a: score(supernet, a, ds))

        rnd = until_within("random", budget, random_search)

        chosen = S.Arch.from_dict(report["architecture"])
        alone = (ours[0], trained_alone(chosen))  # the same architecture: the same latency as build's
        log(f"  alone: the chosen architecture trained alone {steps} steps: test {alone[1]:.1%}")

        def widest_mbv2(latency, budget=budget):
            fits = [S.uniform(m, r) for r in resolutions for m in (1.0, 0.75, 0.5, 0.35)
                    if latency(S.uniform(m, r)) <= budget]
            return max(fits, key=S.macs) if fits else S.uniform(0.35, min(resolutions))

        hand = until_within("mbv2", budget, widest_mbv2)
        # No MobileNetV2 measured within budget (the narrowest at the lowest resolution is still over): the hand
        # design has nothing to offer at this budget, and scores 0 as a method that misses does.
        mbv2 = (hand[0], trained_alone(hand[2]) if hand[0] <= budget else 0.0)
        log(f"  mbv2: {S.macs(hand[2]) / 1e6:.1f}M MACs @{hand[2].resolution}px trained alone {steps} steps: "
            f"test {mbv2[1]:.1%}" if hand[0] <= budget else "  mbv2: no MobileNetV2 measured within budget")
        rows.append((budget, ours, (uni[0], uni[1]), (rnd[0], rnd[1]), alone, mbv2))

    print(f"build fine-tunes its choice {steps} steps; alone and mbv2 are trained from scratch for as many")
    print("| budget ms | edgeprune ms | acc | uniform ms | acc | random ms | acc | alone acc | mbv2 ms | acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget, o, u, r, a, h in rows:
        print(f"| {budget:.3f} | {o[0]:.3f} | {o[1]:.1%} | {u[0]:.3f} | {u[1]:.1%} | {r[0]:.3f} | {r[1]:.1%} "
              f"| {a[1]:.1%} | {h[0]:.3f} | {h[1]:.1%} |")
    ok = True
    for budget, o, u, r, a, h in rows:
        for name, base in (("uniform", u), ("random", r)):
            met = o[1] > base[1]
            ok &= met
            print(f"GOAL beats-{name}@{budget:g}ms: {o[1] - base[1]:+.1%} accuracy (goal > 0) "
                  f"{'met' if met else 'missed'}")
        for name, base in (("alone", a), ("mbv2", h)):
            met = o[1] >= base[1]
            ok &= met
            print(f"GOAL at-least-{name}@{budget:g}ms: {o[1] - base[1]:+.1%} accuracy (goal >= 0) "
                  f"{'met' if met else 'missed'}")
        # edgeprune must fit; a baseline that could not be made to fit has scored 0 above instead
        judged = [o[0]] + [x[0] for x in (u, r, h) if x[1] > 0.0]  # baselines that found no fit scored 0 above
        within = max(judged) <= budget
        ok &= within
        print(f"GOAL within-budget@{budget:g}ms: max {max(judged) / budget:.3f} of budget (goal <= 1) "
              f"{'met' if within else 'missed'}")
    return 0 if ok else 1


def scaled(arch, mult: float, S):
    """Every width of `arch` times `mult`, in channel groups."""
    return arch.replace(stem=S.channels(arch.stem, mult), first=S.channels(arch.first, mult),
                        widths=[S.channels(w, mult) for w in arch.widths],
                        mids=[[S.channels(m, mult) for m in ms] for ms in arch.mids],
                        last=S.channels(arch.last, mult))


if __name__ == "__main__":
    sys.exit(main())
