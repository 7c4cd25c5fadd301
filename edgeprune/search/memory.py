"""RAM and flash of a subnet before it is compiled: what `build --ram --flash` searches under.

A C package's RAM is its arena (the intermediate tensors, placed by their lifetimes, and each kernel call's
workspace among them); its flash is its code plus its weights (codegen/cpackage). Here both are estimated from the
architecture alone:

- the arena as the largest set of tensors alive at once, walking the program the package runs (the NCHW input
  and its NHWC copy, the stem, and per inverted-residual block its input while the block's residual add still
  needs it, the expanded map, the depthwise output, or a row of it where codegen merges the depthwise and the
  pointwise layers (and three rows of the expanded map where it merges a stride-2 block's expanding layer too),
  and the block output), plus a margin for the placement's fragmentation;
- the weights as every convolution's and the classifier's with their folded biases, each aligned as the package
  aligns it;
- the code as a fixed runtime plus, per distinct kernel and per call, what cortex-m7 packages of the space
  measured (43 KB for 26 kernels and 28 calls, 67 KB for 33 and 55; the constants lean high of both).

The estimates lean high; compile then states the exact figures and refuses a package that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..artifacts import MemoryBudget
from . import space as S

ALIGN = 64  # as codegen/cpackage/memory.py aligns every tensor
ARENA_MARGIN = 1.1  # the greedy placement's fragmentation over the live set, leaning high
WORKSPACE = 1024  # a register tile too large for the stack, with padding inlined; added on top, leaning high
CODE_BASE = 2048  # the runtime shim and the entry point
CODE_PER_KERNEL = 1536
CODE_PER_CALL = 384
# As codegen/dwpw.py merges a depthwise convolution with the pointwise one after it: on maps of this many pixels
# and more, the kernel holds a row of the depthwise output in its workspace and the whole map is never a tensor.
# In a C package (what this estimates) a 3x3 stride-2 block's expanding layer joins them on maps of even size: 3 rows
# of it in workspace.
MERGE_MIN_PIXELS = 100


@dataclass(frozen=True)
class Footprint:
    ram: int  # arena + workspace, bytes
    flash: int  # code + weights, bytes
    arena: int
    weights: int
    code: int


def _aligned(n: float) -> int:
    return int(-(-n // ALIGN)) * ALIGN


def footprint(arch: S.Arch, num_classes: int = 10, act_bytes: float = 4, weight_bytes: float = 4) -> Footprint:
    """The estimated RAM and flash of `arch`'s C package (fp32 by default; 1-byte sizes for int8)."""

    def t(h: int, c: int) -> int:
        return _aligned(h * h * c * act_bytes)

    r = arch.resolution
    s = (r + 1) // 2
    live = [2 * t(r, 3), t(r, 3) + t(s, arch.stem)]  # the NCHW -> NHWC copy, then the stem
    for b in S.blocks(arch):
        out = (b.size + b.stride - 1) // b.stride
        x, d, y = t(b.size, b.cin), t(out, b.mid), t(out, b.cout)
        keep = x if b.residual else 0
        e = t(b.size, b.mid) if b.stage >= 0 else x  # the expand-1 block after the stem has no expansion conv
        merged = out * out >= MERGE_MIN_PIXELS
        row = _aligned(out * b.mid * act_bytes)  # a row of the depthwise output
        if merged and b.stage >= 0 and b.stride == 2 and b.kernel == 3 and b.size % 2 == 0:  # expanding layer too
            live.append(x + y + _aligned(3 * b.size * b.mid * act_bytes) + row)
            continue
        if b.stage >= 0:
            live.append(x + e)
        if merged:  # one kernel: the depthwise output is a row of workspace, not a tensor
            live.append(keep + e + y + row)
        else:
            live += [keep + e + d, keep + d + y]
    final = S.final_size(arch)
    live += [t(final, arch.widths[-1]) + t(final, arch.last), t(final, arch.last) + 2 * t(1, arch.last)]
    arena = int(max(live) * ARENA_MARGIN)

    weights, kernels, calls = 0, set(), 0
    for row in S.layers(arch, num_classes):
        calls += 1
        kernels.add((row.op, row.shapes, row.act_bytes))
        if row.op in ("conv", "pointwise", "depthwise", "matmul"):
            w = row.shapes[1] if len(row.shapes) > 2 else ()
            count = 1
            for d in w:
                count *= d
            weights += _aligned(count * weight_bytes) + _aligned(row.shapes[-1][-1] * 4)  # weight, folded bias
    code = CODE_BASE + CODE_PER_KERNEL * len(kernels) + CODE_PER_CALL * calls
    return Footprint(arena + WORKSPACE, code + weights, arena, weights, code)


def bounded(latency: Callable[[S.Arch], float], budget_ms: float, memory: MemoryBudget | None,
            act_bytes: float = 4, weight_bytes: float = 4) -> Callable[[S.Arch], float]:
    """`latency` with the memory budgets folded in: the largest of the subnet's latency, RAM and flash, each as a
    fraction of its budget, times `budget_ms`. It is within `budget_ms` exactly when all three fit, so the search
    (pools filtered by it, the knapsack refining widths against it) looks only at subnets that fit all three."""
    if memory is None or (memory.ram is None and memory.flash is None):
        return latency

    def cost(arch: S.Arch) -> float:
        f = footprint(arch, act_bytes=act_bytes, weight_bytes=weight_bytes)
        worst = max(f.ram / memory.ram if memory.ram else 0.0, f.flash / memory.flash if memory.flash else 0.0)
        return max(latency(arch), worst * budget_ms)

    return cost


def refuse_unfit(smallest: S.Arch, memory: MemoryBudget | None, act_bytes: float = 4,
                 weight_bytes: float = 4) -> None:
    """A one-line UserError when even the smallest subnet of the space cannot fit the RAM or flash budget."""
    if memory is None:
        return
    f = footprint(smallest, act_bytes=act_bytes, weight_bytes=weight_bytes)
    memory.check(f.ram, f.flash, what="the smallest subnet of the search space (estimated)")
