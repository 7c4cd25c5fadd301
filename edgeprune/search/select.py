"""The search stage: the most accurate subnet of the supernet predicted within a latency budget, as a Network.

Candidates: the pool subnets within budget with the best validation accuracy, then the knapsack's refinement to the
exact budget of the best of them and of the largest subnet at each resolution (the knapsack picks every layer's
width, which a uniform width multiplier cannot). Every candidate is scored on validation data, BatchNorm
recalibrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..artifacts import Network
from ..cost import LatencyModel, model_for
from ..errors import UserError
from ..targets import get_target
from . import space as S

CANDIDATES = 3  # pool subnets scored on validation data per search


@dataclass
class Candidate:
    arch: S.Arch
    origin: str  # "pool" or "knapsack"
    predicted_ms: float
    val_accuracy: float


class BudgetError(UserError):
    def __init__(self, smallest_ms: float, how: str):
        self.smallest_ms = smallest_ms
        super().__init__(f"no subnet meets the budget: the smallest latency reached is {smallest_ms:.2f} ms "
                         f"({how}); raise --latency or choose a faster target")


def binary_rows(model: LatencyModel, arch: S.Arch, fraction: float) -> tuple[list, list[int]]:
    """The subnet's cost rows with `fraction` of its 1x1 layers binary (at least one): those whose bit-packed kernel
    `model` prices the most time below the dense one, a per-layer choice by the device's costs. Returns the rows
    and the chosen layers' positions among the 1x1 layers in the order they run (compress.pointwise_layers)."""
    dense, binary = S.layers(arch), S.layers(arch, binary=True)
    at = [i for i, row in enumerate(binary) if row.family == "binary"]
    saved = [model.layer_ms(dense[i])[0] - model.layer_ms(binary[i])[0] for i in at]
    k = max(1, round(fraction * len(at)))
    best = sorted(range(len(at)), key=lambda j: -saved[j])[:k]
    chosen = sorted(j for j in best if saved[j] > 0)  # a layer the device runs no faster in bits stays dense
    rows = list(dense)
    for j in chosen:
        rows[at[j]] = binary[at[j]]
    return rows, chosen


def priced_by(model: LatencyModel, sparse: tuple[float, int] | None = None,
              int8: bool = False, binary: float = 0.0) -> Callable[[S.Arch], float]:
    """Predicted ms of a subnet: its analytic cost rows priced by `model`. With `sparse` = (sparsity, N), its
    pointwise layers pruned to that sparsity in 1xN blocks, each priced as compile will run it: sparse or dense,
    whichever the model prices faster. With `int8`, as the integer program compile runs for a quantized subnet.
    With `binary` (a fraction), that fraction of its 1x1 layers binary, chosen by binary_rows."""
    if int8:
        return lambda arch: model.predict(S.layers(arch, int8=True)).ms
    if binary:
        return lambda arch: model.predict(binary_rows(model, arch, binary)[0]).ms
    if not sparse or not sparse[0]:
        return lambda arch: model.predict(S.layers(arch)).ms

    def price(arch: S.Arch) -> float:
        pairs = zip(S.layers(arch), S.layers(arch, sparse=sparse))
        return sum(min(model.layer_ms(d)[0], model.layer_ms(s)[0]) for d, s in pairs)

    return price


def latency_function(target: str, table=None) -> Callable[[S.Arch], float]:
    """Predicted ms of a subnet on `target`, from the device's latency model (the prior without a table)."""
    return priced_by(model_for(get_target(target), table))


def search(supernet, ckpt: dict, ds, latency: Callable[[S.Arch], float], budget_ms: float,
           resolutions: tuple[int, ...], log: Callable[[str], None] = lambda m: None,
           memo: dict | None = None, limit_ms: float | None = None) -> tuple[Candidate, dict]:
    """The most accurate subnet predicted within budget, and how many subnets were scored.

    limit_ms: where `budget_ms` is an aim below the user's budget (lowered by measured misses) and no subnet is
    priced within it, the smallest subnet when it is priced within this limit, instead of BudgetError: it is then
    the only answer left to measure (a dense-only build at 30% of the largest gave up with its smallest priced at
    0.12 ms, against a budget of 0.163 ms). Once measured over, the table prices it so and the search gives up.

    memo: what searches of the same supernet and data have computed (subnets' validation accuracy, channel
    importances), kept by the caller across them: a build searches once per round and, with --sparsity auto or
    --quantize auto, once per option, and a subnet scored once need not be recalibrated and scored again."""
    from . import knapsack
    from .evaluate import score

    memo = {} if memo is None else memo

    def remembered(compute: Callable, arch: S.Arch):
        key = (compute.__name__, arch)
        if key not in memo:
            memo[key] = compute(supernet, arch, ds)
        return memo[key]

    stats = {"evaluated": 0}
    pool = [S.Arch.from_dict(p["arch"]) for p in ckpt["pools"]]
    stored = {a.key(): p["val_accuracy"] for a, p in zip(pool, ckpt["pools"])}
    fits = sorted((a for a in pool if latency(a) <= budget_ms), key=lambda a: -stored[a.key()])
    space = S.Space(resolutions=resolutions)
    smallest = space.smallest(min(resolutions))
    if not fits and latency(smallest) > budget_ms and (limit_ms is None or latency(smallest) > limit_ms):
        raise BudgetError(latency(smallest), "predicted")
    scored: list[Candidate] = []

    def consider(arch: S.Arch, origin: str) -> None:
        if any(c.arch == arch for c in scored):
            return
        scored.append(Candidate(arch, origin, latency(arch), remembered(score, arch)))
        stats["evaluated"] += 1
        log(f"  {origin} subnet {S.macs(arch) / 1e6:.1f}M MACs @{arch.resolution}px: predicted "
            f"{scored[-1].predicted_ms:.2f} ms, val accuracy {scored[-1].val_accuracy:.1%}")

    for arch in fits[:CANDIDATES]:
        consider(arch, "pool")
    parents = [max(scored, key=lambda c: c.val_accuracy).arch] if scored else []
    parents += [space.largest(r) for r in sorted(resolutions, reverse=True)]
    for parent in parents:
        choice = knapsack.solve(parent, remembered(knapsack.taylor_importance, parent), latency, budget_ms)
        if choice is not None:
            consider(choice.arch, "knapsack")
    if not scored and latency(smallest) <= (budget_ms if limit_ms is None else max(budget_ms, limit_ms)):
        consider(smallest, "smallest")  # below the aim, within the limit; or the knapsack missed it at the edge
    if not scored:
        raise BudgetError(latency(smallest), "predicted")
    return max(scored, key=lambda c: c.val_accuracy), stats


def network_of(supernet, arch: S.Arch, train_x, name: str = "model", predicted_ms: float | None = None,
               accuracy: float | None = None) -> Network:
    """The deployable Network of `arch`: sliced out of the supernet, BatchNorm recalibrated on `train_x`."""
    from .evaluate import subnet

    return Network(subnet(supernet, arch, train_x), (1, 3, arch.resolution, arch.resolution), name=name,
                   arch=arch.to_dict(), predicted_ms=predicted_ms, accuracy=accuracy)


def architecture_network(arch: S.Arch, seed: int = 0, name: str = "model") -> Network:
    """A Network of `arch` with fresh weights (for timing: calibration suites, benchmarks)."""
    import torch

    from ..models.reference import randomize_bn
    from .supernet import Subnet

    torch.manual_seed(seed)
    return Network(randomize_bn(Subnet(arch), seed).eval(), (1, 3, arch.resolution, arch.resolution), name=name,
                   arch=arch.to_dict())
