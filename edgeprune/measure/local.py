"""The `local` device: run and time a build on this machine, in this process."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..artifacts import Build, Measurement
from ..errors import UserError
from ..targets import get_target
from .package import check_inputs


def set_threads(threads: int | None) -> int:
    """TVM's pool reads TVM_NUM_THREADS once, when it starts: call this before the first run."""
    n = threads or len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


_LOADED: dict[str, tuple[int, int]] = {}  # path -> (inode, mtime) of what this process dlopen()ed there


def _loadable(lib: Path) -> str:
    """A path to dlopen `lib` from. dlopen returns the library already loaded under the same name, so a build
    rewritten in place (a second compile to the same directory) would run the old code: load a copy instead."""
    import shutil
    import tempfile

    st = lib.stat()
    key, ident = str(lib.resolve()), (st.st_ino, st.st_mtime_ns)
    if _LOADED.setdefault(key, ident) == ident:
        return str(lib)
    fd, copy = tempfile.mkstemp(prefix=f"{lib.stem}-", suffix=lib.suffix)
    os.close(fd)
    shutil.copyfile(lib, copy)
    return copy


class Session:
    """A build loaded into a Relax VM on the CPU."""

    def __init__(self, build: Build):
        if not get_target(build.target).is_host:
            raise UserError(f"{build.directory} is built for {build.target}, not this machine; run it on that device "
                            "or compile with --target host")
        import tvm
        from tvm import relax

        lib = Path(build.directory) / build.library
        if not lib.is_file():
            raise UserError(f"{lib} is missing; recompile the model")
        path = _loadable(lib)
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{lib} could not be loaded ({str(e).splitlines()[0][:160]}); recompile the model") \
                from None
        finally:
            if path != str(lib):
                os.unlink(path)  # loaded: the copy is not needed on disk
        self.build = build
        self.dev = tvm.cpu()

    def prepare(self, inputs: list[np.ndarray]) -> list:
        import tvm

        check_inputs(self.build, inputs)
        return [tvm.runtime.tensor(np.ascontiguousarray(arr), self.dev) for arr in inputs]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        res = self.vm["main"](*self.prepare(inputs))
        items = list(res) if not hasattr(res, "numpy") else [res]
        return [r.numpy() for r in items]

    def time_runs(self, inputs: list[np.ndarray], runs: int, warmup: int) -> list[float]:
        args = self.prepare(inputs)
        self.vm.set_input("main", *args)
        fn = self.vm.module["invoke_stateful"]
        for _ in range(warmup):
            fn("main")
        times = []
        for _ in range(runs):
            t = time.perf_counter_ns()
            fn("main")
            times.append((time.perf_counter_ns() - t) / 1e6)
        return times

    def profile_layers(self, inputs: list[np.ndarray], runs: int = 10) -> list[dict]:
        """Time of each kernel per run (summed over its calls), from the VM's instrumentation hook.

        The hook costs a few microseconds per call, inside the interval it times: as much as a small kernel takes.
        Plain runs alternate with the instrumented ones, so both see the machine in the same state, and the
        difference between the kernels' sum and the plain run's time is taken off per call, not in proportion
        (which would leave most of it on the small kernels of a deep network).
        """
        import tvm

        args = self.prepare(inputs)
        totals: dict[str, float] = {}
        calls: dict[str, int] = {}
        start: dict[str, int] = {}

        def hook(func, name, before, ret, *_args):
            if before:
                start[name] = time.perf_counter_ns()
            else:
                totals[name] = totals.get(name, 0.0) + (time.perf_counter_ns() - start.pop(name)) / 1e6
                calls[name] = calls.get(name, 0) + 1
            return 0

        hook = tvm.runtime.convert(hook) if hasattr(tvm.runtime, "convert") else hook
        plain = []
        try:
            for _ in range(runs):
                t = time.perf_counter_ns()
                self.vm["main"](*args)
                plain.append((time.perf_counter_ns() - t) / 1e6)
                self.vm.set_instrument(hook)
                self.vm["main"](*args)
                self.vm.set_instrument(None)
        finally:
            self.vm.set_instrument(None)
        flops = self.build.kernels
        timed = {n: t / runs for n, t in totals.items() if n in flops}
        per_run_calls = {n: calls[n] // runs for n in timed}
        overhead = (sum(timed.values()) - float(np.median(plain))) / max(1, sum(per_run_calls.values()))
        own = {n: max(t - overhead * per_run_calls[n], 0.1 * t) for n, t in timed.items()}
        whole = sum(own.values()) or 1.0
        rows = sorted(own.items(), key=lambda r: -r[1])
        # The user's layers each kernel ran (a kernel shared by identical layers runs several).
        sources: dict[str, list[str]] = {}
        kinds: dict[str, str] = {}
        for row in self.build.layers:
            sources.setdefault(row.kernel, []).extend(row.sources)
            kinds[row.kernel] = kernel_kind(row)
        return [{"name": n, "ms": round(t, 5), "share": round(t / whole, 4), "calls": per_run_calls[n],
                 "gflops": round(flops[n] * per_run_calls[n] / (t * 1e6), 2) if t > 0 else 0.0,
                 "sources": sources.get(n, []), "kernel": kinds.get(n, "dense")}
                for n, t in rows]


def kernel_kind(row) -> str:
    """How a layer runs, as `measure` lists it: dense, or block-sparse with its N and kept fraction."""
    if row.family == "bsr":
        return f"1x{row.block} sparse {row.density:.0%}"
    return row.family


def random_inputs(build: Build, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape).astype(s.dtype) if s.dtype.startswith("float")
            else rng.integers(0, 8, s.shape).astype(s.dtype) for s in build.inputs]


