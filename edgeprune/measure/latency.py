"""The latency model the search uses: a build's latency on a device, from its kernels.

Three sources, best first, and every prediction says which it used:
  measured  the kernel (same kind and shapes) was timed on this device during calibration;
  fitted    a per-class linear model fitted on the device's calibration table:
            t = a * compute + b * memory + c, with compute = FLOPs / peak and memory = bytes / bandwidth.
            Where the table has per-kernel times (calibrated on `local`, from the profile) each class is fitted on
            its kernels' own times; otherwise on whole-network times, each the sum of its kernels'.
  prior     no table: a roofline from the target's clock, cores, SIMD width and memory bandwidth,
            max(compute / efficiency_kind, memory) + a per-kernel overhead. Marked predicted, not measured.

Classes split the compiled table's kinds by what the kernel does, read from its shapes and FLOPs (so a compiled
build's rows and the search's analytic rows fall in the same class): a 1x1 convolution, even one with few input
channels, runs at several times the FLOP rate of a depthwise one, and one line cannot fit both.

Constants of the prior: peak = cores * clock * fp32 FLOP/cycle (targets/*.toml; a Cortex-A7 core does one fp32 MAC
per cycle, ../shared/docs/arm-targets.md); efficiencies are the fractions of peak that tuned runtimes reach on
such layers there (about 0.6-0.8 of peak on 1x1/GEMM-heavy layers, lower on depthwise and data movement; multi-core
A7 boards scale poorly, which the per-kind efficiency absorbs). Boards of one core differ by ~1.5x, which is
why a measured table replaces the prior as soon as there is one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..targets import Target

KINDS = ("conv", "dwconv", "matmul", "pool", "reduce", "data")  # as compiled builds label their kernels
CLASSES = ("pointwise", "conv", "depthwise", "matmul", "pool", "reduce", "data")  # what the fit distinguishes
PRIOR_EFFICIENCY = {"conv": 0.5, "dwconv": 0.15, "matmul": 0.3, "pool": 0.1, "reduce": 0.1, "data": 0.05}
PRIOR_OVERHEAD_MS = 0.005  # per kernel call: dispatch, parallel launch
TABLE_VERSION = 1
MIN_FIT_ENTRIES = 8  # fewer measured networks than this: scale the prior instead of fitting per class
MIN_CLASS_KERNELS = 4  # per-kernel fit: a class with fewer timed kernels is priced by the scaled prior


def _peak_flops_per_ms(target: Target, threads: int | None = None) -> float:
    cores = threads or target.cores
    return cores * target.clock_mhz * 1e3 * target.fp32_flop_per_cycle  # MHz * 1e6 / 1e3 per ms


def _bytes_per_ms(target: Target) -> float:
    return target.mem_bandwidth_gbs * 1e6


def layer_key(layer: dict) -> str:
    return f"{layer['kind']}:{json.dumps(layer['shapes'])}"


def layer_class(layer: dict) -> str:
    """pointwise, conv (dense k x k), depthwise, or the kernel's kind. A convolution's reduction length per output,
    FLOPs / (2 * outputs), is cin for 1x1, k*k*cin for a dense k x k and k*k for a depthwise one."""
    kind = layer["kind"]
    if kind not in ("conv", "dwconv"):
        return kind if kind in CLASSES else "data"
    cin, cout = layer["shapes"][0][-1], layer["shapes"][-1][-1]
    outputs = max(1, int(np.prod(layer["shapes"][-1])))
    red = layer["flops"] / (2 * outputs)
    if abs(red - cin) < 0.5:
        return "pointwise"
    if cin == cout and abs(red - round(red ** 0.5) ** 2) < 0.5:
        return "depthwise"
    return "conv"


def _terms(layer: dict, target: Target, threads: int | None) -> tuple[float, float]:
    compute = layer["flops"] / _peak_flops_per_ms(target, threads)
    memory = (layer["act_bytes"] + layer["weight_bytes"] + layer["out_bytes"]) / _bytes_per_ms(target)
    return compute, memory


@dataclass
class Prediction:
    ms: float
    sources: dict[str, int]  # how many kernels each source priced
    per_layer_ms: list[float] = field(default_factory=list)

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
    measured: dict[str, float] = field(default_factory=dict)  # layer key -> ms
    scale: float | None = None  # measured / prior over the table's networks (None: no table): prices what no fit does

    def layer_ms(self, layer: dict) -> tuple[float, str]:
        key = layer_key(layer)
        if key in self.measured:
            return self.measured[key], "measured"
        compute, memory = _terms(layer, self.target, self.threads)
        cls = layer_class(layer)
        if cls in self.coef:
            a, b, c = self.coef[cls]
            return a * compute + b * memory + c, "fitted"
        eff = PRIOR_EFFICIENCY.get(layer["kind"], 0.05)
        prior = max(compute / eff, memory) + PRIOR_OVERHEAD_MS
        return (prior, "prior") if self.scale is None else (prior * self.scale, "fitted")

    def predict(self, layers: list[dict]) -> Prediction:
        if not layers:
            raise UserError("this build has no per-kernel table (compiled by an older edgeprune); recompile it")
        sources: dict[str, int] = {}
        per = []
        for layer in layers:
            ms, src = self.layer_ms(layer)
            per.append(ms)
            sources[src] = sources.get(src, 0) + 1
        return Prediction(float(sum(per)), sources, per)

    def fit(self, entries: list[dict]) -> LatencyModel:
        """Non-negative least squares on relative error (a 10% miss on 1 ms is as bad as on 100 ms): per class on
        per-kernel times where the table has them, else on whole-network times (each the sum of its kernels')."""
        for e in entries:
            for layer, ms in zip(e["layers"], e.get("per_kernel_ms") or []):
                self.measured[layer_key(layer)] = ms
        if not entries:
            return self
        prior = LatencyModel(self.target, self.threads)
        # Classes the fit leaves out (too few kernels timed) keep the prior, scaled to this device.
        self.scale = float(np.median([e["ms"] / prior.predict(e["layers"]).ms for e in entries]))
        profiled = [e for e in entries if e.get("per_kernel_ms")]
        if len(profiled) >= MIN_FIT_ENTRIES:
            self.coef = self._fit_kernels(profiled)
        elif len(entries) >= MIN_FIT_ENTRIES:
            self.coef = self._fit_networks(entries)
        return self

    def _features(self, layer: dict) -> np.ndarray:
        compute, memory = _terms(layer, self.target, self.threads)
        return np.array([compute, memory, 1.0])

    def _fit_kernels(self, entries: list[dict]) -> dict[str, tuple[float, float, float]]:
        """Each kernel's error counts in units of its network's time: what matters is the network's latency, and
        weighting each kernel by its own time instead lets the many small kernels pull every class's line below
        the large ones (the networks came out ~20% fast; this way median network error on the table fell from
        ~19% to ~9%, leave-one-out)."""
        from scipy.optimize import nnls

        by_class: dict[str, list[tuple[np.ndarray, float, float]]] = {}
        for e in entries:
            for layer, ms in zip(e["layers"], e["per_kernel_ms"]):
                if ms > 0:  # 0: elided by the VM, nothing to learn from
                    by_class.setdefault(layer_class(layer), []).append((self._features(layer), ms, 1.0 / e["ms"]))
        coef = {}
        for cls, rows in by_class.items():
            if len(rows) >= MIN_CLASS_KERNELS:
                a, t, w = (np.array([r[i] for r in rows]) for i in range(3))
                sol, _ = nnls(a * w[:, None], t * w)
                coef[cls] = tuple(float(v) for v in sol)
        return coef

    def _fit_networks(self, entries: list[dict]) -> dict[str, tuple[float, float, float]]:
        from scipy.optimize import nnls

        rows = np.zeros((len(entries), len(CLASSES), 3))
        for i, e in enumerate(entries):
            for layer in e["layers"]:
                rows[i, CLASSES.index(layer_class(layer))] += self._features(layer)
        t = np.array([e["ms"] for e in entries])
        sol, _ = nnls(rows.reshape(len(entries), -1) / t[:, None], np.ones(len(t)))
        present = rows[:, :, 2].sum(axis=0) > 0
        return {cls: tuple(float(v) for v in sol[3 * i: 3 * i + 3]) for i, cls in enumerate(CLASSES) if present[i]}


def load_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        table = json.loads(path.read_text())
        if table.get("version") != TABLE_VERSION or not isinstance(table.get("entries"), list):
            raise ValueError("unknown layout")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not an edgeprune latency table ({e}); re-run edgeprune calibrate") from None
    return table


def model_for(target: Target, table: dict | None = None, threads: int | None = None) -> LatencyModel:
    model = LatencyModel(target, threads=threads if threads is not None else (table or {}).get("threads"))
    return model.fit(table["entries"]) if table else model


def save_table(path: Path, table: dict) -> None:
    """Atomically: a table is either the old one or the complete new one, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**table, "version": TABLE_VERSION}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
