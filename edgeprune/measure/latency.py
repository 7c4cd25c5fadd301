"""The latency model the search uses: a build's latency on a device, from its kernels.

Three sources, best first, and every prediction says which it used:
  measured  the kernel (same kind and shapes) was timed on this device during calibration;
  fitted    a per-kind linear model fitted on the device's calibration table:
            t = a_kind * compute + b_kind * memory + c_kind, with compute = FLOPs / peak and memory = bytes / bandwidth;
  prior     no table: a roofline from the target's clock, cores, SIMD width and memory bandwidth,
            max(compute / efficiency_kind, memory) + a per-kernel overhead. Marked predicted, not measured.

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

KINDS = ("conv", "dwconv", "matmul", "pool", "reduce", "data")
PRIOR_EFFICIENCY = {"conv": 0.5, "dwconv": 0.15, "matmul": 0.3, "pool": 0.1, "reduce": 0.1, "data": 0.05}
PRIOR_OVERHEAD_MS = 0.005  # per kernel call: dispatch, parallel launch
TABLE_VERSION = 1
MIN_FIT_ENTRIES = 8  # fewer measured networks than this: scale the prior instead of fitting per kind


def _peak_flops_per_ms(target: Target, threads: int | None = None) -> float:
    cores = threads or target.cores
    return cores * target.clock_mhz * 1e3 * target.fp32_flop_per_cycle  # MHz * 1e6 / 1e3 per ms


def _bytes_per_ms(target: Target) -> float:
    return target.mem_bandwidth_gbs * 1e6


def layer_key(layer: dict) -> str:
    return f"{layer['kind']}:{json.dumps(layer['shapes'])}"


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
    coef: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # kind -> (a, b, c), fitted
    measured: dict[str, float] = field(default_factory=dict)  # layer key -> ms
    scale: float = 1.0  # measured / prior, when there are too few entries to fit per kind

    def layer_ms(self, layer: dict) -> tuple[float, str]:
        key = layer_key(layer)
        if key in self.measured:
            return self.measured[key], "measured"
        compute, memory = _terms(layer, self.target, self.threads)
        if layer["kind"] in self.coef:
            a, b, c = self.coef[layer["kind"]]
            return a * compute + b * memory + c, "fitted"
        eff = PRIOR_EFFICIENCY.get(layer["kind"], 0.05)
        prior = max(compute / eff, memory) + PRIOR_OVERHEAD_MS
        return (prior, "prior") if self.scale == 1.0 else (prior * self.scale, "fitted")

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
        """Least squares, non-negative, over whole-network times: each entry's time is the sum of its kernels'."""
        from scipy.optimize import nnls

        rows, times = [], []
        for e in entries:
            x = np.zeros(3 * len(KINDS))
            for layer in e["layers"]:
                k = KINDS.index(layer["kind"]) if layer["kind"] in KINDS else KINDS.index("data")
                compute, memory = _terms(layer, self.target, self.threads)
                x[3 * k: 3 * k + 3] += (compute, memory, 1.0)
            rows.append(x)
            times.append(e["ms"])
            for layer, ms in zip(e["layers"], e.get("per_kernel_ms") or []):
                self.measured[layer_key(layer)] = ms
        if not rows:
            return self
        if len(rows) < MIN_FIT_ENTRIES:  # a per-kind fit would be underdetermined: one factor on the prior
            prior = LatencyModel(self.target, self.threads)
            ratios = [e["ms"] / prior.predict(e["layers"]).ms for e in entries]
            self.scale = float(np.median(ratios))
            return self
        a, t = np.array(rows), np.array(times)
        # Relative error is what matters (a 10% miss on 1 ms is as bad as on 100 ms): weight rows by 1/time.
        w = 1.0 / np.maximum(t, 1e-6)
        sol, _ = nnls(a * w[:, None], t * w)
        present = a.reshape(len(rows), len(KINDS), 3)[:, :, 2].sum(axis=0) > 0
        self.coef = {kind: tuple(float(v) for v in sol[3 * i: 3 * i + 3])
                     for i, kind in enumerate(KINDS) if present[i]}
        return self


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
