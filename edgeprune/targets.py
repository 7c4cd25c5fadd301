"""Device targets: one TOML file per device. Shipped ones (the repository's ``targets/``, carried inside a wheel; see
resources.py), your own in ``$EDGEPRUNE_HOME/targets`` (else the platform's config dir), found by name, or any board
file given by its path.

A Target says what code to generate (LLVM triple, cpu, features), how to link and run it off this machine
(cross compiler, emulator) and what the latency prior needs (clock, cores, SIMD width, memory bandwidth, and the
throughput per cycle of fp32, int8 and binary arithmetic).
``host`` is special: fields set to "detect" are read off this machine when the file is loaded.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import re
import typing
from dataclasses import MISSING, dataclass, field
from functools import cache
from pathlib import Path

import tomllib

from .errors import UserError
from .resources import shipped, user_config_dir


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
    # The latency prior fitted to published figures for boards of this core (bench/prior.py --fit). Efficiencies
    # are fractions of one core's peak that our kernels reach per operator class; 0 leaves the generic prior.
    prior_eff_pointwise: float = 0.0
    prior_eff_conv: float = 0.0
    prior_eff_depthwise: float = 0.0
    prior_eff_matmul: float = 0.0
    prior_int8_efficiency: float = 1.0  # int8 layers reach this fraction of what their class reaches in fp32
    prior_thread_scaling: float = 1.0  # t threads run t ** this times faster than one
    prior_overhead_us: float = 5.0  # per kernel call: dispatch, synchronisation of the threads
    prior_band: tuple[float, ...] = (1.0, 1.0)  # boards of this core run this many times the prior's figure
    prior_sources: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prior_fitted(self) -> bool:
        return self.prior_eff_pointwise > 0

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


# Defaults for fields a board file may leave out (the dataclass's own defaults cover the rest); `name` defaults to
# the file's name and `description` to the name.
_DEFAULTS: dict = {"features": [], "clock_mhz": 1000, "memory_mb": 0, "mem_bandwidth_gbs": 1.0,
                   "fp32_flop_per_cycle": 2}
_POSITIVE = ("simd_bits", "cores", "clock_mhz", "mem_bandwidth_gbs", "fp32_flop_per_cycle", "prior_int8_efficiency",
             "prior_thread_scaling")
_NOT_NEGATIVE = ("memory_mb", "int8_op_per_cycle", "binary_op_per_cycle", "prior_eff_pointwise", "prior_eff_conv",
                 "prior_eff_depthwise", "prior_eff_matmul", "prior_overhead_us")
_FORMATS = ("so", "c")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_START = "cortex-a7"  # the board `--template` suggests starting from
# Boards given by path in this process, by name: a build records its target's name, and looking that name up again
# (to run or measure the build) must find the same file.
_BY_PATH: dict[str, Path] = {}


@dataclass(frozen=True)
class TargetFile:
    """Where a target named on the command line comes from."""

    name: str
    path: Path
    origin: str  # "shipped" (with edgeprune), "yours" (your targets folder) or "path" (given by its path)
    replaces_shipped: bool = False


def user_targets_dir() -> Path:
    """Your own boards, found by name beside the shipped ones: $EDGEPRUNE_HOME/targets, else the config dir's."""
    return user_config_dir() / "targets"


def target_files() -> dict[str, TargetFile]:
    """Every target findable by name, sorted; a file in your folder wins over the shipped one of the same name."""
    found = {p.stem: TargetFile(p.stem, p, "shipped") for p in _toml_files(shipped("targets"))}
    for p in _toml_files(user_targets_dir()):
        found[p.stem] = TargetFile(p.stem, p, "yours", replaces_shipped=p.stem in found)
    return dict(sorted(found.items()))


def _toml_files(folder: Path) -> tuple[Path, ...]:
    try:
        changed = folder.stat().st_mtime_ns  # a file added, removed or renamed changes its folder's mtime
    except OSError:
        return ()
    return _listing(folder, changed)


