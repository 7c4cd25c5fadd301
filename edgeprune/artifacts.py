"""The typed artifacts that pass between the pipeline's stages (see ../shared/docs/architecture.md).

This is the bottom of the house: plain dataclasses and their JSON forms, no TVM and no torch import, so every stage
can be run, tested and replaced alone.

    search   -> Network (a module plus a per-layer plan; dense fp32 today)
    compress -> Network with each layer's plan filled in (block-sparse, int8, binary as they land)
    codegen  -> Build (a directory: library or C package, with one LayerCost row per kernel call)
    measure  -> Measurement (runs, per-kernel profile)
    learn    -> TableEntry in a LatencyTable (what the latency model fits)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

BUILD_JSON = "build.json"
BUILD_FORMAT_VERSION = 2  # 2: layers are LayerCost rows (1 had untyped dicts)
TABLE_VERSION = 2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


# The classes the latency model prices apart: a 1x1 convolution runs at several times the FLOP rate of a depthwise
# one, and one line cannot fit both.
OP_CLASSES = ("pointwise", "conv", "depthwise", "matmul", "pool", "reduce", "data")


_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str, what: str = "size") -> int:
    """'512KiB', '2MiB', '640KB', '1.5MB', '4096' (bytes) -> bytes; anything else is a one-line UserError."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in ("", *_UNITS):
        raise UserError(f"{what} '{text}' is not a size; write it like 512KiB, 2MiB, 640KB or 4096 (bytes)")
    return int(float(m.group(1)) * _UNITS.get(unit, 1))


def format_bytes(n: int) -> str:
    """Bytes as the largest binary unit that keeps a short figure: 524,288 -> '512 KiB'."""
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


class MemoryBudgetError(UserError):
    """A package (or the smallest candidate) that does not fit --ram or --flash; says which and by how much."""

    def __init__(self, message: str, ram: int, flash: int):
        self.ram, self.flash = ram, flash
        super().__init__(message)


@dataclass(frozen=True)
class MemoryBudget:
    """RAM (arena plus workspace) and flash (code plus weights) a C package may take, in bytes; None: no limit."""

    ram: int | None = None
    flash: int | None = None

    def __bool__(self) -> bool:
        return self.ram is not None or self.flash is not None

    def check(self, ram: int, flash: int, what: str = "the package") -> None:
        """Raise MemoryBudgetError naming each figure over its budget and by how much."""
        over = [f"{name} {need:,} B is {format_bytes(need - limit)} over --{flag} {format_bytes(limit)}"
                for name, flag, need, limit in (("RAM (arena + workspace)", "ram", ram, self.ram),
                                                ("flash (code + weights)", "flash", flash, self.flash))
                if limit is not None and need > limit]
        if over:
            raise MemoryBudgetError(f"{what} does not fit: {'; '.join(over)}", ram, flash)


