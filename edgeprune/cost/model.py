"""The latency model the search uses: a build's latency on a device, from its LayerCost rows.

Three sources, best first, and every prediction says which it used:
  measured  the kernel (same row key: class, shapes, bits, density, block) was timed on this device;
  fitted    a per-class linear model fitted on the device's latency table:
            t = a * compute + b * memory + c, with compute = operations / peak and memory = bytes / bandwidth.
            Where the table has per-kernel times (calibrated on `local`, from the profile) each class is fitted on
            its kernels' own times; otherwise on whole-network times, each the sum of its kernels'.
            With fewer networks than the fit needs, the prior scaled: per class by its own timed kernels where a
            profiled network has enough of them, else by the networks' median measured / prior.
  prior     no table: a roofline from the target's clock, cores, throughput per bit-width and memory bandwidth,
            max(compute / efficiency_class, memory) + a per-kernel overhead. Marked predicted, not measured.

The peak a row is priced against follows its bit-widths: fp32 FLOP, int8 operations or binary (popcount) operations
per cycle, from the target's TOML. A row of another kernel family (block-sparse, int8, binary) is its own class in
the fit: it runs other code at another rate.

Constants of the prior: efficiencies are the fractions of peak that tuned runtimes reach on such layers (about
0.6-0.8 of peak on 1x1/GEMM-heavy layers, lower on depthwise and data movement; multi-core A7 boards scale poorly,
which the per-class efficiency absorbs; ../shared/docs/arm-targets.md). Boards of one core differ by ~1.5x, which is
why a measured table replaces the prior as soon as there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..artifacts import OP_CLASSES, LatencyTable, LayerCost, TableEntry
from ..errors import UserError
from ..targets import Target

PRIOR_EFFICIENCY = {"pointwise": 0.5, "conv": 0.5, "depthwise": 0.15, "matmul": 0.3, "pool": 0.1, "reduce": 0.1,
                    "data": 0.05}
PRIOR_OVERHEAD_MS = 0.005  # per kernel call: dispatch, parallel launch
# A convolution with this few MACs per output (depthwise, a stem on 3 channels, a narrow 1x1) is bound by moving
# activations, not by arithmetic: the prior prices it at the depthwise rate. Only the prior uses this cut-off; the
# fit learns each class's rate from measurements.
WINDOW_ONLY_MACS = 49
# Bytes the kernels move per byte of their tensors counted once (a row's act + weight + out bytes): packing, im2col
# and tiles read again when a layer does not fit in L2; it also absorbs the targets' bandwidths being what a board
# sustains at best (STREAM), not under a convolution's access pattern. Fitted by bench/prior.py on every published
# ARM figure and shared by the cores; the fitted prior's memory roofline uses it, so depthwise and other layers with
# few MACs per byte stop scaling with threads once they meet the board's bandwidth.
PRIOR_TRAFFIC = 3.25
MIN_FIT_ENTRIES = 8  # fewer measured networks than this: scale the prior instead of fitting per class
MIN_CLASS_KERNELS = 4  # per-kernel fit: a class with fewer timed kernels is priced by the scaled prior


def ops_per_cycle(target: Target, row: LayerCost) -> float:
    """Per core: the target's throughput at the row's bit-widths."""
    bits = max(row.weight_bits, row.act_bits)
    if bits <= 1:
        return target.binary_op_per_cycle
    if bits <= 8:
        return target.int8_op_per_cycle
    return target.fp32_flop_per_cycle


# A 1xN block-sparse kernel's time as a fraction of the dense layer's: density / EFF + ALPHA / K + BETA / M, by how
# much of a SIMD vector one block fills. The kept MACs run at EFF of the dense rate (index loads; narrower blocks are
# packed into pixel vectors, kernels/bsr.py), and each input (ALPHA, over K outputs' worth of MACs) and output
# (BETA) costs a pass (the transposes in and out, the N-wide epilogue) that the density does not shrink: why a 1x4
# layer with few channels (112x112, 32 -> 16) is slower than dense even at 50%. Fitted by least squares on
# bench/sparse.py's kernel table (host, Zen 4; 19 shapes x 50/75/90%): median error 7.7% (1x4), 4.1% (1x8) and
# 3.8% (1x16), every layer on the right side of dense; density / efficiency alone was off by 27% (1x4).
BSR_COST = {0.25: (0.757, 4.05, 4.00), 0.5: (0.804, 1.17, 1.12), 1.0: (1.041, 0.72, 0.78)}


def bsr_efficiency(row: LayerCost, target: Target) -> float:
    """The block-sparse rate factor of a row (1 for every other family): its kept MACs' time is that of
    dense MACs at this rate."""
    if row.family != "bsr":
        return 1.0
    fill = min(1.0, row.block / max(1, target.simd_lanes))
    eff, alpha, beta = BSR_COST.get(fill, BSR_COST[0.25] if fill < 0.5 else BSR_COST[1.0])
    k, m = (row.shapes[0][-1], row.shapes[-1][-1]) if row.shapes else (1 << 30, 1 << 30)
    density = max(row.density, 1e-9)
    # Blocks narrower than a vector are run with vectors of pixels: a map of fewer pixels than a whole number of
    # vectors pays for the rest (a 3x3 map, 16 lanes: 16 of 9). The fit's maps (7x7 and larger) hardly had any.
    pixels = int(np.prod(row.shapes[-1][:-1])) if row.shapes else 1 << 30
    lanes = max(1, target.simd_lanes)
    used = pixels / (-(-pixels // lanes) * lanes) if fill < 1.0 else 1.0
    return 1.0 / (1.0 / (eff * used) + (alpha / max(1, k) + beta / max(1, m)) / density)


def fit_class(row: LayerCost) -> str:
    """What the fit keeps apart: the operator class, and the family when it is not dense fp32."""
    return row.op if row.family == "dense" else f"{row.op}/{row.family}"


def memory_ms(row: LayerCost, target: Target) -> float:
    """The row's bytes at the target's memory bandwidth."""
    return (row.act_bytes + row.weight_bytes + row.out_bytes) / (target.mem_bandwidth_gbs * 1e6)


def terms(row: LayerCost, target: Target, threads: int | None = None) -> tuple[float, float]:
    """(compute ms, memory ms) of a row at the target's peak and bandwidth."""
    cores = threads or target.cores
    peak_per_ms = cores * target.clock_mhz * 1e3 * ops_per_cycle(target, row)  # MHz * 1e6 / 1e3 per ms
    return 2 * row.macs / peak_per_ms, memory_ms(row, target)