@cache
def _listing(folder: Path, _mtime_ns: int) -> tuple[Path, ...]:
    """A folder's board files, listed again only when the folder changes (targets are looked up in loops)."""
    return tuple(sorted(folder.glob("*.toml")))


def known_targets() -> list[str]:
    return list(target_files())


def is_target_path(spec: str) -> bool:
    """A target is given by path when it looks like one: it ends in .toml or has a folder in it."""
    return spec.endswith(".toml") or "/" in spec or os.sep in spec


def find_target(spec: str) -> TargetFile:
    """The file of the target `spec`: a board TOML's path, or a name (a board given by path earlier in this process,
    your folder, the shipped targets)."""
    if is_target_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"board file {spec} does not exist; write one with: edgeprune targets --template "
                            f"{_START} > {path.name if path.suffix == '.toml' else 'myboard.toml'}")
        return TargetFile(_load(path.resolve()).name, path.resolve(), "path")
    if spec in _BY_PATH:
        return TargetFile(spec, _BY_PATH[spec], "path")
    files = target_files()
    if spec not in files:
        raise UserError(f"unknown target '{spec}'; known targets: {', '.join(files)}; for a board of your own give "
                        f"the path of its TOML, or put it in {user_targets_dir()} (edgeprune targets --template "
                        f"{_START} > {spec}.toml starts one)")
    return files[spec]


def get_target(spec: str) -> Target:
    """The target named `spec` (see `find_target`), or the board TOML at the path `spec`."""
    found = find_target(spec)
    target = _load(found.path)
    if found.origin == "path":
        _claim(target.name, found.path)
    return target


def _claim(name: str, path: Path) -> None:
    """Remember a board given by path under its name, unless another file already answers to that name."""
    other = _BY_PATH.get(name)
    if other is None:
        listed = target_files().get(name)
        other = listed.path.resolve() if listed else None
    if other is not None and other != path:
        raise UserError(f"board file {path} is named '{name}', as {other} is; give it a name of its own "
                        f"(name = \"...\" in the file, or rename the file)")
    _BY_PATH[name] = path