@dataclass(frozen=True)
class LayerCost:
    """One kernel call as the latency model sees it. Made by `edgeprune.cost.rows`, the same way for a compiled
    build's kernels and for the search's analytic pricing of a subnet."""

    op: str  # one of OP_CLASSES
    shapes: tuple[tuple[int, ...], ...]  # input, weight (if any), output: NHWC / HWIO as compiled
    macs: int  # multiply-accumulates actually executed (dense MACs x density)
    act_bytes: int  # activations read (a fused residual add reads the block's input too)
    weight_bytes: int
    out_bytes: int
    weight_bits: int = 32
    act_bits: int = 32
    density: float = 1.0  # kept fraction of weight blocks (1x N block sparsity); 1 is dense
    block: int = 1  # N of the 1xN blocks
    family: str = "dense"  # the codegen kernel family that runs it
    kernel: str = ""  # the fused kernel's name in a build; "" for an analytic row
    sources: tuple[str, ...] = ()  # the user's layer names it came from (ONNX nodes or module paths)

    def key(self) -> str:
        """Same key, same kernel: a measured time is looked up by it."""
        return (f"{self.op}:{json.dumps([list(s) for s in self.shapes])}:w{self.weight_bits}a{self.act_bits}"
                f":d{self.density:g}:b{self.block}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        d["sources"] = list(self.sources)
        return d

    @staticmethod
    def from_json(d: dict) -> LayerCost:
        known = {f.name for f in fields(LayerCost)}
        d = {k: v for k, v in d.items() if k in known}
        return LayerCost(**{**d, "shapes": tuple(tuple(s) for s in d["shapes"]),
                            "sources": tuple(d.get("sources", ()))})


@dataclass(frozen=True)
class LayerPlan:
    """How one layer of a Network is to run. Compression fills these in; dense fp32 is the default."""

    layer: str  # the module path (torch) or node name
    scheme: str = "dense"  # dense | bsr | int8 | binary
    weight_bits: int = 32
    act_bits: int = 32
    block: int = 1  # bsr: N of the 1xN blocks
    density: float = 1.0  # bsr: kept fraction of blocks
    params: dict = field(default_factory=dict, compare=False)  # scheme-specific: scales, masks' file, ...


@dataclass
class IntegerOp:
    """One operation of an int8 program. Tensors are named; every int8 tensor is on its own grid (scale, zero
    point), given by the op that makes it (its zero point in the params below; its scale, where known, as
    `output_scale`, which the integer arithmetic does not read but a .tflite export writes). Kinds and their
    params (arrays are numpy; shapes NCHW as in PyTorch):

      quantize    float input -> int8: clamp(round_half_even(x / scale) + zero_point)
      conv        a convolution or dense layer: weight int8 (OIHW / OI), bias int32, multiplier, shift (per
                  output channel), input_zero_point, output_zero_point, act_min, act_max, stride, padding
                  ((rows, columns), or (top, left, bottom, right)), dilation, groups (1, or depthwise);
                  acc = sum (x - zx) w + bias (int32), out = zo + round_half_even(clamp(float32(acc) *
                  float32(m / 2**shift), act_min - zo, act_max - zo)) in IEEE float32 (quantize.requantize)
      fconv       a convolution or dense layer kept in fp32 (mixed precision): weight and bias float32, input
                  and output scale and zero point, act_min, act_max and geometry as for conv; out = clamp(zo +
                  round((conv(dequantized x) + bias) / output_scale))
      add         two (or more) int8 inputs: multipliers (ma, mb, ...), shift s, input zero points, output zero
                  point, clamp; out = clamp(zo + ((ma (a - za) + mb (b - zb) + ... + 2**(s-1)) >> s))
      mean        over H, W: multiplier, shift, input and output zero points; out = clamp(zo + round(sum (x - zx)
                  * m / 2**shift)); of the sum of several inputs (an imported .tflite's float mean), multipliers
                  and input_zero_points instead, one rounding of sum_i m_i sum (x_i - z_i)
      requant     one input to another grid (a ReLU on its own is a requant with a clamp): multiplier, shift,
                  zero points, act_min, act_max
      maxpool     kernel, stride, padding as for conv (the grid is kept)
      flatten     [N, C, 1, 1] or [N, C, H, W] -> [N, C*H*W] in PyTorch's order (the grid is kept)
      dequantize  int8 -> float: (q - zero_point) * scale
    """

    kind: str
    inputs: list[str]
    output: str
    params: dict = field(default_factory=dict)
    name: str = ""  # the layer's module path (conv), for reports


@dataclass
class IntegerProgram:
    """A whole network in integer arithmetic, op by op: compress writes it, codegen compiles it, and a numpy
    interpreter of it (compress/integer.py) is the reference compiled int8 networks match bit for bit."""

    input: str
    input_shape: tuple[int, ...]
    ops: list[IntegerOp]
    output: str


@dataclass
class Network:
    """An in-memory network on its way to codegen: a module (torch.nn.Module), an example input shape, and the
    per-layer plan. It goes to codegen without a file in between (torch.export)."""

    module: Any
    input_shape: tuple[int, ...]
    name: str = "model"
    plan: dict[str, LayerPlan] = field(default_factory=dict)  # layer -> plan; absent layers are dense fp32
    arch: dict | None = None  # the search-space architecture, when it came from the supernet
    predicted_ms: float | None = None
    accuracy: float | None = None  # validation accuracy, when known
    integer: IntegerProgram | None = None  # int8 layers: the program codegen compiles (compress/integer.py)


@dataclass
class Build:
    """A compiled network in a directory: the library plus what is needed to run and check it."""

    directory: Path
    target: str
    format: str  # "so": shared library with the Relax VM executable; "c": a C package
    library: str  # file name inside directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str
    source_sha256: str
    kernels: dict[str, int] = field(default_factory=dict)  # fused kernel name -> FLOPs per call
    unscheduled: list[str] = field(default_factory=list)  # kernels no rule fit (slow; reported)
    tuned: bool = False
    tool_version: str = ""
    compile_seconds: float = 0.0
    memory: dict = field(default_factory=dict)  # C package: arena, workspace, intermediate and weight bytes
    layers: list[LayerCost] = field(default_factory=list)  # per kernel call, in order: what the latency model prices

    def to_json(self) -> dict:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        d["layers"] = [row.to_json() for row in self.layers]
        d["format_version"] = BUILD_FORMAT_VERSION
        return d

    def save(self, directory: Path) -> None:
        d = self.to_json()
        d.pop("directory")
        (directory / BUILD_JSON).write_text(json.dumps(d, indent=2) + "\n")

    @staticmethod
    def load(directory: str | Path) -> Build:
        directory = Path(directory)
        meta = directory / BUILD_JSON
        if not meta.is_file():
            raise UserError(f"{directory} is not an edgeprune build (no {BUILD_JSON}); "
                            "make one with 'edgeprune compile MODEL --target T -o DIR'")
        try:
            d = json.loads(meta.read_text())
            if d.get("format_version") != BUILD_FORMAT_VERSION:
                raise ValueError(f"format version {d.get('format_version')}")
            return Build(
                directory=directory, target=d["target"], format=d["format"], library=d["library"],
                inputs=[TensorSpec.from_json(t) for t in d["inputs"]],
                outputs=[TensorSpec.from_json(t) for t in d["outputs"]],
                source=d["source"], source_sha256=d["source_sha256"], kernels=d.get("kernels", {}),
                unscheduled=d.get("unscheduled", []), tuned=d.get("tuned", False),
                tool_version=d.get("tool_version", ""), compile_seconds=d.get("compile_seconds", 0.0),
                memory=d.get("memory", {}), layers=[LayerCost.from_json(r) for r in d.get("layers", [])])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta} is damaged or from another edgeprune version ({e}); recompile the model") \
                from None