def fitted_prior_ms(row: LayerCost, target: Target, threads: int | None = None, winograd: float = 1.0,
                    traffic: float = PRIOR_TRAFFIC) -> float:
    """A row's time from the target's prior fitted to published figures (targets/*.toml, bench/prior.py): one core's
    peak at the row's bit-widths times the class's efficiency, t threads t ** scaling times faster than one, the
    memory roofline (the row's bytes times `traffic` at the target's bandwidth: threads share it), and an overhead
    per call. Pooling, means and data movement are priced by their bytes alone.

    `winograd` divides the work of 3x3 stride-1 convolutions: the published runtimes (ncnn, TVM) use Winograd there,
    and fitting to them must say so; our kernels do not, so the product prices them at 1."""
    eff = {"pointwise": target.prior_eff_pointwise, "conv": target.prior_eff_conv,
           "depthwise": target.prior_eff_depthwise, "matmul": target.prior_eff_matmul}.get(row.op)
    compute = 0.0
    if eff:
        if max(row.weight_bits, row.act_bits) <= 8:
            eff *= target.prior_int8_efficiency
        macs = row.macs / winograd if winograd != 1.0 and winograd_eligible(row) else row.macs
        speedup = (threads or target.cores) ** target.prior_thread_scaling
        eff *= bsr_efficiency(row, target)
        compute = 2 * macs / (target.clock_mhz * 1e3 * ops_per_cycle(target, row) * eff * speedup)
    return max(compute, traffic * memory_ms(row, target)) + target.prior_overhead_us / 1e3


