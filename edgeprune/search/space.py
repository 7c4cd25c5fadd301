"""The search space: an elastic MobileNetV2 (Sandler et al. 2018) in the Once-for-All style.

A subnet (`Arch`) fixes the input resolution, every stage's output width and depth, and per block the depthwise
kernel and the expanded ("mid") width. Widths are in channel groups of GROUP, so latency tables stay complete and
SIMD lanes stay full. Random sampling goes through genes, indices into the choice lists; the knapsack sets widths
directly, which is why an Arch stores channel counts rather than ratios.

At its largest (width 1.0, kernel 7, expand 6, MobileNetV2's depths, 224 px) a subnet is ~375M MACs; at its smallest
(width 0.25, kernel 3, expand 3, shallowest, 64 px) ~1M, well below MobileNetV2-0.5 at 128 px (~31M).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ..artifacts import LayerCost, LayerPlan
from ..cost import rows as rows_of

GROUP = 8
STEM, FIRST, LAST = 32, 16, 1280  # MobileNetV2's stem, expand-1 block and final 1x1 widths at width 1.0
# (output channels at width 1.0, max depth, first stride) of the six expanding stages
STAGES = ((24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
KERNELS = (3, 5, 7)
EXPANDS = (3, 4, 6)
WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0)
RESOLUTIONS = tuple(range(64, 225, 16))
MAX_EXPAND = max(EXPANDS)


def channels(base: int, mult: float) -> int:
    return max(GROUP, int(round(base * mult / GROUP)) * GROUP)


def depth_choices(max_depth: int) -> tuple[int, ...]:
    return tuple(range(max(1, max_depth - 2), max_depth + 1))


def max_mid(cin_max: int) -> int:
    return MAX_EXPAND * cin_max


@dataclass(frozen=True)
class Arch:
    resolution: int
    stem: int
    first: int
    widths: tuple[int, ...]  # per stage
    depths: tuple[int, ...]  # per stage
    kernels: tuple[tuple[int, ...], ...]  # per stage, per active block
    mids: tuple[tuple[int, ...], ...]  # per stage, per active block: expanded channels
    last: int

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Arch:
        return Arch(int(d["resolution"]), int(d["stem"]), int(d["first"]), tuple(d["widths"]), tuple(d["depths"]),
                    tuple(tuple(k) for k in d["kernels"]), tuple(tuple(m) for m in d["mids"]), int(d["last"]))

    def replace(self, **kw) -> Arch:
        return Arch.from_dict({**self.to_dict(), **kw})


@dataclass(frozen=True)
class Block:
    stage: int  # -1 for the expand-1 block after the stem
    index: int
    cin: int
    mid: int  # == cin for the expand-1 block (no expansion conv)
    cout: int
    kernel: int
    stride: int
    residual: bool
    size: int  # input spatial size


def blocks(arch: Arch) -> list[Block]:
    size = (arch.resolution + 1) // 2  # after the stride-2 stem
    out = [Block(-1, 0, arch.stem, arch.stem, arch.first, 3, 1, False, size)]
    cin = arch.first
    for s, (_, _, stride) in enumerate(STAGES):
        for i in range(arch.depths[s]):
            st = stride if i == 0 else 1
            out.append(Block(s, i, cin, arch.mids[s][i], arch.widths[s], arch.kernels[s][i], st, i > 0, size))
            size = (size + st - 1) // st
            cin = arch.widths[s]
    return out


def final_size(arch: Arch) -> int:
    b = blocks(arch)[-1]
    return (b.size + b.stride - 1) // b.stride


def macs(arch: Arch, num_classes: int = 10) -> int:
    return sum(row.macs for row in layers(arch, num_classes) if row.op in ("pointwise", "conv", "depthwise", "matmul"))


def layers(arch: Arch, num_classes: int = 10, sparse: tuple[float, int] | None = None,
           int8: bool = False, binary: bool = False) -> list[LayerCost]:
    """The cost rows of a subnet's kernels, made by the same function a compiled build's kernels are
    (edgeprune.cost.rows): what the latency model prices. Convolutions carry their BatchNorm, activation and
    residual add, as TVM fuses them. With `sparse` = (sparsity, N), the 1x1 convolutions 1xN pruning takes (those
    whose outputs are whole blocks of N) are rows of block-sparse kernels at that density. With `int8`, every
    convolution and the classifier are rows of int8 kernels (the integer program compile runs), and the residual
    adds are their own integer kernels. With `binary`, the 1x1 convolutions binarization takes (all but the
    classifier; the stem and depthwise layers stay fp32) are rows of bit-packed kernels, 1-bit weights and
    activations."""
    q = LayerPlan("", "int8", 8, 8) if int8 else None

    def pw(cin: int, cout: int, size: int, residual: bool = False) -> LayerCost:
        plan = LayerPlan("", "binary", 1, 1) if binary else q
        if sparse and sparse[0] > 0 and cout % sparse[1] == 0:
            plan = LayerPlan("", "bsr", block=sparse[1], density=1.0 - sparse[0])
        return rows_of.conv(cin, cout, 1, 1, size, residual=residual and not int8, plan=plan)

    r = arch.resolution
    rows = [rows_of.data([(1, 3, r, r)], [(1, r, r, 3)])]  # the NCHW -> NHWC input transform
    rows.append(rows_of.conv(3, arch.stem, 3, 2, r, plan=q))
    size = (r + 1) // 2
    for b in blocks(arch):
        if b.stage >= 0:
            rows.append(pw(b.cin, b.mid, b.size))
        rows.append(rows_of.conv(b.mid, b.mid, b.kernel, b.stride, b.size, depthwise=True, plan=q))
        size = (b.size + b.stride - 1) // b.stride
        rows.append(pw(b.mid, b.cout, size, residual=b.residual))
        if int8 and b.residual:  # an integer add on its own grid: not fused into the convolution
            shape = (1, size, size, b.cout)
            rows.append(rows_of.data([shape, shape], [shape]))
    rows.append(pw(arch.widths[-1], arch.last, size))
    rows.append(rows_of.global_mean(size, arch.last))
    rows.append(rows_of.dense(arch.last, num_classes, plan=q))
    return rows


# ---------------------------------------------------------------- genes: random sampling and its statistics


@dataclass(frozen=True)
class Space:
    """Which choices sampling may use; progressive shrinking opens them one dimension at a time."""
    resolutions: tuple[int, ...] = RESOLUTIONS
    kernels: tuple[int, ...] = KERNELS
    expands: tuple[int, ...] = EXPANDS
    widths: tuple[float, ...] = WIDTHS
    elastic_depth: bool = True

    def gene_choices(self) -> list[tuple]:
        """The choice list of every gene, in order: resolution, stem, first, last, then per stage width and depth,
        then per block slot kernel and expand."""
        genes: list[tuple] = [self.resolutions, self.widths, self.widths, self.widths]
        for _, depth, _ in STAGES:
            genes += [self.widths, depth_choices(depth) if self.elastic_depth else (depth,)]
        for _, depth, _ in STAGES:
            genes += [self.kernels, self.expands] * depth
        return genes

    def decode(self, genes: tuple[int, ...]) -> Arch:
        values = [choices[g] for choices, g in zip(self.gene_choices(), genes)]
        res, stem_m, first_m, last_m = values[:4]
        widths, depths = [], []
        for s, (base, _, _) in enumerate(STAGES):
            widths.append(channels(base, values[4 + 2 * s]))
            depths.append(values[5 + 2 * s])
        pos = 4 + 2 * len(STAGES)
        kernels, mids = [], []
        cin = channels(FIRST, first_m)
        for s, (_, depth, _) in enumerate(STAGES):
            ks, ms = [], []
            for i in range(depth):
                k, e = values[pos], values[pos + 1]
                pos += 2
                if i < depths[s]:
                    ks.append(k)
                    ms.append(channels(cin * e, 1.0))
                    cin = widths[s]
            kernels.append(tuple(ks))
            mids.append(tuple(ms))
        return Arch(res, channels(STEM, stem_m), channels(FIRST, first_m), tuple(widths), tuple(depths),
                    tuple(kernels), tuple(mids), channels(LAST, last_m))

    def sample_genes(self, rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(int(rng.integers(len(c))) for c in self.gene_choices())

    def sample(self, rng: np.random.Generator) -> Arch:
        return self.decode(self.sample_genes(rng))

    def largest(self, resolution: int | None = None) -> Arch:
        genes = tuple(len(c) - 1 for c in self.gene_choices())
        arch = self.decode(genes)
        return arch.replace(resolution=resolution) if resolution else arch

    def smallest(self, resolution: int | None = None) -> Arch:
        arch = self.decode(tuple(0 for _ in self.gene_choices()))
        return arch.replace(resolution=resolution) if resolution else arch


def uniform(mult: float, resolution: int, kernel: int = 3, expand: int = 6) -> Arch:
    """MobileNetV2 scaled uniformly in width (the classic width multiplier): the baseline the search must beat."""
    widths = tuple(channels(base, mult) for base, _, _ in STAGES)
    first = channels(FIRST, mult)
    kernels, mids, cin = [], [], first
    for s, (_, depth, _) in enumerate(STAGES):
        kernels.append((kernel,) * depth)
        ms = []
        for _ in range(depth):
            ms.append(channels(cin * expand, 1.0))
            cin = widths[s]
        mids.append(tuple(ms))
    return Arch(resolution, channels(STEM, mult), first, widths, tuple(d for _, d, _ in STAGES), tuple(kernels),
                tuple(mids), channels(LAST, max(1.0, mult)))
