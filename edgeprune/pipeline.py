"""The loop `edgeprune build` runs: search -> compress -> compile -> measure -> learn, and search again on a miss.

Each stage is a function over the typed artifacts (edgeprune.artifacts); this module only sequences them:
  search    search.select: pool subnets priced on the target's latency model, the best refined by the knapsack;
            returns a Network (BatchNorm recalibrated);
  compress  compress.compress: every layer's plan; with --sparsity, the fine-tuned subnet pruned in 1xN blocks
            (the search then prices its pointwise layers sparse, so a wider subnet fits the budget; "auto" tries
            several sparsities and keeps the most accurate);
  compile   codegen.compile_model: the Network, in memory, to a Build for the target;
  measure   on the device when one is attached; with none, the predicted latency stands and the report says so;
  learn     cost.learn: the measurement enters the device's latency table, the model is refitted, and a miss
            searches again (bounded rounds).
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

from .artifacts import Build, LatencyTable, Measurement, MemoryBudget, MemoryBudgetError, Network
from .compress import BINARIZE_STEPS, PRECISIONS, PRUNE_STEPS, distill_steps_for
from .errors import UserError
from .search import space as S
from .search.memory import bounded as memory_bounded
from .search.select import BudgetError, Candidate, latency_function, priced_by  # noqa: F401 - the pipeline's API
from .targets import Target

SUPERNET = Path(__file__).parent / "search" / "assets" / "supernet-digit-scenes.pt"
# With a device, aim below the budget: predictions are off by 10-20% and measurements jitter. After a miss the model
# is refitted on the measurement, and the aim of the option that missed (its sparsity and precision) comes down a
# little more: the options the device has not measured keep theirs, so that one option priced wrong (a kernel family
# on a CPU its prior was not fitted on) does not push the others to smaller subnets.
MARGIN = 0.9
# A measurement that other processes' work shared the CPUs with is taken again, this many times at most (a few
# seconds each), before the round goes on with it, unlearned: on a noisy host one such spell would cost a round.
MEASURE_RETRIES = 2
# Fine-tuning the chosen subnet (search.finetune): a few minutes on 2 cores at most, so `make demo` stays under 10.
FINETUNE_STEPS = 200


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
    finetune_steps: int = FINETUNE_STEPS
    optimistic: bool = False  # with no device, judge the prior's centre instead of its band's upper edge
    sparsity: float | str | None = None  # 1xN block pruning: a fraction of blocks, "auto" (tried: SPARSITIES), none
    block: int = 4  # N of the 1xN blocks
    prune_steps: int = PRUNE_STEPS
    quantize: str | None = None  # int8 | w4a8 | auto (int8 where it is faster and costs at most max_drop) | None
    calibration: str = "fdda"  # what post-training quantization calibrates on: fdda | real | noise
    max_drop: float = 1.0  # --quantize auto: the most validation accuracy (points) int8 may cost
    per_class: int = 4  # FDDA: real images per class
    distill_steps: int | None = None  # the quantized subnet distilled from fp32 (default: 200 below 8 bits, else 0)
    binarize: str | None = None  # recu | siman | auto (fp32 and both methods tried, the most accurate kept) | None
    binary_fraction: float = 0.1  # the share of 1x1 layers binarized: those the device's costs say save most
    binarize_steps: int = BINARIZE_STEPS
    memory: MemoryBudget | None = None  # RAM and flash of the C package: the search fits them too


SPARSITIES = (0.0, 0.5, 0.75)  # what --sparsity auto weighs against each other
QUANTIZE = ("int8", "w4a8", "auto")
BINARIZE = ("recu", "siman", "auto")


@dataclass
class Trial:
    """One sparsity's turn in a round: the subnet searched under its pricing, fine-tuned, then pruned."""

    sparsity: float
    candidate: Candidate
    network: Network
    finetune: dict
    precision: str = "fp32"  # fp32, or the --quantize precision it was searched, priced and quantized at
    quantized: dict = field(default_factory=dict)  # compress.quantize's account: bits, calibration, accuracy drop
    binarized: dict = field(default_factory=dict)  # compress.binarize_network's account: method, layers, accuracy
    measured_ms: float | None = None  # when the round measured it on the device


