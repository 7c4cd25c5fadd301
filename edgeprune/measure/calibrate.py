"""`edgeprune calibrate`: time a suite of small builds that spans the search space on a device, and write the
device's latency table (calibrate/<device>.json) that the latency model fits.

The suite is MobileNetV2-style pieces (stem convolutions, pointwise expansions, depthwise 3/5/7, projections with
residual adds, pooling and classifier heads) at widths and resolutions from the search space, and whole subnets
of the search space, drawn with a fixed seed so every device is timed on the same suite. On `local` the suite is
timed in interleaved rounds and each kernel's share comes from the per-layer profile, which lets the model fit
each class of kernel on its own times; elsewhere only whole-build times are kept and fitted.

On rpc://HOST:PORT/KEY the suite is compiled first (here, one build at a time: compiling is CPU bound) and then
measured on every board registered under KEY at once, one worker per board: each measurement asks the tracker for
its own session, so the tracker spreads them over the boards. Entries stay in suite order; a measurement that fails
is tried once more, then the run stops with the build's name; the table is written once, at the end, atomically.
"""

from __future__ import annotations

import datetime
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from .. import __version__
from ..artifacts import Build, Measurement
from ..errors import UserError
from ..targets import Target
from .devices import Device, LocalDevice, QemuDevice, RpcDevice
from .latency import save_table

CALIBRATE_DIR = Path(__file__).resolve().parent.parent.parent / "calibrate"
ROUNDS = 10  # interleaved timing rounds on `local` (measure_suite)
ATTEMPTS = 2  # per build: a board that drops one session (reboot, re-registration) gets a second chance


def suite(count: int, seed: int = 1234) -> list:
    """`count` networks with their inputs, spanning the search space: two in three are small MobileNetV2-style
    pieces (widths 8-320, 32-160 px, k 3/5/7), which cover wide shapes cheaply; every third is a whole subnet drawn
    from the search space (edgeprune.search.space), which brings what only deep subnets have: 2x2 to 7x7 feature
    maps with up to 1280 channels, and dozens of small kernels in a row."""
    import torch
    from torch import nn

    from ..models.reference import InvertedResidual, conv_bn, randomize_bn
    from ..search.space import Space
    from ..search.supernet import Subnet

    rng, space_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    nets = []
    for i in range(count):
        torch.manual_seed(seed + i)
        if i % 3 == 2:
            arch = Space().sample(space_rng)
            model = randomize_bn(Subnet(arch), seed + i)
            nets.append((f"cal{i:03d}", model, torch.randn(1, 3, arch.resolution, arch.resolution)))
            continue
        res = int(rng.choice([32, 48, 64, 96, 112, 128, 160]))
        c = int(rng.choice([8, 16, 24, 32, 48, 64, 96]))
        k = int(rng.choice([3, 5, 7]))
        expand = int(rng.choice([3, 4, 6]))
        blocks = int(rng.integers(1, 4))
        layers: list[nn.Module] = [conv_bn(3, c, 3, 2)]
        cin = c
        for b in range(blocks):
            stride = 2 if b == 0 and rng.random() < 0.5 else 1
            cout = cin if stride == 1 and rng.random() < 0.5 else int(rng.choice([16, 24, 32, 64, 96, 160, 320]))
            block = InvertedResidual(cin, cout, stride, expand)
            if k != 3:  # the elastic kernel: swap the depthwise 3x3 for k x k
                dw = block.conv[-2] if expand != 1 else block.conv[0]
                hidden = dw[0].in_channels
                dw[0] = nn.Conv2d(hidden, hidden, k, dw[0].stride, k // 2, groups=hidden, bias=False)
            layers.append(block)
            cin = cout
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, int(rng.choice([10, 100, 1000])))]
        model = randomize_bn(nn.Sequential(*layers, *head), seed + i)
        nets.append((f"cal{i:03d}", model, torch.randn(1, 3, res, res)))
    return nets


def device_identity(device: Device, target: Target, boards: int | None = None) -> dict:
    """Who measured the table: enough to tell it belongs to another device. `boards`: how many boards under an RPC
    key shared the suite (their times are pooled, so they should be the same kind of board)."""
    ident = {"uri": device.uri, "target": target.name, "cpu": target.cpu}
    if isinstance(device, LocalDevice):
        model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        ident.update({"host": platform.node(), "cpu_model": model, "cores": target.cores})
    elif isinstance(device, RpcDevice):
        ident.update({"tracker": f"{device.host}:{device.port}", "key": device.key, "boards": boards or 1})
    return ident


def default_table_path(device: Device, target: Target) -> Path:
    name = f"{target.name}-{target.cpu}" if isinstance(device, LocalDevice) else getattr(device, "key", target.name)
    return CALIBRATE_DIR / f"{name}.json"


def measure_entry(build: Build, device: Device, runs: int, warmup: int, threads: int | None) -> dict:
    """One table entry: the build's kernels, its median time and (where the device profiles) each kernel's."""
    m = device.measure(build, runs=runs, warmup=warmup, threads=threads, layers=isinstance(device, LocalDevice))
    return entry_of(build, m)


