"""The typed artifacts that pass between the pipeline's stages (see ../shared/docs/architecture.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .codegen.importers import TensorSpec
from .errors import UserError

BUILD_JSON = "build.json"
BUILD_FORMAT_VERSION = 1


@dataclass
class Build:
    """A compiled network in a directory: the library plus what is needed to run and check it."""

    directory: Path
    target: str
    format: str  # "so": shared library with the Relax VM executable
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
    layers: list[dict] = field(default_factory=list)  # per kernel call: kind, flops, bytes (the latency model's)

    def to_json(self) -> dict:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
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
                memory=d.get("memory", {}), layers=d.get("layers", []))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta} is damaged or from another edgeprune version ({e}); recompile the model") \
                from None


@dataclass
class Measurement:
    """Latencies of one build on one device."""

    device: str
    target: str
    runs_ms: list[float]
    threads: int
    real_time: bool = True  # False under emulation: the numbers are not the device's latency
    layers: list[dict] = field(default_factory=list)  # {"name", "ms", "share", "gflops"} per kernel, slowest first

    def percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.runs_ms, q))

    @property
    def median_ms(self) -> float:
        return self.percentile(50)

    def summary(self) -> dict:
        return {
            "device": self.device, "target": self.target, "threads": self.threads, "runs": len(self.runs_ms),
            "median_ms": round(self.median_ms, 4), "p10_ms": round(self.percentile(10), 4),
            "p90_ms": round(self.percentile(90), 4), "real_time": self.real_time,
            "layers": self.layers,
        }
