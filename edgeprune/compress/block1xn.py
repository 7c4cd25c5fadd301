"""1xN block pruning (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks"; methods.md section 1).

N consecutive output kernels that share one input channel form a block, scored by its L1 norm and kept or pruned
whole: a kept block is N output channels' weights for one input channel, which a CPU multiplies as one SIMD vector.
Before pruning, filter rearrangement puts strong filters next to each other, so blocks are mostly strong or mostly
weak: each layer's output channels are sorted by their filters' L1 norms, and everything coupled to those channels
(BatchNorm, the consumers' input channels, layers tied by a residual add or a concat, depthwise layers between)
is permuted to match. The coupling comes from torch-pruning's DependencyGraph, so this works on any PyTorch CNN.

Every rearrangement is checked: the network's output must not change (a permutation that would reorder the
network's own outputs, say, is undone).

`prune` is the whole workflow: rearrange, then raise the sparsity gradually (Zhu & Gupta's cubic schedule) while
fine-tuning with distillation from the dense network, recomputing the masks now and then and re-applying them after
every optimizer step. It covers 1x1 convolutions and linear layers (blocks of N output features x 1 input feature),
and k x k convolutions when asked; the first layer and the classifier stay dense, as in the paper.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import data
from ..artifacts import LayerPlan
from ..training import distill
from .trace import forward_hooked

BLOCK_SIZES = (4, 8, 16)


def block_scores(weight: torch.Tensor, n: int) -> torch.Tensor:
    """L1 norm of every 1xN block of a conv weight [Cout, Cin, kh, kw] or a linear one [Cout, Cin]:
    [ceil(Cout / N), Cin]. A last block of fewer than N channels (Cout not a multiple of N) is scored on the
    channels it has."""
    cout, cin = weight.shape[:2]
    pad = (-cout) % n
    w = weight.detach().abs().reshape(cout, cin, -1).sum(2)  # [Cout, Cin]: one kernel's L1 norm
    if pad:
        w = torch.cat([w, w.new_zeros(pad, cin)])
    return w.view(-1, n, cin).sum(1)


def block_mask(weight: torch.Tensor, n: int, sparsity: float) -> torch.Tensor:
    """A 0/1 mask of the weight's shape keeping the strongest (1 - sparsity) of its 1xN blocks."""
    scores = block_scores(weight, n)
    keep = scores.numel() - int(round(sparsity * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=weight.dtype)
    if keep > 0:
        flat[torch.topk(scores.flatten(), keep).indices] = 1
    blocks = flat.view_as(scores)  # [Cout/N, Cin]
    per_channel = blocks.repeat_interleave(n, dim=0)[: weight.shape[0]]  # [Cout, Cin]
    return per_channel.reshape(*per_channel.shape, *[1] * (weight.ndim - 2)).expand_as(weight).contiguous()


def prunable(model: nn.Module, kernels: tuple[int, ...] = (1,),
             example: torch.Tensor | None = None) -> dict[str, nn.Conv2d | nn.Linear]:
    """The layers 1xN pruning applies to: dense (not grouped) convolutions whose kernel size is in `kernels` (1x1
    only by default: a k x k layer is pruned only when the caller says a block-sparse kernel of that size pays) and
    linear layers.

    The paper's policy (methods.md 1.1): the first layer, which reads the image, and the classifier stay dense.
    Which layers those are comes from the order the layers run on `example` (the first and the last to run);
    without an example, from the order they are registered in."""
    order = _run_order(model, example) if example is not None else [
        name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    exempt = {order[0], order[-1]} if order else set()
    modules = dict(model.named_modules())
    out: dict[str, nn.Conv2d | nn.Linear] = {}
    for name in order:
        m = modules[name]
        if name in exempt:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                        and m.kernel_size[0] == m.kernel_size[1] and m.kernel_size[0] in kernels):
            out[name] = m
    return out


def _run_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The convolutions and linear layers in the order a forward pass on `example` runs them (each once)."""
    order: list[str] = []
    forward_hooked(model, example, lambda name, mod, args: order.append(name) if name not in order else None)
    return order


# ---------------------------------------------------------------- filter rearrangement


def rearrange(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> int:
    """Sort every coupled group of output channels by its filters' L1 norm (strongest first), in place. Returns how
    many groups were rearranged. The model's function is unchanged: each permutation is checked on `example`."""
    import torch_pruning as tp

    model.eval()
    with torch.no_grad():
        reference = model(example)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    done = 0
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        items = list(group._group)  # GroupItem: dep, idxs, root_idxs (the coupling of each index to the root's)
        importance = _group_importance(items)
        if importance is None:
            continue
        perm = torch.argsort(importance, descending=True, stable=True)
        if torch.equal(perm, torch.arange(len(perm))):
            continue
        with torch.no_grad():
            _permute(items, perm)
            if torch.allclose(model(example), reference, atol=atol, rtol=atol):
                done += 1
            else:  # e.g. the network's own outputs: their order is the user's, not ours to change
                _permute(items, torch.argsort(perm))
    return done


def _group_importance(items: list) -> torch.Tensor | None:
    """Per root channel: the L1 norms of the filters of the dense convolutions and linear layers that write it,
    summed over the group."""
    size = 1 + max(int(r) for it in items for r in it.root_idxs)
    total = torch.zeros(size)
    found = False
    for it in items:
        m = it.dep.target.module
        if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)) and _dim(it) == 0:
            norms = m.weight.detach().abs().flatten(1).sum(1)
            total.index_add_(0, torch.tensor([int(r) for r in it.root_idxs]),
                             norms[torch.tensor([int(i) for i in it.idxs])])
            found = True
    return total if found else None


