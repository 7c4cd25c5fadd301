"""The Python API: what the command line does, as typed functions (re-exported by `edgeprune`).

    import edgeprune

    build = edgeprune.compile("model.onnx", target="host", out="build/")   # or a torch.nn.Module with input_shape
    y, = edgeprune.run(build, x)
    m = edgeprune.measure(build, device="local", runs=100)
    ok = edgeprune.check(build, budget_ms=5.0).met
    report = edgeprune.build(target="cortex-a7", budget_ms=50, out="out/demo")

Errors in what is passed are `edgeprune.UserError`, with a one-line message that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import Build, Measurement, MemoryBudget, Network, parse_bytes
from .errors import UserError
from .targets import Target

__all__ = ["CheckResult", "build", "check", "compile", "load", "measure", "run", "targets"]

BUILTIN_PREFIX = "builtin:"


def targets() -> list[Target]:
    """The device targets edgeprune knows by name: the shipped ones and yours ($EDGEPRUNE_HOME/targets, else the
    platform's config dir; yours win on a shared name), `host` read off this machine. Wherever a target is taken,
    the path of a board TOML works too."""
    from .targets import get_target, known_targets

    return [get_target(n) for n in known_targets()]


def compile(model: str | Path | Network | Any, target: str | Target = "host", out: str | Path = "build", *,
            input_shape: tuple[int, ...] | None = None, format: str | None = None, name: str | None = None,
            tune_trials: int = 0, sparse: str = "auto", ram: int | str | None = None,
            flash: int | str | None = None, fuse_depthwise: bool = True) -> Build:
    """Compile a model for `target` into the directory `out` (written atomically) and return the Build.

    model: an ONNX, torch.export (.pt2) or .tflite file; "builtin:NAME", one of the reference networks; a Network;
    or a torch.nn.Module, with input_shape (for example (1, 3, 224, 224)).
    format: "so" (a shared library for Linux boards) or "c" (a C package for firmware); the target's default
    when None. tune_trials: refine the kernels with that many MetaSchedule trials (host only).
    sparse: layers with 1xN zero blocks in their weights: "auto" (sparse where the latency model prices it
    faster), "sparse" or "dense". ram, flash: budgets of a C package, bytes or "512KiB"-style sizes: RAM is the
    arena (the workspace is placed in it), flash is code plus weights; a package over either is refused
    (MemoryBudgetError). fuse_depthwise: run each depthwise convolution and the pointwise one that consumes it as
    one kernel where the map has 100 pixels or more (the default); False keeps them apart."""
    from .codegen import compile_model
    from .targets import get_target

    target = get_target(target) if isinstance(target, str) else target  # a bad target fails before slow work
    if isinstance(model, str) and model.startswith(BUILTIN_PREFIX):
        model = _builtin(model[len(BUILTIN_PREFIX):])
    elif not isinstance(model, (str, Path, Network)):
        if input_shape is None:
            raise UserError("compiling a torch module needs input_shape, for example (1, 3, 224, 224)")
        model = Network(model, tuple(input_shape), name=name or type(model).__name__.lower())
        input_shape = None
    if isinstance(model, Network) and input_shape is not None:
        raise UserError("input_shape does not apply to a Network: it carries its own")
    return compile_model(model, target, out, input_shape=input_shape, fmt=format, tune_trials=tune_trials,
                         package_name=name, sparse=sparse, budget=memory_budget(ram, flash),
                         fuse_depthwise=fuse_depthwise)


def memory_budget(ram: int | str | None, flash: int | str | None) -> MemoryBudget | None:
    """--ram/--flash as a MemoryBudget (None when neither is given)."""
    def size(v, flag: str) -> int | None:
        return None if v is None else v if isinstance(v, int) else parse_bytes(v, f"--{flag}")

    budget = MemoryBudget(size(ram, "ram"), size(flash, "flash"))
    return budget if budget else None


def _builtin(name: str) -> Network:
    """One of the reference networks, so a demo needs no download and no user file."""
    from .models.reference import NETWORKS
    from .models.reference import build as reference

    if name not in NETWORKS:
        raise UserError(f"unknown built-in network '{name}'; known: {', '.join(NETWORKS)}")
    module, x = reference(name)
    return Network(module, tuple(x.shape), name=name.replace("-", "_"))


def load(directory: str | Path) -> Build:
    """A build directory written by `compile`."""
    return Build.load(directory)


def _build(build: Build | str | Path) -> Build:
    return build if isinstance(build, Build) else Build.load(build)


def run(build: Build | str | Path, inputs: Any, device: str = "local", threads: int | None = None) -> list:
    """The build's outputs (numpy arrays) for `inputs` (one array or a list, in the build's input order), run on
    `device`: local, qemu://TARGET (a C package under emulation), rpc://HOST:PORT/KEY or serial://PATH."""
    import numpy as np

    from .measure import package
    from .measure.devices import LocalDevice, QemuDevice, get_device
    from .measure.local import set_threads
    from .targets import get_target

    build = _build(build)
    dev = get_device(device)
    if isinstance(dev, QemuDevice) or (build.format == "c" and isinstance(dev, LocalDevice)):
        package.command_for(build, device)  # a wrong device fails before anything runs
    elif isinstance(dev, LocalDevice) and not get_target(build.target).is_host:
        raise UserError(f"{build.directory} is built for {build.target}, not this machine; run it on that device, "
                        "or compile with --target host")
    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    set_threads(threads)
    return dev.run(build, arrays)


