"""The loop `edgeprune build` runs: search -> codegen -> measure, with measured latency fed back to the search.

search   the supernet's pool subnets are priced on the target's latency model; the most accurate ones within budget
         are scored on validation data, and the best is refined to the exact budget by the knapsack;
codegen  the chosen subnet (BatchNorm recalibrated) is exported to ONNX and compiled for the target;
measure  on the device when one is attached. A miss adds the measurement to the device's latency table, the model
         is refitted and the search runs again (bounded rounds). With no device, the predicted latency stands and the
         report says so.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .search import space as S

SUPERNET = Path(__file__).parent / "search" / "assets" / "supernet-digit-scenes.pt"
CANDIDATES = 3  # pool subnets scored on validation data per round
# With a device, aim below the budget: predictions are off by 10-20% and measurements jitter. After a miss the model
# is refitted on the measurement, and the aim comes down a little more.
MARGIN = 0.9


def latency_function(target: str, table: dict | None = None) -> Callable[[S.Arch], float]:
    """Predicted ms of a subnet on `target`, from its analytic kernel rows and the device's latency model."""
    from .measure.latency import model_for
    from .targets import get_target

    return priced_by(model_for(get_target(target), table))


def priced_by(model) -> Callable[[S.Arch], float]:
    return lambda arch: model.predict(S.layers(arch)).ms