def _dim(item) -> int | None:
    """Which dimension of the module's weight the item's channels are: 0 for outputs, 1 for inputs, None for
    operations without weights (adds, concats, activations)."""
    m, name = item.dep.target.module, item.dep.handler.__name__
    if not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        return None
    if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and m.groups > 1):
        return 0  # one channel in, the same channel out
    return 0 if "out" in name else 1


def _permute(items: list, perm: torch.Tensor) -> None:
    """Apply the root permutation to every module of the group: the channel that served root r now serves perm[r].
    An item may carry a root's channel several times (a concat feeding one layer twice): each copy is permuted."""
    seen: set[tuple[int, int]] = set()
    for it in items:
        dim = _dim(it)
        m = it.dep.target.module
        if dim is None or (id(m), dim) in seen:
            continue
        seen.add((id(m), dim))
        copies: dict[int, list[int]] = {}
        for idx, root in zip(it.idxs, it.root_idxs):
            copies.setdefault(int(root), []).append(int(idx))
        depth = min(len(v) for v in copies.values())
        for k in range(depth):
            dst = torch.tensor([copies[r][k] for r in sorted(copies)])
            src = torch.tensor([copies[int(perm[r])][k] for r in sorted(copies)])
            for t in _tensors(m, dim):
                t.data.index_copy_(dim, dst, t.data.index_select(dim, src))


def _tensors(m: nn.Module, dim: int) -> list[torch.Tensor]:
    ts = [m.weight]
    if dim == 0:
        ts += [t for t in (getattr(m, "bias", None), getattr(m, "running_mean", None),
                           getattr(m, "running_var", None)) if t is not None]
    return ts


# ---------------------------------------------------------------- pruning


@dataclass
class Pruned:
    masks: dict[str, torch.Tensor]  # layer -> 0/1 mask of its weight
    n: int

    def density(self, name: str) -> float:
        return float(self.masks[name].mean())

    def plan(self) -> dict[str, LayerPlan]:
        """The per-layer plan codegen takes: each pruned layer block-sparse with its N and density."""
        return {name: LayerPlan(name, "bsr", block=self.n, density=self.density(name)) for name in self.masks}


def apply_masks(model: nn.Module, sparsity: float, n: int,
                layers: dict[str, nn.Conv2d | nn.Linear] | None = None) -> Pruned:
    """Zero the weakest `sparsity` of every prunable layer's 1xN blocks, in place, and return the masks."""
    _check(sparsity, n)
    masks = {}
    with torch.no_grad():
        for name, layer in (prunable(model) if layers is None else layers).items():
            masks[name] = block_mask(layer.weight, n, sparsity)
            layer.weight.mul_(masks[name])
    return Pruned(masks, n)


