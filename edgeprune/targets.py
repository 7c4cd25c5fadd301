"""Device targets: one TOML file per device under the repository's ``targets/`` folder.

A Target says what code to generate (LLVM triple, cpu, features), how to link and run it off this machine
(cross compiler, emulator) and what the latency prior needs (clock, cores, SIMD width, memory bandwidth, and the
throughput per cycle of fp32, int8 and binary arithmetic).
``host`` is special: fields set to "detect" are read off this machine when the file is loaded.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import tomllib

from .errors import UserError

TARGETS_DIR = Path(os.environ.get("EDGEPRUNE_TARGETS", Path(__file__).resolve().parent.parent / "targets"))


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    triple: str
    cpu: str
    features: tuple[str, ...]
    simd_bits: int
    cores: int
    clock_mhz: int
    memory_mb: int
    mem_bandwidth_gbs: float
    fp32_flop_per_cycle: int
    cross_compiler: str
    # Per core, for the latency prior of quantized and binary layers (operations: a MAC counts two).
    int8_op_per_cycle: float = 0.0  # 0: twice the fp32 rate (widening multiply-accumulate, no dot product)
    binary_op_per_cycle: float = 0.0  # xnor/and + popcount over bits; 0: 16x the fp32 rate
    cflags: tuple[str, ...] = ()
    emulator: str = ""
    float_abi: str = ""
    default_format: str = "so"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_arm(self) -> bool:
        return self.triple.startswith(("arm", "aarch64"))

    @property
    def is_host(self) -> bool:
        return self.name == "host"

    @property
    def simd_lanes(self) -> int:
        """fp32 lanes of one vector register: 16 with AVX-512, 8 with AVX2, 4 with NEON."""
        return self.simd_bits // 32

    def __post_init__(self) -> None:
        if not self.int8_op_per_cycle:
            object.__setattr__(self, "int8_op_per_cycle", 2.0 * self.fp32_flop_per_cycle)
        if not self.binary_op_per_cycle:
            object.__setattr__(self, "binary_op_per_cycle", 16.0 * self.fp32_flop_per_cycle)

    def tvm_target(self):
        """The TVM 0.27 target (a JSON-dict target) for the kernels."""
        import tvm

        spec: dict = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.cpu}
        if self.features:
            spec["mattr"] = list(self.features)
        if self.float_abi:
            spec["mfloat-abi"] = self.float_abi
        spec["num-cores"] = self.cores
        if self.simd_bits < 128:
            spec["vector-width"] = self.simd_bits  # no SIMD unit: say so, rather than let LLVM assume 128 bits
        return tvm.target.Target(spec)


def _cpuinfo_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _detect_host() -> dict:
    """What the host target's "detect" fields become on this machine."""
    import tvm

    flags = _cpuinfo_flags()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    triple = f"{platform.machine()}-linux-gnu"  # LLVM's own default names the toolchain it was built with
    # Wide vectors only when the CPU has them; LLVM already enables the features its cpu name implies.
    simd_bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    features = tuple(f"+{f}" for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl") if f in flags)
    clock = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                clock = int(float(line.split(":")[1]))
                break
    except OSError:
        pass
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    fma_units = 2  # both AVX2 and AVX-512 server cores issue two FMAs per cycle
    fp32 = 2 * fma_units * simd_bits // 32
    # int8: VNNI's dot product does 4 MACs per 32-bit lane where fp32 does 1 (vpmaddubsw + vpmaddwd without it: 2).
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    # binary: one popcount per 64 bits per cycle in scalar code; VPOPCNTDQ counts a whole vector (Zen 4, Ice Lake).
    popcnt_bits = simd_bits if "avx512_vpopcntdq" in flags else 64
    return {
        "triple": triple,
        "cpu": cpu,
        "features": features,
        "simd_bits": simd_bits,
        "cores": len(os.sched_getaffinity(0)),
        "clock_mhz": clock or 2000,
        "memory_mb": mem_mb,
        "fp32_flop_per_cycle": fp32,
        "int8_op_per_cycle": fp32 * (4 if vnni else 2),
        "binary_op_per_cycle": 2 * popcnt_bits * (2 if popcnt_bits > 64 else 1),  # xnor + popcount per bit
    }


def _load(path: Path) -> Target:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"target file {path} is not valid TOML ({e}); fix or remove it") from None
    if any(v == "detect" for v in raw.values()):
        detected = _detect_host()
        raw = {k: (detected[k] if v == "detect" else v) for k, v in raw.items()}
    known = set(Target.__dataclass_fields__) - {"extra"}
    missing = {"name", "triple", "cpu", "simd_bits", "cores", "cross_compiler"} - set(raw)
    if missing:
        raise UserError(f"target file {path} lacks {', '.join(sorted(missing))}; add them")
    args = {k: v for k, v in raw.items() if k in known}
    for k in ("features", "cflags"):
        args[k] = tuple(args.get(k, ()))
    args.setdefault("description", raw["name"])
    for k, default in (("clock_mhz", 1000), ("memory_mb", 0), ("mem_bandwidth_gbs", 1.0), ("fp32_flop_per_cycle", 2)):
        args.setdefault(k, default)
    return Target(**args, extra={k: v for k, v in raw.items() if k not in known})


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


@cache
def get_target(name: str) -> Target:
    path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown target '{name}'; known targets: {', '.join(known_targets())}")
    return _load(path)