class OthersBusy:
    """Over a `with` span: the share of this machine's CPUs that other processes kept busy (/proc/stat's busy time
    less this process's own, all its threads, over the span's wall time times the CPUs). `share` is None where
    /proc/stat cannot be read (not Linux). A build timed at 2 threads on 2 cores that other work also uses is
    descheduled in the middle of its parallel loops: here one priced at 0.27 ms measured 170-250 ms."""

    share: float | None = None

    def __enter__(self) -> OthersBusy:
        self._start = _busy_seconds(), _own_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_seconds(), _own_seconds(), time.monotonic()
        if busy is None or self._start[0] is None or wall <= self._start[2]:
            return
        others = (busy - self._start[0]) - (own - self._start[1])
        self.share = min(1.0, max(0.0, others / ((wall - self._start[2]) * (os.cpu_count() or 1))))


def _busy_seconds() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq, steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure(build: Build, runs: int = 100, warmup: int = 10, threads: int | None = None,
            layers: bool = True) -> Measurement:
    n = set_threads(threads)
    sess = Session(build)
    inputs = random_inputs(build)
    with OthersBusy() as others:
        times = sess.time_runs(inputs, runs, warmup)
    prof = sess.profile_layers(inputs, runs=max(3, min(runs, 20))) if layers else []
    return Measurement(device="local", target=build.target, runs_ms=times, threads=n, layers=prof,
                       others_busy=others.share)


def measure_interleaved(builds: list[Build], runs: int = 30, warmup: int = 5, threads: int | None = None,
                        rounds: int = 10, layers: bool = True,
                        progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Time several builds in `rounds` interleaved rounds: each round runs every build `runs / rounds` times.

    A machine's speed drifts: on a shared 2-core host the same build's median over 30 back-to-back runs moved by
    1.45x from one minute to the next, while the ratios between builds timed in interleaved rounds held to ~3%.
    Timed one after the other, builds measured in a slow spell look slower than they are; interleaved, every build
    sees the same mix of spells, so their times stay comparable (a calibration table, a benchmark's baseline).
    """
    n = set_threads(threads)
    sessions = [Session(b) for b in builds]
    inputs = [random_inputs(b) for b in builds]
    per_round = max(1, -(-runs // max(1, rounds)))
    times: list[list[float]] = [[] for _ in builds]
    for sess, x in zip(sessions, inputs):
        sess.time_runs(x, 0, warmup)
    with OthersBusy() as others:
        for r in range(max(1, rounds)):
            for sess, x, ts in zip(sessions, inputs, times):
                ts += sess.time_runs(x, per_round, 1)  # one warm-up: the previous build left other data in cache
            if progress:
                progress(f"round {r + 1}/{rounds} timed")
    profiles = [sess.profile_layers(x, runs=max(3, min(runs, 20))) if layers else []
                for sess, x in zip(sessions, inputs)]
    return [Measurement(device="local", target=b.target, runs_ms=ts, threads=n, layers=prof,
                        others_busy=others.share)
            for b, ts, prof in zip(builds, times, profiles)]