def _check(sparsity: float, n: int) -> None:
    if n not in BLOCK_SIZES:
        raise ValueError(f"N={n}: the block size is one of {BLOCK_SIZES}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be at least 0 and below 1")


# The supernet's training rate, not fine-tuning's 1e-3: pruned weights must move to the kept blocks (on
# bench/sparse_accuracy.py's subnet at 1e-3, 1x4 at 50% ended 1.7 test points below its dense twin; at 3e-3, 0.25).
PRUNE_LR = 3e-3
RAMP = 0.3  # the share of the steps over which sparsity rises; the rest fine-tunes at the target (Zhu & Gupta)
# On bench/sparse_accuracy.py's subnet (300 steps, 50%, 1x4), validation accuracy with the ramp over 0.75 / 0.5 /
# 0.3 / 0.2 of the steps: 96.3% (at lr 1e-3) / 97.2% / 98.0% / 97.9%: a short ramp leaves time to recover.
UPDATES = 16  # how many times the masks are recomputed over the ramp


def prune(model: nn.Module, ds: data.Dataset | None, resolution: int, sparsity: float, n: int = 4, steps: int = 200,
          *, teacher: nn.Module | None = None, teacher_resolution: int | None = None, rearrange_first: bool = True,
          kernels: tuple[int, ...] = (1,), ramp: float = RAMP, lr: float = PRUNE_LR, batch: int = 32,
          kd_weight: float = 1.0, seed: int = 0,
          progress: Callable[[int, int, str, float], None] | None = None) -> Pruned:
    """Prune `model` in place to `sparsity` in 1xN blocks, gradually, while fine-tuning it, and return the masks.

    Filters are rearranged first (strong ones share blocks). Over the first `ramp` of the steps the sparsity rises
    along the cubic schedule and the masks are recomputed from the current weights UPDATES times, so the network
    can move weight into the blocks it keeps; after every optimizer step the masks are applied again, so pruned
    blocks stay zero. The loss is the labels' plus distillation from `teacher` (by default a frozen copy of the
    dense network as it came in): the dense network's soft outputs carry what the pruned one should keep.

    Layers are those of `prunable` (1x1 convolutions and linear layers; k x k convolutions when `kernels` names k;
    never the first layer or the classifier), less those whose outputs are not a whole number of blocks (block-sparse
    storage holds whole blocks of N output channels). steps=0 prunes in one shot with no training at all (and then
    `ds` may be None: random images serve to check the rearrangement)."""
    _check(sparsity, n)
    if steps < 0:
        raise ValueError(f"steps {steps} must be at least 0")
    if steps and ds is None:
        raise ValueError("pruning with fine-tuning needs the training data: pass a Dataset, or steps=0")
    if ds is not None:
        example = data.tensors(ds.train[0][:8], resolution)
    else:
        example = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    if steps and teacher is None:
        teacher, teacher_resolution = copy.deepcopy(model), resolution
    if rearrange_first:
        rearrange(model, example)
    layers = {name: m for name, m in prunable(model, kernels, example).items() if m.weight.shape[0] % n == 0}
    if not steps:
        return apply_masks(model, sparsity, n, layers)
    teacher.eval().requires_grad_(False)
    ramp = max(1, int(ramp * steps))
    schedule = cubic_schedule(sparsity, ramp)
    every = max(1, ramp // UPDATES)
    current = [apply_masks(model, 0.0, n, layers)]

    def after_step(step: int) -> None:
        done = step + 1
        if done <= ramp and (done % every == 0 or done == ramp):
            current[0] = apply_masks(model, schedule(done), n, layers)  # recomputed from the weights as they are
        else:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.mul_(current[0].masks[name])

    distill(model, resolution, teacher, teacher_resolution or resolution, ds, steps, lr=lr, batch=batch,
            kd_weight=kd_weight, seed=seed, after_step=after_step, progress=progress, label="prune")
    return current[0]


def cubic_schedule(final: float, steps: int, start: float = 0.0) -> Callable[[int], float]:
    """Zhu & Gupta's gradual schedule: sparsity rises fast at first and flattens toward `final` at `steps`."""
    return lambda step: final + (start - final) * (1 - min(step, steps) / max(1, steps)) ** 3