def winograd_eligible(row: LayerCost) -> bool:
    """A dense 3x3 convolution at stride 1: what Winograd's F(m, 3) transforms apply to."""
    if row.op != "conv" or len(row.shapes) < 2:
        return False
    inp, out = row.shapes[0], row.shapes[-1]
    per_out = row.macs / max(1, float(np.prod(out))) / max(row.density, 1e-9)
    return abs(per_out - 9 * inp[-1]) < 0.5 and tuple(inp[1:3]) == tuple(out[1:3])


@dataclass
class Prediction:
    ms: float
    sources: dict[str, int]  # how many kernels each source priced
    per_layer_ms: list[float] = field(default_factory=list)
    band: tuple[float, float] = (1.0, 1.0)  # the prior's spread over boards of the core, as multipliers of ms

    @property
    def band_ms(self) -> tuple[float, float]:
        return self.ms * self.band[0], self.ms * self.band[-1]

    @property
    def source(self) -> str:
        """'measured' only if every kernel was; 'prior' if any was priced by the prior; else 'fitted'."""
        if self.sources.get("prior"):
            return "prior"
        return "measured" if set(self.sources) == {"measured"} else "fitted"


@dataclass
class LatencyModel:
    target: Target
    threads: int | None = None
    coef: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # class -> (a, b, c), fitted
    measured: dict[str, float] = field(default_factory=dict)  # row key -> ms
    scale: float | None = None  # measured / prior over the table's networks (None: no table): prices what no fit does
    class_scale: dict[str, float] = field(default_factory=dict)  # class -> measured / prior over its timed kernels

    @property
    def band(self) -> tuple[float, float]:
        """The spread of boards of this core around the prior (the target's band) while the prior prices alone;
        once the model has learned from this device's own measurements, none."""
        return (1.0, 1.0) if self.scale is not None else (self.target.prior_band[0], self.target.prior_band[-1])

    def prior_ms(self, row: LayerCost) -> float:
        if self.target.prior_fitted:
            return fitted_prior_ms(row, self.target, self.threads)
        compute, memory = terms(row, self.target, self.threads)
        # MACs per output of the dense layer: a sparse layer keeps its class, it only skips blocks
        per_out = row.macs / max(row.density, 1e-9) / max(1, np.prod(row.shapes[-1])) if row.shapes else 0
        cls = "depthwise" if row.op in ("pointwise", "conv") and per_out <= WINDOW_ONLY_MACS else row.op
        rate = PRIOR_EFFICIENCY[cls] * bsr_efficiency(row, self.target)
        return max(compute / rate, memory) + PRIOR_OVERHEAD_MS

    def layer_ms(self, row: LayerCost) -> tuple[float, str]:
        key = row.key()
        if key in self.measured:
            return self.measured[key], "measured"
        cls = fit_class(row)
        if cls in self.coef:
            a, b, c = self.coef[cls]
            compute, memory = terms(row, self.target, self.threads)
            return a * compute + b * memory + c, "fitted"
        prior = self.prior_ms(row)
        if self.scale is None:
            return prior, "prior"
        # a family's prior is a rate relative to the dense class (bsr_efficiency): until its own kernels are timed,
        # it takes the dense class's scale
        return prior * self.class_scale.get(cls, self.class_scale.get(row.op, self.scale)), "fitted"

    def predict(self, rows: list[LayerCost]) -> Prediction:
        if not rows:
            raise UserError("this build has no per-kernel cost rows (compiled by an older edgeprune); recompile it")
        sources: dict[str, int] = {}
        per = []
        for row in rows:
            ms, src = self.layer_ms(row)
            per.append(ms)
            sources[src] = sources.get(src, 0) + 1
        # A band only where the prior priced something: measured and fitted figures are this device's own.
        return Prediction(float(sum(per)), sources, per, self.band if sources.get("prior") else (1.0, 1.0))

    def fit(self, entries: list[TableEntry]) -> LatencyModel:
        """Non-negative least squares on relative error (a 10% miss on 1 ms is as bad as on 100 ms): per class on
        per-kernel times where the table has them, else on whole-network times (each the sum of its kernels')."""
        for e in entries:
            for row, ms in zip(e.layers, e.per_kernel_ms or []):
                self.measured[row.key()] = ms
        if not entries:
            return self
        prior = LatencyModel(self.target, self.threads)
        # Classes the fit leaves out (too few kernels timed) keep the prior, scaled to this device: by their own timed
        # kernels where a profile holds enough of them, else by the networks' median.
        self.scale = float(np.median([e.ms / prior.predict(e.layers).ms for e in entries]))
        profiled = [e for e in entries if e.per_kernel_ms]
        self.class_scale = self._class_scales(profiled, prior)
        if len(profiled) >= MIN_FIT_ENTRIES:
            self.coef = self._fit_kernels(profiled)
        elif len(entries) >= MIN_FIT_ENTRIES:
            self.coef = self._fit_networks(entries)
        return self

    @staticmethod
    def _class_scales(entries: list[TableEntry], prior: LatencyModel) -> dict[str, float]:
        """Per class, its timed kernels' measured time over their prior time (sums: the large kernels, which make a
        network's time, weigh most). One profiled network is enough, where the full fit needs MIN_FIT_ENTRIES: a
        family's prior constants were fitted on one CPU (BSR_COST on Zen 4), and one scale for every class would
        price the next sparse subnet as wrong as the last (a build loop on a Zen 5: a sparse subnet's 1x4 kernels ran
        at 1.13x their prior time, its dense kernels at 0.3-0.4x; the scale of its networks was 0.29)."""
        sums: dict[str, list[float]] = {}
        for e in entries:
            for row, ms in zip(e.layers, e.per_kernel_ms or []):
                if ms > 0:
                    acc = sums.setdefault(fit_class(row), [0.0, 0.0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + ms, acc[1] + prior.prior_ms(row), acc[2] + 1
        return {cls: t / p for cls, (t, p, n) in sums.items() if n >= MIN_CLASS_KERNELS and p > 0}

    def _features(self, row: LayerCost) -> np.ndarray:
        compute, memory = terms(row, self.target, self.threads)
        return np.array([compute, memory, 1.0])

    def _fit_kernels(self, entries: list[TableEntry]) -> dict[str, tuple[float, float, float]]:
        """Each kernel's error counts in units of its network's time: what matters is the network's latency, and
        weighting each kernel by its own time instead lets the many small kernels pull every class's line below
        the large ones (the networks came out ~20% fast; this way median network error on the table fell from
        ~19% to ~9%, leave-one-out)."""
        from scipy.optimize import nnls

        by_class: dict[str, list[tuple[np.ndarray, float, float]]] = {}
        for e in entries:
            for row, ms in zip(e.layers, e.per_kernel_ms or []):
                if ms > 0:  # 0: elided by the VM, nothing to learn from
                    by_class.setdefault(fit_class(row), []).append((self._features(row), ms, 1.0 / e.ms))
        coef = {}
        for cls, rows in by_class.items():
            if len(rows) >= MIN_CLASS_KERNELS:
                a, t, w = (np.array([r[i] for r in rows]) for i in range(3))
                sol, _ = nnls(a * w[:, None], t * w)
                coef[cls] = tuple(float(v) for v in sol)
        return coef

    def _fit_networks(self, entries: list[TableEntry]) -> dict[str, tuple[float, float, float]]:
        from scipy.optimize import nnls

        classes = sorted({fit_class(r) for e in entries for r in e.layers}, key=_class_order)
        rows = np.zeros((len(entries), len(classes), 3))
        for i, e in enumerate(entries):
            for row in e.layers:
                rows[i, classes.index(fit_class(row))] += self._features(row)
        t = np.array([e.ms for e in entries])
        sol, _ = nnls(rows.reshape(len(entries), -1) / t[:, None], np.ones(len(t)))
        return {cls: tuple(float(v) for v in sol[3 * i: 3 * i + 3]) for i, cls in enumerate(classes)}


def _class_order(cls: str) -> tuple[int, str]:
    op = cls.split("/")[0]
    return (OP_CLASSES.index(op), cls)


def model_for(target: Target, table: LatencyTable | None = None, threads: int | None = None) -> LatencyModel:
    """The model of `target`: the prior, fitted to `table` when there is one with entries."""
    model = LatencyModel(target, threads=threads if threads is not None else (table.threads if table else None))
    return model.fit(table.entries) if table and table.entries else model