@dataclass
class Round:
    candidate: Candidate
    predicted_source: str
    measured_ms: float | None = None
    measurement: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)  # steps, accuracy before and after
    trials: list[Trial] = field(default_factory=list)  # each sparsity tried


def _log(req: Request, msg: str) -> None:
    if not req.quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Realized:
    build: Build
    measurement: Measurement | None = None
    value_ms: float | None = None  # the measured statistic (p90 or median); None when nothing was measured


def next_aim(aim: float, target_ms: float, measured_ms: float, repriced_ms: float) -> float:
    """The next round's aim after a network measured over its budget: 5% lower (room for jitter), and where the
    refitted model still prices the measured network at `repriced_ms` below its `measured_ms`, `target_ms` (the
    budget times the margin) divided by that residual ratio, so that a network priced at the aim measures near
    the target if its neighbours share the residual."""
    residual = measured_ms / repriced_ms if repriced_ms > 0 else 1.0
    return min(aim * 0.95, target_ms / residual) if residual > 1.0 else aim * 0.95


def measure_uncontended(device, build: Build, runs: int, layers: bool = True) -> Measurement:
    """The device's measurement of `build`, taken again (MEASURE_RETRIES times at most) while other processes'
    work shared the host's CPUs: the last one taken."""
    for _ in range(1 + MEASURE_RETRIES):
        m = device.measure(build, runs=runs, warmup=max(3, runs // 10), layers=layers)
        if not m.contended:
            break
    return m


def realize(network: Network, target: Target, out_dir: Path, device=None, table: LatencyTable | None = None,
            table_path: Path | None = None, runs: int = 50, statistic: str = "p90", fmt: str | None = None,
            layers: bool = True, budget: MemoryBudget | None = None) -> Realized:
    """One turn of the build loop after search: compress -> compile -> measure -> learn.

    With no device it stops after compiling. A measurement enters `table` (written to `table_path` when the table
    knows its device), so the next model_for(target, table) has learned from it; one taken while other processes
    kept this host's CPUs busy (Measurement.contended) does not."""
    from .codegen import compile_model
    from .compress import compress
    from .cost import entry_of, learn

    if out_dir.exists():
        shutil.rmtree(out_dir)
    # each layer sparse or dense as this device's measurements price it, as the search priced it
    build = compile_model(compress(network), target, out_dir, fmt=fmt, budget=budget, table=table)
    if device is None:
        return Realized(build)
    m = measure_uncontended(device, build, runs, layers)
    value = m.statistic(statistic)
    if table is not None and not m.contended:  # times shared with other work would teach the model wrong prices
        arch = network.arch
        name = f"build-{network.name}" if arch is None else \
            f"build-{S.macs(S.Arch.from_dict(arch)) // 1000}k-{arch['resolution']}px"
        learn(table, [entry_of(build, m, name)], table_path)
    return Realized(build, m, value)


def _sparsities(sparsity: float | str | None, block: int) -> tuple[float, ...]:
    """The sparsities a build tries: none, the one asked for, or SPARSITIES for "auto"."""
    from .compress.block1xn import BLOCK_SIZES

    if block not in BLOCK_SIZES:
        raise UserError(f"--block {block}: the 1xN block size is one of {', '.join(map(str, BLOCK_SIZES))}")
    if sparsity in (None, 0, 0.0):
        return (0.0,)
    if sparsity == "auto":
        return SPARSITIES
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"--sparsity {sparsity}: give a fraction of blocks to prune (0.5, 0.75) or auto") from None
    if not 0.0 <= value < 1.0:
        raise UserError(f"--sparsity {sparsity}: the fraction of blocks pruned must be at least 0 and below 1")
    return (value,)


def _precisions(req: Request, sparsities: tuple[float, ...]) -> tuple[str, ...]:
    """The precisions a build tries: fp32, the one asked for, or fp32 and int8 for --quantize auto; binary ones are
    "binary-<method>", fp32 and both methods for --binarize auto."""
    from .compress import CALIBRATIONS

    if req.binarize is not None:
        if req.binarize not in BINARIZE:
            raise UserError(f"--binarize {req.binarize}: choose one of {', '.join(BINARIZE)}")
        if req.quantize is not None or any(sparsities):
            raise UserError("--binarize cannot be combined with --quantize or --sparsity yet (the binary kernels "
                            "are dense fp32 around 1-bit layers); choose one")
        if not 0.0 < req.binary_fraction <= 1.0:
            raise UserError(f"--binary-fraction {req.binary_fraction:g}: the share of 1x1 layers binarized is above "
                            "0 and at most 1")
        if req.binarize_steps < 0:
            raise UserError(f"--binarize-steps {req.binarize_steps}: the training steps are at least 0")
        methods = ("recu", "siman") if req.binarize == "auto" else (req.binarize,)
        return (("fp32",) if req.binarize == "auto" else ()) + tuple(f"binary-{m}" for m in methods)
    if req.quantize is None:
        return ("fp32",)
    if req.quantize not in QUANTIZE:
        raise UserError(f"--quantize {req.quantize}: choose one of {', '.join(QUANTIZE)}")
    if req.calibration not in CALIBRATIONS:
        raise UserError(f"--calibration {req.calibration}: choose one of {', '.join(CALIBRATIONS)}")
    if req.distill_steps is not None and req.distill_steps < 0:
        raise UserError(f"--distill-steps {req.distill_steps}: the distillation steps are at least 0")
    if any(sparsities):
        raise UserError("--quantize and --sparsity cannot be combined yet (the int8 kernels are dense); "
                        "choose one")
    if req.max_drop < 0:
        raise UserError(f"--max-drop {req.max_drop:g}: the accuracy int8 may cost, in points, is at least 0")
    return ("fp32", "int8") if req.quantize == "auto" else (req.quantize,)


def _eligible(req: Request, trial: Trial) -> bool:
    """--quantize auto takes a quantized trial only when quantization cost at most --max-drop points."""
    return req.quantize != "auto" or trial.precision == "fp32" or trial.quantized["drop_points"] <= req.max_drop


def _int8(precision: str) -> bool:
    return precision in PRECISIONS


def _no_faster_in_int8(network: Network, model) -> list[str]:
    """The layers `model` (the device's latency model) prices no faster as int8 kernels than in fp32."""
    from .artifacts import LayerPlan
    from .compress import layer_costs

    fp32, int8 = layer_costs(network), layer_costs(network, LayerPlan("", "int8", 8, 8))
    return [name for name, row in fp32.items() if model.layer_ms(int8[name])[0] >= model.layer_ms(row)[0]]


def _why(options: str) -> str:
    return (f"the most accurate on validation images of the {options} tried, each with the widest subnet its pricing "
            "fits in the budget, passing over those measured over the budget on the device")


def _tried(final: Round, key: str, account: str | None = None) -> tuple[Trial | None, list[dict]]:
    """The final round's chosen trial, and each trial as the report lists it: `key` (its precision or sparsity),
    its subnet, prediction and accuracy, and its stage's `account` (Trial.quantized, Trial.binarized)."""
    chosen = next((tr for tr in final.trials if tr.candidate is final.candidate), None)
    return chosen, [{key: getattr(tr, key), "predicted_ms": round(tr.candidate.predicted_ms, 4),
                     "macs": S.macs(tr.candidate.arch), "resolution": tr.candidate.arch.resolution,
                     "val_accuracy": round(float(tr.network.accuracy), 4),
                     "measured_ms": None if tr.measured_ms is None else round(tr.measured_ms, 4),
                     **(getattr(tr, account) if account else {})} for tr in final.trials]


def _binarize_report(req: Request, final: Round, build: Build) -> dict | None:
    """What the build chose about binary layers, and why: each precision tried with its subnet, prediction and
    accuracy, the layers made binary, and the kernels compile ran in bits."""
    if req.binarize is None:
        return None
    chosen, tried = _tried(final, "precision", "binarized")
    why = _why("precisions") if req.binarize == "auto" else "as requested"
    return {"requested": req.binarize, "fraction": req.binary_fraction,
            "chosen": chosen.precision if chosen else "fp32", **(chosen.binarized if chosen else {}),
            "kernels_binary": [r.kernel for r in build.layers if r.family == "binary"],
            "tried": tried, "why": (why + f"; binary layers: the {req.binary_fraction:.0%} of 1x1 layers whose "
                                    "bit-packed kernel the device's costs price the most time below dense")}


def _quantize_report(req: Request, final: Round, build: Build) -> dict | None:
    if req.quantize is None:
        return None
    chosen, tried = _tried(final, "precision", "quantized")
    precision = {f"w{r.weight_bits}a{r.act_bits}" if r.family == "int8" else "fp32" for r in build.layers
                 if r.op in ("conv", "pointwise", "depthwise", "matmul")}
    why = (_why("precisions") + f"; int8 only where the device's costs price it faster and where it cost at most "
           f"{req.max_drop:g} points (the most sensitive layers kept in fp32 until it did)" if req.quantize == "auto"
           else "as requested")
    return {"requested": req.quantize, "calibration": req.calibration, "chosen": chosen.precision if chosen else
            "fp32", "layers": [{"kernel": r.kernel, "op": r.op, "precision": "int8" if r.family == "int8" else
                                "fp32", "sources": list(r.sources)} for r in build.layers
                               if r.op in ("conv", "pointwise", "depthwise", "matmul")],
            "precisions": sorted(precision), "tried": tried, "why": why}


def _memory_search(req: Request, target: Target, resolutions: tuple[int, ...]) -> MemoryBudget | None:
    """The memory budgets the search aims at (the user's, checked up front against the smallest subnet)."""
    from .search.memory import refuse_unfit

    if not req.memory:
        return None
    if (req.fmt or target.default_format) != "c":
        raise UserError("--ram and --flash are budgets of a C package (firmware); add --format c")
    refuse_unfit(S.Space(resolutions=resolutions).smallest(min(resolutions)), req.memory,
                 *_element_bytes("int8" if req.quantize else "fp32"))
    return req.memory


def _element_bytes(precision: str) -> tuple[float, float]:
    """(activation, weight) bytes per element a precision compiles to."""
    return {"fp32": (4, 4), "int8": (1, 1), "w4a8": (1, 0.5)}.get(precision, (4, 4))


def _tightened(aim: MemoryBudget, budget: MemoryBudget, e: MemoryBudgetError) -> MemoryBudget:
    """The search's memory aim lowered by how far the compiled package overshot the budget, and 5% more."""
    def lower(a: int | None, b: int | None, got: int) -> int | None:
        return None if a is None else int(a * min(1.0, b / got) * 0.95) if got > b else a

    return MemoryBudget(lower(aim.ram, budget.ram, e.ram), lower(aim.flash, budget.flash, e.flash))


def _table_for(req: Request, device, target) -> tuple[Path | None, LatencyTable]:
    from .cost import find_table, load_table, new_table, table_path

    path = req.table
    if path is None and device is not None:
        # Read yours or a shipped one; what is learned is written to yours, never into the installed package.
        path, found = table_path(device.table_name(target)), find_table(device.table_name(target))
        if found is not None:
            return path, load_table(found)
    if path is not None and Path(path).exists():
        return Path(path), load_table(path)
    # A new table, written when the device measures something.
    return path, new_table(device.identity(target) if device else None)


def _sparsity_report(req: Request, final: Round, build: Build) -> dict:
    """What the build chose about 1xN sparsity, and why: each sparsity tried with its subnet, prediction and
    accuracy, and how many layers compile ran sparse (it keeps a layer dense where the model prices that faster)."""
    chosen, tried = _tried(final, "sparsity")
    sparse_rows = [r for r in build.layers if r.family == "bsr"]
    why = _why("sparsities") if len(tried) > 1 else "as requested"
    return {"requested": req.sparsity, "block": req.block, "chosen": chosen.sparsity if chosen else 0.0,
            "layers_sparse": len(sparse_rows), "layers_pointwise": sum(1 for p in build.layers if p.op == "pointwise"),
            "tried": tried, "why": why}


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").exists())):
        raise UserError(f"{out} exists and is not an edgeprune build output; choose another -o directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def run(req: Request) -> dict:
    """The whole loop; writes req.out atomically and returns the report."""
    import torch

    from . import data
    from .codegen.build import _replace_dir
    from .compress import binarize_network, compress, pointwise_layers, quantize_network
    from .compress.fdda import STEPS as FDDA_STEPS
    from .cost import model_for
    from .measure.devices import get_device
    from .search.evaluate import accuracy, subnet
    from .search.finetune import before_after
    from .search.select import binary_rows, network_of, search
    from .search.train import load
    from .targets import get_target

    sparsities = _sparsities(req.sparsity, req.block)
    precisions = _precisions(req, sparsities)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    target = get_target(req.target)
    device = get_device(req.device) if req.device else None
    if device is not None and getattr(device, "uri", "").startswith("qemu://"):
        raise UserError("qemu times are not latency; build against a real device (local, rpc://, serial://) "
                        "or none (predicted)")
    table_path, table = _table_for(req, device, target)
    supernet, ckpt = load(req.supernet)
    ds = data.load(req.data, seed=req.seed)
    if len(ds.classes) != ckpt["num_classes"]:
        raise UserError(f"the supernet was trained on {ckpt['dataset']} ({ckpt['num_classes']} classes), the data "
                        f"has {len(ds.classes)}; train one on it: edgeprune train-supernet --data ... -o FILE")
    resolutions = tuple(ckpt["space"]["resolutions"])
    largest = S.Space(resolutions=resolutions).largest(max(resolutions))
    teacher = subnet(supernet, largest, ds.train[0])  # the fine-tune's teacher, and the report's unpruned network
    times["load"] = time.perf_counter() - t0
    stage = _prepare_out(req.out)
    rounds: list[Round] = []
    evaluated = 0
    # With no device the prior stands, and boards of one core spread around it (the target's band): a build is judged
    # at the band's slow edge, so a board at that edge still meets the budget, unless the user asks for the centre.
    band = model_for(target, table).band
    edge = band[1] if device is None and not req.optimistic else 1.0
    first_aim = req.budget_ms * MARGIN if device is not None else req.budget_ms / edge
    options = [(s, p) for s in sparsities for p in precisions]
    aims = dict.fromkeys(options, first_aim)
    fitting = _memory_search(req, target, resolutions)  # what the search aims at; compile checks it exactly
    try:
        memo: dict = {}  # the searches' scores and importances: one supernet, one dataset, every round and option
        for r in range(req.rounds):
            t = time.perf_counter()
            model = model_for(target, table)
            latency = priced_by(model)
            known = len(table.entries)
            _log(req, f"round {r + 1}: search on {target.name} for {req.budget_ms:g} ms, aiming at "
                      + ", ".join(sorted({f"{a:.3g} ms" for a in aims.values()})) + " "
                      f"({f'{known} measured networks' if known else 'no measurements: the prior'})")
            trials = []
            unreachable: BudgetError | None = None
            for sparsity, precision in options:
                aim = aims[sparsity, precision]
                if len(sparsities) > 1:
                    _log(req, f"  with {'no' if not sparsity else f'{sparsity:.0%} 1x{req.block}'} sparsity:")
                if len(precisions) > 1:
                    _log(req, f"  in {precision}:")
                t = time.perf_counter()
                binary = req.binary_fraction if precision.startswith("binary-") else 0.0
                priced = priced_by(model, (sparsity, req.block) if sparsity else None, int8=_int8(precision),
                                   binary=binary)
                bounded = memory_bounded(priced, aim, fitting, *_element_bytes(precision))
                try:
                    best, stats = search(supernet, ckpt, ds, bounded, aim, resolutions, lambda m: _log(req, m), memo,
                                         limit_ms=req.budget_ms if device is not None else None)
                except BudgetError as e:  # even this option's smallest subnet is priced over the budget
                    if len(options) == 1:
                        raise
                    unreachable = e
                    _log(req, f"  no subnet priced within this option's aim ({e.smallest_ms:.3g} ms at the least): "
                              "it sits out the round")
                    continue
                best.predicted_ms = priced(best.arch)  # its latency alone, whichever budget bound it
                evaluated += stats["evaluated"]
                times[f"search_{r + 1}"] = times.get(f"search_{r + 1}", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                network = network_of(supernet, best.arch, ds.train[0], predicted_ms=best.predicted_ms,
                                     accuracy=best.val_accuracy)
                with progress_bar(req.finetune_steps, "fine-tune", quiet=req.quiet) as bar:
                    network.module, tuned = before_after(network.module, best.arch.resolution, teacher,
                                                         largest.resolution, ds, req.finetune_steps, req.seed, bar)
                network.accuracy = tuned["after"]["val"]
                _log(req, f"  fine-tuned {req.finetune_steps} steps: val accuracy {tuned['before']['val']:.1%} -> "
                          f"{tuned['after']['val']:.1%}")
                if sparsity:
                    with progress_bar(req.prune_steps, f"prune 1x{req.block}", quiet=req.quiet) as bar:
                        network = compress(network, ds, sparsity=sparsity, block=req.block, steps=req.prune_steps,
                                           seed=req.seed, progress=bar)
                    _log(req, f"  pruned to {sparsity:.0%} in 1x{req.block} blocks ({req.prune_steps} steps): val "
                              f"accuracy {network.accuracy:.1%}")
                times[f"finetune_{r + 1}"] = times.get(f"finetune_{r + 1}", 0.0) + time.perf_counter() - t
                quantized: dict = {}
                binarized: dict = {}
                if binary:
                    t = time.perf_counter()
                    method = precision.removeprefix("binary-")
                    names, (_, at) = pointwise_layers(network), binary_rows(model, best.arch, binary)
                    if len(names) != sum(1 for row in S.layers(best.arch, binary=True) if row.family == "binary"):
                        raise UserError("the subnet's 1x1 layers do not match its cost rows; please report it")
                    with progress_bar(req.binarize_steps, f"binarize ({method})", quiet=req.quiet) as bar:
                        network, binarized = binarize_network(network, ds, method, [names[j] for j in at],
                                                              steps=req.binarize_steps, seed=req.seed, progress=bar)
                    _log(req, f"  binarized {len(at)} of {len(names)} 1x1 layers ({method}, {req.binarize_steps} "
                              f"steps, {binarized['seconds']:.0f} s): val accuracy {binarized['val_fp32']:.1%} -> "
                              f"{binarized['val_binary']:.1%}")
                    times[f"binarize_{r + 1}"] = times.get(f"binarize_{r + 1}", 0.0) + time.perf_counter() - t
                elif precision != "fp32":
                    t = time.perf_counter()
                    steps = FDDA_STEPS if req.calibration == "fdda" else 0  # the synthetic images' optimization
                    distill = distill_steps_for(precision) if req.distill_steps is None else req.distill_steps
                    # auto: a layer the device's costs price no faster in int8 stays fp32
                    slower = _no_faster_in_int8(network, model) if req.quantize == "auto" else []
                    with progress_bar(steps + distill, f"calibrate ({req.calibration})",
                                      quiet=req.quiet or not steps + distill) as bar:
                        network, quantized = quantize_network(
                            network, ds, precision=precision, calibration=req.calibration, per_class=req.per_class,
                            seed=req.seed, max_drop=req.max_drop if req.quantize == "auto" else None,
                            keep_float=slower, distill_steps=distill,
                            progress=lambda done, total, phase, loss, first=steps: bar(
                                done + first * (phase == "distill"), total, phase, loss))
                    sensitive = len(quantized["fp32_layers"]) - len(slower)
                    _log(req, f"  quantized to {precision} ({req.calibration} calibration, "
                              f"{quantized['calibration_seconds']:.0f} s"
                              + (f", distilled {quantized['distill_steps']} steps" if quantized["distill_steps"]
                                 else ", not distilled (it lowered val accuracy)" if distill else "")
                              + f"): val accuracy {quantized['val_fp32']:.1%} "
                              f"-> {quantized['val_quantized']:.1%}"
                              + (f"; {len(slower)} layers no faster in int8 kept in fp32" if slower else "")
                              + (f"; {sensitive} most sensitive layers kept in fp32" if sensitive else ""))
                    times[f"quantize_{r + 1}"] = times.get(f"quantize_{r + 1}", 0.0) + time.perf_counter() - t
                trials.append(Trial(sparsity, best, network, tuned, precision, quantized, binarized))
            if not trials:  # no option has a subnet within its aim
                raise unreachable
            # The most accurate on validation images first; of equals, the one predicted faster. With a device each
            # is measured in turn until one is within the budget: an option priced wrong (its kernels' prices not yet
            # learned on this device) then costs its own turn, not the round, and the next option is delivered as
            # it would have been alone.
            ranked = sorted([tr for tr in trials if _eligible(req, tr)],
                            key=lambda tr: (-round(tr.network.accuracy, 4), tr.candidate.predicted_ms))
            t = time.perf_counter()
            outcome = "missed"
            for turn, chosen in enumerate(ranked if device is not None else ranked[:1]):
                best, network = chosen.candidate, chosen.network
                rows = binary_rows(model, best.arch, req.binary_fraction)[0] if chosen.binarized else \
                    S.layers(best.arch, sparse=(chosen.sparsity, req.block) if chosen.sparsity else None,
                             int8=_int8(chosen.precision))
                source = model.predict(rows).source
                if turn == 0:
                    rounds.append(Round(best, source, finetune=chosen.finetune, trials=trials))
                else:
                    rounds[-1].candidate, rounds[-1].predicted_source = best, source
                    rounds[-1].finetune = chosen.finetune
                why = "the most accurate within the aim" if turn == 0 else "the next most accurate"
                if len(sparsities) > 1:
                    _log(req, f"  chose {'no' if not chosen.sparsity else f'{chosen.sparsity:.0%}'} sparsity: {why} "
                              f"({network.accuracy:.1%} val)")
                if len(precisions) > 1:
                    _log(req, f"  chose {chosen.precision}: {why} ({network.accuracy:.1%} val)"
                              + ("" if all(_eligible(req, tr) for tr in trials) else
                                 f"; int8 cost more than {req.max_drop:g} points"))
                try:
                    done = realize(network, target, stage / "build", device, table, table_path, req.runs,
                                   req.statistic, req.fmt, budget=req.memory)
                except MemoryBudgetError as e:  # the estimate was low: aim that much lower and search again
                    if r + 1 == req.rounds:
                        raise
                    fitting = _tightened(fitting, req.memory, e)
                    _log(req, f"  {e}; searching again")
                    outcome = "memory"
                    break
                if device is None:
                    outcome = "compiled"
                    break
                m, value = done.measurement, done.value_ms
                rounds[-1].measured_ms = chosen.measured_ms = value
                rounds[-1].measurement = m.summary() | {"layers": m.layers[:10]}
                _log(req, f"  measured {req.statistic} {value:.3f} ms on {device.uri} "
                          f"(predicted {best.predicted_ms:.3f} ms)")
                if m.contended:
                    _log(req, f"  {m.contention_note()}; the latency table did not learn from it")
                if value <= req.budget_ms:
                    outcome = "met"
                    break
                # The refitted model has learned from this measurement, but it may still price a network like this
                # one below what this one measured (scales shared with networks of other sizes): the option's next
                # aim is lowered by what is left of the miss. Priced as a neighbour, which the search will price
                # next: without looking up this network's own kernels, which would return what they measured.
                # (A contended time says nothing about the network: 5% lower only.)
                refitted = model_for(target, table)
                refitted.measured.clear()
                repriced = value if m.contended else priced_by(
                    refitted, (chosen.sparsity, req.block) if chosen.sparsity else None,
                    int8=_int8(chosen.precision), binary=req.binary_fraction if chosen.binarized else 0.0)(best.arch)
                key = (chosen.sparsity, chosen.precision)
                aims[key] = next_aim(aims[key], req.budget_ms * MARGIN, value, repriced)
            times[f"compile_{r + 1}"] = time.perf_counter() - t
            if outcome in ("met", "compiled"):
                break
        final = rounds[-1]
        met = final.measured_ms <= req.budget_ms if final.measured_ms is not None else \
            final.candidate.predicted_ms * edge <= req.budget_ms
        t = time.perf_counter()
        net = network.module
        if (stage / "build" / "model.onnx").exists():  # an int8 build compiles its integer program, not ONNX
            shutil.copy2(stage / "build" / "model.onnx", stage / "model.onnx")
        torch.save(net.state_dict(), stage / "weights.pt")
        tflite = None
        if network.integer is not None:  # the int8 program as a .tflite too, for LiteRT and TFLite Micro users
            from .codegen.tflite_export import export_tflite

            try:
                tflite = export_tflite(network.integer, stage / "model.tflite").name
            except UserError as e:
                tflite = f"not written: {e}"
        big = teacher
        report = {
            "target": target.name, "device": device.uri if device else None, "budget_ms": req.budget_ms,
            "statistic": req.statistic if device else "predicted",
            "met": bool(met),
            "latency": {
                "measured_ms": final.measured_ms,
                "predicted_ms": round(final.candidate.predicted_ms, 4),
                "predicted_source": final.predicted_source,
                "band_ms": [round(final.candidate.predicted_ms * b, 4) for b in band],
                "judged": "measured" if final.measured_ms is not None else
                          "centre" if edge == 1.0 else "upper edge of the band",
                "used": "measured" if final.measured_ms is not None else "predicted",
                "table": str(table_path) if table.entries else None,
            },
            "accuracy": {
                "test": accuracy(net, *ds.test, final.candidate.arch.resolution),
                "val": accuracy(net, *ds.val, final.candidate.arch.resolution),
                "before_finetune": final.finetune["before"],
                "finetune_steps": final.finetune["steps"],
                "unpruned_test": accuracy(big, *ds.test, largest.resolution),
                "unpruned_macs": S.macs(largest, len(ds.classes)),
                "unpruned_val": accuracy(big, *ds.val, largest.resolution),
                "unpruned_ms": round(latency(largest), 4),
            },
            "macs": S.macs(final.candidate.arch, len(ds.classes)),
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "architecture": final.candidate.arch.to_dict(),
            "origin": final.candidate.origin,
            "sparsity": _sparsity_report(req, final, done.build),
            "memory": {k: v for k, v in done.build.memory.items() if k.endswith("_bytes")} or None,
            "quantize": _quantize_report(req, final, done.build) | ({"tflite": tflite} if tflite else {})
            if req.quantize else None,
            "binarize": _binarize_report(req, final, done.build),
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
