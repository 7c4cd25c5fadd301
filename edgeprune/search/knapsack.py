"""Knapsack channel selection under a latency budget (Aflalo et al., "Knapsack Pruning with Inner Distillation").

Refines a subnet (resolution, depths and kernels fixed) to an exact budget by choosing every layer's channel count:
  items    the stem, the expand-1 block, each block's expanded width, each stage's width (all residual-coupled
           layers of a stage are one item: their channels stay or go together) and the final 1x1 conv;
  options  channel counts in groups of GROUP (the first c channels, the order the supernet's weights are shared in);
  value    first-order Taylor importance sum |w * dL/dw| of the kept filters, on training data, measured on the
           widest version of the subnet so that channels it does not use yet can be bought;
  weight   the option's latency change from the device's latency model, linearized around the subnet.
A multiple-choice knapsack, solved exactly as a MILP (scipy.optimize.milp, HiGHS). The linearization ignores that
two neighbouring items scale one pointwise conv together, so the result is re-priced exactly and the capacity
tightened until it fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from .evaluate import subnet
from .space import FIRST, GROUP, LAST, STAGES, STEM, Arch, blocks, max_mid
from .supernet import Supernet

MAX_OPTIONS = 24
TAYLOR_IMAGES = 128


@dataclass(frozen=True)
class Item:
    name: str  # "stem", "first", "stage3", "mid3.1", "last"
    options: tuple[int, ...]


def widest(arch: Arch) -> Arch:
    """The subnet with every width at the supernet's maximum."""
    mids, cin = [], FIRST
    for s, (base, _, _) in enumerate(STAGES):
        mids.append(tuple(max_mid(cin if i == 0 else base) for i in range(arch.depths[s])))
        cin = base
    return arch.replace(stem=STEM, first=FIRST, widths=[b for b, _, _ in STAGES], mids=mids, last=LAST)


def items_of(arch: Arch) -> list[Item]:
    wide = widest(arch)

    def grid(top: int) -> tuple[int, ...]:
        step = GROUP * max(1, -(-top // GROUP // MAX_OPTIONS))
        return tuple(sorted({*range(step, top + 1, step), top}))

    out = [Item("stem", grid(STEM)), Item("first", grid(FIRST))]
    for s in range(len(STAGES)):
        out.append(Item(f"stage{s}", grid(wide.widths[s])))
        out += [Item(f"mid{s}.{i}", grid(wide.mids[s][i])) for i in range(arch.depths[s])]
    return out + [Item("last", grid(LAST))]


def get(arch: Arch, name: str) -> int:
    if name in ("stem", "first", "last"):
        return getattr(arch, name)
    if name.startswith("stage"):
        return arch.widths[int(name[5:])]
    s, i = (int(v) for v in name[3:].split("."))
    return arch.mids[s][i]


def with_value(arch: Arch, name: str, value: int) -> Arch:
    if name in ("stem", "first", "last"):
        return arch.replace(**{name: value})
    if name.startswith("stage"):
        widths = list(arch.widths)
        widths[int(name[5:])] = value
        return arch.replace(widths=widths)
    s, i = (int(v) for v in name[3:].split("."))
    mids = [list(m) for m in arch.mids]
    mids[s][i] = value
    return arch.replace(mids=mids)


def taylor_importance(supernet: Supernet, arch: Arch, ds: data.Dataset,
                      images: int = TAYLOR_IMAGES) -> dict[str, np.ndarray]:
    """Per item, per channel: sum over the filters producing it of |w * dL/dw| on `images` training images."""
    wide = widest(arch)
    net = subnet(supernet, wide, ds.train[0])
    net.zero_grad()
    x, y = ds.train
    for i in range(0, images, 64):
        loss = F.cross_entropy(net(data.tensors(x[i:i + 64], wide.resolution)), torch.from_numpy(y[i:i + 64]))
        (loss * min(64, images - i) / images).backward()

    def score(conv: torch.nn.Conv2d) -> np.ndarray:
        return (conv.weight * conv.weight.grad).abs().sum(dim=(1, 2, 3)).detach().numpy()

    feats = list(net.features)
    imp = {"stem": score(feats[0][0]), "last": score(feats[-1][0])}
    stage_sums: dict[int, np.ndarray] = {}
    for b, block in zip(blocks(wide), feats[1:-1]):
        convs = [seq[0] for seq in block.conv]
        if b.stage < 0:
            imp["first"] = score(convs[-1])
            continue
        imp[f"mid{b.stage}.{b.index}"] = score(convs[0]) + score(convs[1])
        stage_sums[b.stage] = stage_sums.get(b.stage, 0) + score(convs[-1])
    for s, v in stage_sums.items():
        imp[f"stage{s}"] = v
    return imp


@dataclass
class Choice:
    arch: Arch
    predicted_ms: float
    value: float
    rounds: int


def multiple_choice(values: np.ndarray, costs: np.ndarray, owner: np.ndarray, capacity: float) -> np.ndarray | None:
    """Exact multiple-choice knapsack: one option per item (owner[j] is option j's item), max value, total cost
    <= capacity. Returns the chosen option indices, or None when no choice fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    from ..native import quiet_native

    n_items = int(owner.max()) + 1
    one_each = np.zeros((n_items, len(values)))
    one_each[owner, np.arange(len(values))] = 1
    with quiet_native():  # HiGHS prints solver internals to stdout from C++
        res = milp(-values, integrality=np.ones(len(values)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None], -np.inf, capacity)])
    return None if res.x is None else np.flatnonzero(res.x > 0.5)


def solve(arch: Arch, importance: dict[str, np.ndarray], latency: Callable[[Arch], float], budget_ms: float,
          max_rounds: int = 8) -> Choice | None:
    """The channel counts of max total importance whose predicted latency is within budget (None: none fits).

    Latency is not additive over items (a pointwise conv scales with both its input and output widths), so each
    round linearizes it around the last feasible choice and solves exactly; a choice over budget tightens the
    capacity, one under budget becomes the next centre. The best feasible choice is kept."""
    items = items_of(arch)
    values, options = [], []
    for k, item in enumerate(items):
        cum = np.concatenate([[0.0], np.cumsum(importance[item.name])])
        for c in item.options:
            values.append(cum[min(c, len(cum) - 1)])
            options.append((k, c))
    values = np.array(values)
    owner = np.array([k for k, _ in options])
    best: Choice | None = None
    center, tighten = arch, 0.0
    for rounds in range(1, max_rounds + 1):
        base = latency(center)
        costs = np.array([latency(with_value(center, items[k].name, c)) - base for k, c in options])
        picked = multiple_choice(values, costs, owner, budget_ms - base - tighten)
        if picked is None:
            break
        choice = center
        for j in picked:
            k, c = options[j]
            choice = with_value(choice, items[k].name, c)
        ms = latency(choice)
        if ms > budget_ms:  # the linearization was optimistic here: tighten and solve again
            tighten += (ms - budget_ms) * 1.05 + 1e-6
            continue
        value = float(values[picked].sum())
        if best is not None and (choice == best.arch or value <= best.value):
            break
        best, center, tighten = Choice(choice, ms, value, rounds), choice, 0.0
    return best
