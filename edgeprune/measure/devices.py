"""One Device interface, chosen by URI:

    local                   this machine, in this process
    rpc://HOST:PORT/KEY     a board from a TVM RPC tracker: the build is uploaded, run and timed there
    qemu://TARGET           a C package under qemu-user: exact numerics, and times that are NOT the device's
    serial://PATH?baud=N    a board running the edgeprune agent for a C package (serial_device.py)

Every device runs a build on inputs and measures it; a Measurement says whether its times are real latency.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import Build, Measurement
from ..errors import UserError
from . import package

NO_SUCH_KEY = -2
RPC_URI = re.compile(r"^rpc://(?P<host>[^:/]+):(?P<port>\d+)/(?P<key>[\w.\-]+)$")


class Device:
    uri: str

    def run(self, build: Build, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def measure(self, build: Build, runs: int, warmup: int, threads: int | None = None,
                layers: bool = True) -> Measurement:
        raise NotImplementedError


class LocalDevice(Device):
    uri = "local"

    def run(self, build, inputs):
        if build.format == "c":
            return package.run(build, inputs, "local")
        from .local import Session

        return Session(build).run(inputs)

    def measure(self, build, runs, warmup, threads=None, layers=True):
        if build.format == "c":
            return _package_measurement(build, "local", runs, warmup, real_time=True)
        from .local import measure

        return measure(build, runs=runs, warmup=warmup, threads=threads, layers=layers)


@dataclass
class QemuDevice(Device):
    target: str

    @property
    def uri(self) -> str:
        return f"{package.QEMU_PREFIX}{self.target}"

    def run(self, build, inputs):
        return package.run(build, inputs, self.uri)

    def measure(self, build, runs, warmup, threads=None, layers=True):
        return _package_measurement(build, self.uri, runs, warmup, real_time=False)


def _package_measurement(build: Build, device: str, runs: int, warmup: int, real_time: bool) -> Measurement:
    from .local import random_inputs

    times = package.time_runs(build, random_inputs(build), device, runs, warmup)
    return Measurement(device=device, target=build.target, runs_ms=times, threads=1, real_time=real_time)


@dataclass
class RpcDevice(Device):
    host: str
    port: int
    key: str
    timeout: float = 60.0  # seconds a session may last
    wait_free: float = 10.0  # seconds to wait for a busy board

    @property
    def uri(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"

    def _session(self):
        """A board from the tracker; a tracker that does not answer, or has no free board, is a clear error."""
        import socket

        import tvm.rpc

        try:  # TVM's client retries a dead tracker for a minute: find out in a few seconds instead
            socket.create_connection((self.host, self.port), timeout=5).close()
            tracker = tvm.rpc.connect_tracker(self.host, self.port)
        except Exception as e:  # noqa: BLE001 - socket errors of all kinds
            raise UserError(f"cannot reach the RPC tracker at {self.host}:{self.port} ({_line(e)}); "
                            "check that it runs and the address") from None
        # A board just released takes a moment to re-register: wait, bounded, before calling it busy.
        deadline = time.monotonic() + self.wait_free
        while (free := _free_boards(tracker, self.key)) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        if free == NO_SUCH_KEY:
            raise UserError(f"no board is registered under key '{self.key}' at the tracker {self.host}:{self.port}; "
                            "check the key, or start an rpc_server with it")
        if free == 0:
            raise UserError(f"the tracker at {self.host}:{self.port} has no free board under key '{self.key}' "
                            f"(waited {self.wait_free:g} s); start an rpc_server with that key or retry later")
        try:
            return tracker.request(self.key, priority=1, session_timeout=self.timeout, max_retry=2)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"no board under key '{self.key}' answered the tracker at {self.host}:{self.port} "
                            f"({_line(e)})") from None

    def _load(self, build: Build):
        from tvm import relax

        if build.format != "so":
            raise UserError(f"{build.directory} is a C package; RPC boards run --format so builds")
        remote = self._session()
        lib = Path(build.directory) / build.library
        try:
            remote.upload(str(lib))
            vm = relax.VirtualMachine(remote.load_module(lib.name), remote.cpu())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"the board under '{self.key}' could not load {lib.name} ({_line(e)}); is it built for "
                            f"that board's target? ({build.target})") from None
        return remote, vm

    def _args(self, remote, build: Build, inputs: list[np.ndarray]):
        import tvm

        package.check_inputs(build, inputs)
        return [tvm.runtime.tensor(np.ascontiguousarray(a), remote.cpu()) for a in inputs]

    def run(self, build, inputs):
        remote, vm = self._load(build)
        try:
            res = vm["main"](*self._args(remote, build, inputs))
            items = list(res) if not hasattr(res, "numpy") else [res]
            return [r.numpy() for r in items]
        finally:
            del vm, remote
            gc.collect()  # closes the session: the board goes back to the tracker now, not at exit

    def measure(self, build, runs, warmup, threads=None, layers=True):
        from .local import random_inputs

        remote, vm = self._load(build)
        args = self._args(remote, build, random_inputs(build))
        try:
            if warmup:
                vm.time_evaluator("main", remote.cpu(), number=warmup, repeat=1)(*args)
            result = vm.time_evaluator("main", remote.cpu(), number=1, repeat=runs)(*args)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"the board under '{self.key}' failed while measuring ({_line(e)})") from None
        finally:
            del vm, remote, args
            gc.collect()
        return Measurement(device=self.uri, target=build.target, runs_ms=[t * 1e3 for t in result.results],
                           threads=threads or 0)


def _free_boards(tracker, key: str) -> int:
    """Free servers under `key` per the tracker's summary; NO_SUCH_KEY when none ever registered, -1 when it
    does not say."""
    try:
        summary = tracker.summary()
    except Exception:  # noqa: BLE001
        return -1
    stats = summary.get("queue_info", {}).get(key)
    if stats is None:
        return NO_SUCH_KEY
    return int(stats.get("free", 0))


def _line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:160]


def get_device(uri: str) -> Device:
    if uri == "local":
        return LocalDevice()
    if uri.startswith(package.QEMU_PREFIX):
        from ..targets import get_target

        name = uri[len(package.QEMU_PREFIX):]
        get_target(name)  # an unknown target is named with the known ones
        return QemuDevice(name)
    m = RPC_URI.match(uri)
    if m:
        return RpcDevice(m["host"], int(m["port"]), m["key"])
    if uri.startswith("serial://"):
        from .serial_device import parse_uri

        return parse_uri(uri)
    raise UserError(f"unknown device '{uri}'; use local, rpc://HOST:PORT/KEY, qemu://TARGET or serial://PATH?baud=N")