def _load(path: Path) -> Target:
    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"cannot read target file {path} ({e.strerror}); check the path") from None
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@cache
def _parse(path: Path, _mtime_ns: int, _size: int) -> Target:
    """The Target of a board file, cached until the file changes; every mistake is one line naming file and field."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read target file {path} ({e}); check the file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"target file {path} is not valid TOML ({e}); fix or remove it") from None
    kinds = _field_kinds()
    unknown = sorted(set(raw) - set(kinds))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, kinds, n=1)
        hint = f"did you mean {near[0]}?" if near else f"the fields are {', '.join(kinds)}"
        raise UserError(f"target file {path}: unknown field '{key}' ({hint}); fix or remove it")
    detect = [k for k, v in raw.items() if v == "detect"]
    if detect:
        detected = _detect_host()
        cannot = [k for k in detect if k not in detected]
        if cannot:
            raise UserError(f"target file {path}: field {cannot[0]} cannot be \"detect\" (only "
                            f"{', '.join(detected)} can); give its value")
        raw = {**raw, **{k: detected[k] for k in detect}}
    raw.setdefault("name", path.stem)
    missing = [k for k in _required() if k not in raw]
    if missing:
        raise UserError(f"target file {path} lacks field{'s' * (len(missing) > 1)} {', '.join(missing)}; add "
                        f"{'them' if len(missing) > 1 else 'it'} (edgeprune targets --template {_START} shows each)")
    for key, value in raw.items():
        _check(path, key, value, kinds[key])
    if not _NAME.fullmatch(raw["name"]) or raw["name"].endswith(".toml"):
        raise UserError(f"target file {path}: name '{raw['name']}' must be letters, digits, '.', '_', '+' or '-'; "
                        "fix it")
    if raw["name"] != path.stem:  # a build records the name, and later runs find the board again by it
        raise UserError(f"target file {path}: name '{raw['name']}' differs from the file's name; rename the file to "
                        f"{raw['name']}.toml or remove the name field")
    defaults = {k: v for k, v in _DEFAULTS.items() if k in kinds}
    args = {**defaults, "description": raw["name"], **raw}
    for k, kind in kinds.items():
        if typing.get_origin(kind) is tuple and k in args:
            args[k] = tuple(args[k])
        elif kind is float and k in args:
            args[k] = float(args[k])
    return Target(**args)


def _field_kinds() -> dict[str, object]:
    """Every field a board file may set, with its type (the Target dataclass's)."""
    hints = typing.get_type_hints(Target)
    return {k: hints[k] for k in Target.__dataclass_fields__ if k != "extra"}


def _required() -> list[str]:
    """The fields a board file must set: the Target's fields without a default here or in the dataclass."""
    return [k for k, f in Target.__dataclass_fields__.items()
            if f.default is MISSING and f.default_factory is MISSING
            and k not in _DEFAULTS and k not in ("name", "description", "extra")]


def _check(path: Path, key: str, value, kind) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        ok, want = isinstance(value, str), "a string"
    elif kind is int:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif kind is float:
        ok, want = number, "a number"
    elif typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is float:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and v > 0 for v in value)
        want = "a list of numbers above zero"
    elif typing.get_origin(kind) is tuple:
        ok, want = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of strings"
    else:
        ok, want = True, ""
    if ok and key in _POSITIVE and value <= 0 or ok and key in _NOT_NEGATIVE and value < 0:
        ok, want = False, "more than zero" if key in _POSITIVE else "zero or more"
    if ok and key == "simd_bits" and value % 32:
        ok, want = False, "a multiple of 32 (the vector register's bits: 128 for NEON, 32 without SIMD)"
    if ok and key == "default_format" and value not in _FORMATS:
        ok, want = False, f"one of {', '.join(_FORMATS)}"
    if not ok:
        raise UserError(f"target file {path}: field {key} must be {want}, got {value!r}; fix it")


def template(spec: str = _START) -> str:
    """A commented board TOML to start your own from: target `spec`'s file, with its name left to the new file's
    and the optional fields it does not set listed with their defaults."""
    found = find_target(spec)
    text = found.path.read_text()
    raw = tomllib.loads(text)
    body = re.sub(r"(?m)^name\s*=.*$", lambda m: f"# {m.group(0)}   # default: this file's name, without .toml",
                  text)
    required = ", ".join(_required())
    head = [
        f"# A board of your own, starting from edgeprune's {found.name} ({found.origin}: {found.path}).",
        "# Use it by path:  edgeprune compile MODEL --target path/to/myboard.toml",
        f"# or save it as myboard.toml in {user_targets_dir()} to use it by name (edgeprune targets lists it).",
        "# The target's name is the file's name. Required: " + required + "; the rest have defaults.",
        '# "detect" reads a field off this machine (for a board that is the machine edgeprune runs on).',
        "",
    ]
    optional = [f"# {k} = {_toml_value(v)}" for k, v in _optional_defaults().items() if k not in raw]
    tail = ["", f"# Optional fields {found.name} leaves at their defaults:", *optional] if optional else []
    return "\n".join(head) + body.rstrip("\n") + "\n" + "\n".join(tail) + ("\n" if tail else "")


def _optional_defaults() -> dict:
    out = {}
    for k, f in Target.__dataclass_fields__.items():
        if k == "extra" or k == "name":
            continue
        if k in _DEFAULTS:
            out[k] = _DEFAULTS[k]
        elif f.default is not MISSING:
            out[k] = f.default
        elif f.default_factory is not MISSING:
            out[k] = f.default_factory()
    return out


def _toml_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)
