"""1xN block pruning (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks"; methods.md section 1).

N consecutive output kernels that share one input channel form a block, scored by its L1 norm and kept or pruned
whole: a kept block is N output channels' weights for one input channel, which a CPU multiplies as one SIMD vector.
Before pruning, filter rearrangement puts strong filters next to each other, so blocks are mostly strong or mostly
weak: each layer's output channels are sorted by their filters' L1 norms, and everything coupled to those channels
(BatchNorm, the consumers' input channels, layers tied by a residual add or a concat, depthwise layers between)
is permuted to match. The coupling comes from torch-pruning's DependencyGraph, so this works on any PyTorch CNN.

Every rearrangement is checked: the network's output must not change (a permutation that would reorder the
network's own outputs, say, is undone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..artifacts import LayerPlan

BLOCK_SIZES = (4, 8, 16)


def block_scores(weight: torch.Tensor, n: int) -> torch.Tensor:
    """L1 norm of every 1xN block of a conv weight [Cout, Cin, kh, kw]: [ceil(Cout / N), Cin]. A last block of
    fewer than N channels (Cout not a multiple of N) is scored on the channels it has."""
    cout, cin = weight.shape[:2]
    pad = (-cout) % n
    w = weight.detach().abs().sum(dim=(2, 3))  # [Cout, Cin]: one kernel's L1 norm
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
    return per_channel[:, :, None, None].expand_as(weight).contiguous()


def prunable(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convolutions 1xN pruning applies to: dense (not grouped, not depthwise), not reading the image itself
    (the first layer stays dense, as in the paper)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3}


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
    """Per root channel: the L1 norms of the dense convolutions' filters that write it, summed over the group."""
    size = 1 + max(int(r) for it in items for r in it.root_idxs)
    total = torch.zeros(size)
    found = False
    for it in items:
        m = it.dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups == 1 and _dim(it) == 0:
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


def apply_masks(model: nn.Module, sparsity: float, n: int, layers: dict[str, nn.Conv2d] | None = None) -> Pruned:
    """Zero the weakest `sparsity` of every prunable layer's 1xN blocks, in place, and return the masks."""
    if n not in BLOCK_SIZES:
        raise ValueError(f"N={n}: the block size is one of {BLOCK_SIZES}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be at least 0 and below 1")
    masks = {}
    with torch.no_grad():
        for name, conv in (layers or prunable(model)).items():
            masks[name] = block_mask(conv.weight, n, sparsity)
            conv.weight.mul_(masks[name])
    return Pruned(masks, n)


def cubic_schedule(final: float, steps: int, start: float = 0.0) -> Callable[[int], float]:
    """Zhu & Gupta's gradual schedule: sparsity rises fast at first and flattens toward `final` at `steps`."""
    return lambda step: final + (start - final) * (1 - min(step, steps) / max(1, steps)) ** 3