def measure(build: Build | str | Path, device: str = "local", runs: int = 100, warmup: int = 10,
            threads: int | None = None, layers: bool = True) -> Measurement:
    """Latency of the build on `device` over `runs` timed runs, with a per-kernel profile where the device gives one
    (named by the user's layers where the build knows them)."""
    from .measure.devices import get_device

    return get_device(device).measure(_build(build), runs=runs, warmup=warmup, threads=threads, layers=layers)


@dataclass
class CheckResult:
    met: bool
    statistic: str  # "p90" or "median"
    value_ms: float
    budget_ms: float
    measurement: Measurement


def check(build: Build | str | Path, budget_ms: float, device: str = "local", runs: int = 100, warmup: int = 10,
          threads: int | None = None, statistic: str = "p90") -> CheckResult:
    """Whether the build meets `budget_ms` on `device` (its p90, or its median): the CI gate."""
    if statistic not in ("p90", "median"):
        raise UserError(f"statistic '{statistic}' is not one of p90, median")
    m = measure(build, device, runs, warmup, threads, layers=False)
    if not m.real_time:
        raise UserError(f"{device} runs under emulation and its times are not latency; check on local or an "
                        "rpc:// board")
    value = m.statistic(statistic)
    return CheckResult(value <= budget_ms, statistic, value, budget_ms, m)


def build(target: str, budget_ms: float, out: str | Path, *, device: str | None = None, data: str | None = None,
          supernet: str | Path | None = None, table: str | Path | None = None, rounds: int = 3,
          format: str | None = None, runs: int = 50, statistic: str = "p90", seed: int = 0,
          finetune_steps: int | None = None, optimistic: bool = False, quiet: bool = True,
          sparsity: float | str | None = None, block: int = 4, prune_steps: int | None = None,
          quantize: str | None = None, calibration: str = "fdda", max_drop: float = 1.0, per_class: int = 4,
          ram: int | str | None = None, flash: int | str | None = None, binarize: str | None = None,
          binary_fraction: float = 0.1, binarize_steps: int | None = None,
          distill_steps: int | None = None) -> dict:
    """Search (and fine-tune the chosen subnet for `finetune_steps`, default 200), compress, compile and (with a
    device) measure a network that meets `budget_ms` on `target`; writes `out` atomically and returns the report
    (report.json). With no device the prior's prediction is judged at the slow edge of its band (boards of one core
    differ), or at its centre with `optimistic`. `sparsity` prunes the subnet in 1xN blocks of `block` channels
    (a fraction of blocks, or "auto": the most accurate of several, each searched with sparse pricing), fine-tuning
    for `prune_steps` (default 200). `quantize` ("int8", "w4a8" or "auto": int8 where it costs at most `max_drop`
    points of validation accuracy) searches with int8 pricing, quantizes the subnet after fine-tuning, calibrated on
    `calibration` ("fdda": synthetic images from `per_class` real ones per class; "real"; "noise"), distills it
    from the fp32 subnet on those images for `distill_steps` (default 200 at w4a8, none at int8), and compiles
    its integer program. `binarize` ("recu", "siman" or "auto": fp32 and both tried, the most accurate kept) makes
    `binary_fraction` of the subnet's 1x1 layers binary, those the device's costs say save most, searched with that
    pricing and trained `binarize_steps` (default 200) from the fine-tuned weights. `ram` and `flash` (bytes or
    "256KiB"-style) are budgets of the C package too: the search looks only at subnets that fit all three.
    Raises BudgetError when nothing fits."""
    from .compress import BINARIZE_STEPS, PRUNE_STEPS
    from .pipeline import FINETUNE_STEPS, SUPERNET, Request
    from .pipeline import run as run_pipeline

    req = Request(target=target, budget_ms=budget_ms, out=Path(out), device=device, data=data,
                  supernet=Path(supernet) if supernet else SUPERNET, table=Path(table) if table else None,
                  rounds=rounds, fmt=format, runs=runs, statistic=statistic, seed=seed, quiet=quiet,
                  finetune_steps=FINETUNE_STEPS if finetune_steps is None else finetune_steps, optimistic=optimistic,
                  sparsity=sparsity, block=block, prune_steps=PRUNE_STEPS if prune_steps is None else prune_steps,
                  quantize=quantize, calibration=calibration, max_drop=max_drop, per_class=per_class,
                  memory=memory_budget(ram, flash), binarize=binarize, binary_fraction=binary_fraction,
                  binarize_steps=BINARIZE_STEPS if binarize_steps is None else binarize_steps,
                  distill_steps=distill_steps)
    return run_pipeline(req)