def entry_of(build: Build, m: Measurement) -> dict:
    """A table entry from a build and its measurement; with a per-kernel profile, each kernel's share of the median."""
    entry = {"name": Path(build.directory).name, "layers": build.layers, "ms": m.median_ms}
    if m.layers:
        by_name = {row["name"]: row["ms"] / max(1, row["calls"]) for row in m.layers}
        # A data-movement kernel the profile never saw was elided by the VM (a reshape becomes a view): it costs 0.
        # A missing compute kernel means the profile is incomplete, and then no kernel's share is kept.
        complete = all(layer["kernel"] in by_name or layer["kind"] == "data" for layer in build.layers)
        raw = [by_name.get(layer["kernel"], 0.0) for layer in build.layers]
        scale = m.median_ms / sum(raw) if sum(raw) > 0 else 0.0  # to this measurement's speed (see local.py)
        entry["per_kernel_ms"] = [r * scale for r in raw] if complete and scale > 0 else None
    return entry


def measure_suite(builds: list[Build], device: Device, runs: int = 30, warmup: int = 5, threads: int | None = None,
                  progress: Callable[[str], None] = print, workers: int | None = None) -> list[dict]:
    """Table entries for `builds` on `device`, in order. On `local` they are timed in interleaved rounds (see
    local.measure_interleaved: a drift of the machine's speed must not bias one entry against another); on an
    rpc:// key spread over its boards; elsewhere one after the other."""
    if isinstance(device, LocalDevice) and all(b.format != "c" for b in builds):
        from .local import measure_interleaved

        progress(f"timing {len(builds)} builds in {ROUNDS} interleaved rounds ...")
        measured = measure_interleaved(builds, runs, warmup, threads, ROUNDS, progress=progress)
        return [entry_of(b, m) for b, m in zip(builds, measured)]
    if isinstance(device, RpcDevice):
        workers = workers or min(device.boards(), len(builds))
        return _measure_on_boards(builds, device, workers, runs, warmup, threads, progress)
    entries = []
    for i, build in enumerate(builds):
        entries.append(_measured(build, device, runs, warmup, threads))
        progress(f"[{i + 1}/{len(builds)}] {entries[-1]['name']}: {entries[-1]['ms']:.3f} ms")
    return entries


def calibrate(target: Target, device: Device, out: Path | None = None, count: int = 36, runs: int = 30,
              warmup: int = 5, threads: int | None = None, progress: Callable[[str], None] = print) -> Path:
    """Time `suite(count)` on `device` and write its latency table to `out` (default: calibrate/<device>.json)."""
    if isinstance(device, QemuDevice):
        raise UserError("qemu times are not latency; calibrate on local or an rpc:// board")
    if isinstance(device, LocalDevice) and not target.is_host:
        raise UserError(f"calibrating {target.name} needs that device: use --device rpc://HOST:PORT/KEY")
    # Ask the tracker first: a wrong address or key should fail now, not after minutes of compiling.
    workers = min(device.boards(), count) if isinstance(device, RpcDevice) else 1
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builds = []  # all compiled before any is timed: compiling beside a measurement would skew it
        for i, build in enumerate(compile_suite(target, count, Path(tmp))):
            builds.append(build)
            progress(f"[{i + 1}/{count}] {Path(build.directory).name}: compiled")
        entries = measure_suite(builds, device, runs, warmup, threads, progress, workers)
    out = out or default_table_path(device, target)
    save_table(out, {
        "device": device_identity(device, target, boards=workers),
        "tool_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": threads,
        "entries": entries,
    })
    return out


def compile_suite(target: Target, count: int, tmp: Path) -> Iterator[Build]:
    """The suite's builds (--format so, in `tmp`), one at a time, in suite order."""
    from ..codegen.build import compile_model
    from ..models.zoo import export_onnx

    for name, model, x in suite(count):
        path = export_onnx(model, x, tmp / f"{name}.onnx")
        yield compile_model(path, target, tmp / name, fmt="so")


def _measured(build: Build, device: Device, runs: int, warmup: int, threads: int | None) -> dict:
    """measure_entry, tried ATTEMPTS times; then one error that names the build and what went wrong."""
    errors: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            return measure_entry(build, device, runs, warmup, threads)
        except UserError as e:
            errors.append(str(e))
    # The first error is usually the cause; a retry that failed differently (e.g. the board is gone now) is added.
    detail = errors[0] if len(set(errors)) == 1 else f"{errors[0]}; then: {errors[-1]}"
    raise UserError(f"calibration stopped: measuring {Path(build.directory).name} on {device.uri} failed "
                    f"{ATTEMPTS} times: {detail}")


def _measure_on_boards(builds: list[Build], device: RpcDevice, workers: int, runs: int, warmup: int,
                       threads: int | None, progress: Callable[[str], None]) -> list[dict]:
    """Every build measured, `workers` at a time; entries in suite order whatever order they finish in."""
    entries: list[dict] = [{}] * len(builds)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calibrate")
    try:
        futures = {pool.submit(_measured, b, device, runs, warmup, threads): i for i, b in enumerate(builds)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            entries[i] = future.result()  # the first build that fails for good ends the run, before any writing
            progress(f"[{done}/{len(builds)}] {entries[i]['name']}: {entries[i]['ms']:.3f} ms")
    finally:
        # Builds not started are dropped; running ones end within the device's own bound (wait + timeout + grace).
        pool.shutdown(wait=True, cancel_futures=True)
    return entries