CONTENDED = 0.25  # others' share of the CPUs above which a local measurement is flagged


@dataclass
class Measurement:
    """Latencies of one build on one device."""

    device: str
    target: str
    runs_ms: list[float]
    threads: int
    real_time: bool = True  # False under emulation: the numbers are not the device's latency
    layers: list[dict] = field(default_factory=list)  # {"name", "ms", "share", "gflops", "calls", "sources"}
    others_busy: float | None = None  # this host: the CPUs' share other processes used while timing (None: unknown)

    @property
    def contended(self) -> bool:
        """Whether other processes used enough of this host's CPUs while timing that the times are not the build's
        alone (a 2-thread run sharing 2 cores with other work measured 170-250 ms here, for a subnet priced at
        0.27 ms)."""
        return self.others_busy is not None and self.others_busy > CONTENDED

    def contention_note(self) -> str | None:
        """One line for the user when the measurement was contended, else None."""
        if not self.contended:
            return None
        return (f"warning: other processes kept {self.others_busy:.0%} of this machine's CPUs busy while timing; "
                f"these times are not the build's alone (measure again on a quiet machine)")

    def percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.runs_ms, q))

    @property
    def median_ms(self) -> float:
        return self.percentile(50)

    def statistic(self, name: str) -> float:
        """What a latency budget is judged on: "median", or "p90" (anything else)."""
        return self.median_ms if name == "median" else self.percentile(90)

    def summary(self) -> dict:
        return {
            "device": self.device, "target": self.target, "threads": self.threads, "runs": len(self.runs_ms),
            "median_ms": round(self.median_ms, 4), "p10_ms": round(self.percentile(10), 4),
            "p90_ms": round(self.percentile(90), 4), "real_time": self.real_time,
            "others_busy": None if self.others_busy is None else round(self.others_busy, 3),
            "layers": self.layers,
        }


@dataclass
class TableEntry:
    """One measured network in a latency table: its kernels' rows, its median, and where the device profiles, each
    kernel's share of that median (None: only the whole network's time is known)."""

    name: str
    layers: list[LayerCost]
    ms: float
    per_kernel_ms: list[float] | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "layers": [r.to_json() for r in self.layers], "ms": self.ms,
                "per_kernel_ms": self.per_kernel_ms}

    @staticmethod
    def from_json(d: dict) -> TableEntry:
        return TableEntry(d["name"], [LayerCost.from_json(r) for r in d["layers"]], float(d["ms"]),
                          d.get("per_kernel_ms"))


@dataclass
class LatencyTable:
    """A device's measured networks, with who measured them (the device identity) and how."""

    device: dict | None = None
    tool_version: str = ""
    date: str = ""
    threads: int | None = None
    entries: list[TableEntry] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"version": TABLE_VERSION, "device": self.device, "tool_version": self.tool_version,
                "date": self.date, "threads": self.threads, "entries": [e.to_json() for e in self.entries]}

    @staticmethod
    def from_json(d: dict) -> LatencyTable:
        return LatencyTable(d.get("device"), d.get("tool_version", ""), d.get("date", ""), d.get("threads"),
                            [TableEntry.from_json(e) for e in d["entries"]])