@contextlib.contextmanager
def progress_bar(total: int, what: str, quiet: bool = False) -> Iterator[Callable]:
    """A tqdm bar on stderr; the callback takes (done, total, phase, loss)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, file=sys.stderr, disable=quiet, unit="step", leave=False)

    def update(done: int, _total: int, phase: str, loss: float) -> None:
        bar.set_postfix_str(f"{phase} loss {loss:.3f}", refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@dataclass
class Request:
    target: str
    budget_ms: float
    out: Path
    device: str | None = None
    data: str | None = None
    supernet: Path = SUPERNET
    table: Path | None = None  # the device's latency table (default: calibrate/<device>.json when it exists)
    rounds: int = 3
    fmt: str | None = None
    runs: int = 50
    statistic: str = "p90"  # or "median": what must be within budget, as in `edgeprune check`
    seed: int = 0
    quiet: bool = False


@dataclass
class Candidate:
    arch: S.Arch
    origin: str  # "pool" or "knapsack"
    predicted_ms: float
    val_accuracy: float


@dataclass
class Round:
    candidate: Candidate
    predicted_source: str
    measured_ms: float | None = None
    measurement: dict = field(default_factory=dict)


def _log(req: Request, msg: str) -> None:
    if not req.quiet:
        print(msg, file=sys.stderr, flush=True)


def search(supernet, ckpt: dict, ds, latency: Callable[[S.Arch], float], budget_ms: float,
           resolutions: tuple[int, ...], log: Callable[[str], None] = lambda m: None) -> tuple[Candidate, dict]:
    """The most accurate subnet predicted within budget.

    Candidates: the pool subnets within budget with the best validation accuracy, then the knapsack's refinement to
    the exact budget of the best of them and of the largest subnet at each resolution (the knapsack picks every
    layer's width, which a uniform width multiplier cannot). Every candidate is scored on validation data."""
    from .search import knapsack
    from .search.evaluate import score

    stats = {"evaluated": 0}
    pool = [S.Arch.from_dict(p["arch"]) for p in ckpt["pools"]]
    stored = {a.key(): p["val_accuracy"] for a, p in zip(pool, ckpt["pools"])}
    fits = sorted((a for a in pool if latency(a) <= budget_ms), key=lambda a: -stored[a.key()])
    space = S.Space(resolutions=resolutions)
    if not fits and latency(space.smallest(min(resolutions))) > budget_ms:
        raise BudgetError(latency(space.smallest(min(resolutions))), "predicted")
    scored: list[Candidate] = []

    def consider(arch: S.Arch, origin: str) -> None:
        if any(c.arch == arch for c in scored):
            return
        scored.append(Candidate(arch, origin, latency(arch), score(supernet, arch, ds)))
        stats["evaluated"] += 1
        log(f"  {origin} subnet {S.macs(arch) / 1e6:.1f}M MACs @{arch.resolution}px: predicted "
            f"{scored[-1].predicted_ms:.2f} ms, val accuracy {scored[-1].val_accuracy:.1%}")

    for arch in fits[:CANDIDATES]:
        consider(arch, "pool")
    parents = [max(scored, key=lambda c: c.val_accuracy).arch] if scored else []
    parents += [space.largest(r) for r in sorted(resolutions, reverse=True)]
    for parent in parents:
        choice = knapsack.solve(parent, knapsack.taylor_importance(supernet, parent, ds), latency, budget_ms)
        if choice is not None:
            consider(choice.arch, "knapsack")
    if not scored:
        raise BudgetError(latency(space.smallest(min(resolutions))), "predicted")
    return max(scored, key=lambda c: c.val_accuracy), stats


class BudgetError(UserError):
    def __init__(self, smallest_ms: float, how: str):
        self.smallest_ms = smallest_ms
        super().__init__(f"no subnet meets the budget: the smallest latency reached is {smallest_ms:.2f} ms "
                         f"({how}); raise --latency or choose a faster target")


def _table_for(req: Request, device) -> tuple[Path | None, dict | None]:
    from .measure.calibrate import default_table_path
    from .measure.latency import load_table
    from .targets import get_target

    path = req.table
    if path is None and device is not None:
        path = default_table_path(device, get_target(req.target))
    if path is not None and Path(path).exists():
        return Path(path), load_table(path)
    return path, None  # a new table, written when the device measures something


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise UserError(f"{out} exists and is not an edgeprune build output; choose another -o directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def run(req: Request) -> dict:
    """The whole loop; writes req.out atomically and returns the report."""
    import torch

    from . import data
    from .codegen.build import _replace_dir, compile_model
    from .measure.devices import get_device
    from .measure.latency import save_table
    from .models.zoo import export_onnx
    from .search.evaluate import accuracy, subnet
    from .search.train import load
    from .targets import get_target

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    target = get_target(req.target)
    device = get_device(req.device) if req.device else None
    if device is not None and getattr(device, "uri", "").startswith("qemu://"):
        raise UserError("qemu times are not latency; build against a real device (local, rpc://, serial://) "
                        "or none (predicted)")
    table_path, table = _table_for(req, device)
    supernet, ckpt = load(req.supernet)
    ds = data.load(req.data, seed=req.seed)
    if len(ds.classes) != ckpt["num_classes"]:
        raise UserError(f"the supernet was trained on {ckpt['dataset']} ({ckpt['num_classes']} classes), the data "
                        f"has {len(ds.classes)}; train one on it: edgeprune train-supernet --data ... -o FILE")
    resolutions = tuple(ckpt["space"]["resolutions"])
    if table is None:
        from . import __version__
        from .measure.calibrate import device_identity

        table = {"device": device_identity(device, target) if device else None, "tool_version": __version__,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": None, "entries": []}
    times["load"] = time.perf_counter() - t0
    stage = _prepare_out(req.out)
    rounds: list[Round] = []
    evaluated = 0
    aim = req.budget_ms * (MARGIN if device is not None else 1.0)
    try:
        from .measure.calibrate import entry_of
        from .measure.latency import model_for

        for r in range(req.rounds):
            t = time.perf_counter()
            model = model_for(target, table if table["entries"] else None)
            latency = priced_by(model)
            known = len(table["entries"])
            _log(req, f"round {r + 1}: search on {target.name} for {req.budget_ms:g} ms, aiming at {aim:.3g} ms "
                      f"({f'{known} measured networks' if known else 'no measurements: the prior'})")
            best, stats = search(supernet, ckpt, ds, latency, aim, resolutions, lambda m: _log(req, m))
            evaluated += stats["evaluated"]
            times[f"search_{r + 1}"] = time.perf_counter() - t
            source = model.predict(S.layers(best.arch)).source
            rounds.append(Round(best, source))
            t = time.perf_counter()
            net = subnet(supernet, best.arch, ds.train[0])
            x = torch.zeros(1, 3, best.arch.resolution, best.arch.resolution)
            build_dir = stage / "build"
            if build_dir.exists():
                shutil.rmtree(build_dir)
            onnx_path = export_onnx(net, x, stage / "model.onnx")
            build = compile_model(onnx_path, target, build_dir, fmt=req.fmt)
            times[f"compile_{r + 1}"] = time.perf_counter() - t
            if device is None:
                break
            t = time.perf_counter()
            m = device.measure(build, runs=req.runs, warmup=max(3, req.runs // 10))
            times[f"measure_{r + 1}"] = time.perf_counter() - t
            value = m.median_ms if req.statistic == "median" else m.percentile(90)
            rounds[-1].measured_ms = value
            rounds[-1].measurement = m.summary() | {"layers": m.layers[:10]}
            _log(req, f"  measured {req.statistic} {value:.3f} ms on {device.uri} "
                      f"(predicted {best.predicted_ms:.3f} ms)")
            # Every measurement teaches the latency model: this round's (on a miss) and the next builds'.
            table["entries"].append(entry_of(build, m) |  # with each kernel's time where the device profiles
                                    {"name": f"build-{S.macs(best.arch) // 1000}k-{best.arch.resolution}px"})
            if table_path is not None and table.get("device"):
                save_table(table_path, table)
            if value <= req.budget_ms:
                break
            aim *= 0.95  # the refitted model carries the correction; a little more room for jitter
        final = rounds[-1]
        met = final.measured_ms <= req.budget_ms if final.measured_ms is not None else \
            final.candidate.predicted_ms <= req.budget_ms
        t = time.perf_counter()
        net = subnet(supernet, final.candidate.arch, ds.train[0])
        torch.save(net.state_dict(), stage / "weights.pt")
        largest = S.Space(resolutions=resolutions).largest(max(resolutions))
        big = subnet(supernet, largest, ds.train[0])
        report = {
            "target": target.name, "device": device.uri if device else None, "budget_ms": req.budget_ms,
            "statistic": req.statistic if device else "predicted",
            "met": bool(met),
            "latency": {
                "measured_ms": final.measured_ms,
                "predicted_ms": round(final.candidate.predicted_ms, 4),
                "predicted_source": final.predicted_source,
                "used": "measured" if final.measured_ms is not None else "predicted",
                "table": str(table_path) if table["entries"] else None,
            },
            "accuracy": {
                "test": accuracy(net, *ds.test, final.candidate.arch.resolution),
                "val": final.candidate.val_accuracy,
                "unpruned_test": accuracy(big, *ds.test, largest.resolution),
                "unpruned_macs": S.macs(largest, len(ds.classes)),
                "unpruned_val": accuracy(big, *ds.val, largest.resolution),
                "unpruned_ms": round(latency(largest), 4),
            },
            "macs": S.macs(final.candidate.arch, len(ds.classes)),
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "architecture": final.candidate.arch.to_dict(),
            "origin": final.candidate.origin,
            "search": {"evaluated": evaluated, "rounds": len(rounds), "pool_subnets": len(ckpt["pools"])},
            "dataset": ds.name,
            "classes": ds.classes,
            "rounds": [{"predicted_ms": round(x.candidate.predicted_ms, 4), "measured_ms": x.measured_ms,
                        "origin": x.candidate.origin, "val_accuracy": x.candidate.val_accuracy,
                        "measurement": x.measurement} for x in rounds],
            "supernet": str(req.supernet),
        }
        times["report"] = time.perf_counter() - t
        report["stage_seconds"] = {k: round(v, 2) for k, v in times.items()}
        pools = [(latency(S.Arch.from_dict(p["arch"])), p["val_accuracy"]) for p in ckpt["pools"]]
        from .report import write_html

        (stage / "report.json").write_text(json.dumps(report, indent=1))
        write_html(stage, report, pools)
        _replace_dir(stage, req.out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not met:
        smallest = min((x.measured_ms for x in rounds if x.measured_ms is not None), default=None)
        report["smallest_ms"] = smallest
    return report
