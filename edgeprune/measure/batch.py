"""Measure many builds on one device, fairly: the measurement half of calibration and of every benchmark.

On `local` the builds are timed in interleaved rounds (local.measure_interleaved): this machine's speed drifts by up
to 1.45x from one minute to the next, and builds timed one after the other would carry that drift into their
ratios. With per-kernel profiles, so the latency model can fit each class of kernel on its own times.

On rpc://HOST:PORT/KEY the builds are measured on every board registered under KEY at once, one worker per board:
each measurement asks the tracker for its own session, so the tracker spreads them over the boards. Results stay in
input order; a measurement that fails is tried once more, then the run stops with the build's name.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from ..artifacts import Build, Measurement
from ..errors import UserError
from .devices import Device, LocalDevice, RpcDevice

ROUNDS = 10  # interleaved timing rounds on `local`
ATTEMPTS = 2  # per build: a board that drops one session (reboot, re-registration) gets a second chance


def measure_builds(builds: list[Build], device: Device, runs: int = 30, warmup: int = 5, threads: int | None = None,
                   progress: Callable[[str], None] = print, workers: int | None = None) -> list[Measurement]:
    """Each build's Measurement on `device`, in order: interleaved on `local` (with per-kernel profiles), spread
    over the boards of an rpc:// key, elsewhere one after the other."""
    if isinstance(device, LocalDevice) and all(b.format != "c" for b in builds):
        from .local import measure_interleaved

        progress(f"timing {len(builds)} builds in {ROUNDS} interleaved rounds ...")
        return measure_interleaved(builds, runs, warmup, threads, ROUNDS, progress=progress)
    if isinstance(device, RpcDevice):
        workers = workers or min(device.boards(), len(builds))
        return _on_boards(builds, device, workers, runs, warmup, threads, progress)
    out = []
    for i, build in enumerate(builds):
        out.append(_measured(build, device, runs, warmup, threads))
        progress(f"[{i + 1}/{len(builds)}] {Path(build.directory).name}: {out[-1].median_ms:.3f} ms")
    return out


def _measured(build: Build, device: Device, runs: int, warmup: int, threads: int | None) -> Measurement:
    """One measurement, tried ATTEMPTS times; then one error that names the build and what went wrong."""
    errors: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            return device.measure(build, runs=runs, warmup=warmup, threads=threads,
                                  layers=isinstance(device, LocalDevice))
        except UserError as e:
            errors.append(str(e))
    # The first error is usually the cause; a retry that failed differently (e.g. the board is gone now) is added.
    detail = errors[0] if len(set(errors)) == 1 else f"{errors[0]}; then: {errors[-1]}"
    raise UserError(f"calibration stopped: measuring {Path(build.directory).name} on {device.uri} failed "
                    f"{ATTEMPTS} times: {detail}")


def _on_boards(builds: list[Build], device: RpcDevice, workers: int, runs: int, warmup: int,
               threads: int | None, progress: Callable[[str], None]) -> list[Measurement]:
    """Every build measured, `workers` at a time; results in input order whatever order they finish in."""
    out: list[Measurement | None] = [None] * len(builds)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calibrate")
    try:
        futures = {pool.submit(_measured, b, device, runs, warmup, threads): i for i, b in enumerate(builds)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            out[i] = future.result()  # the first build that fails for good ends the run, before any writing
            progress(f"[{done}/{len(builds)}] {Path(builds[i].directory).name}: {out[i].median_ms:.3f} ms")
    finally:
        # Builds not started are dropped; running ones end within the device's own bound (wait + timeout + grace).
        pool.shutdown(wait=True, cancel_futures=True)
    return out  # type: ignore[return-value]
