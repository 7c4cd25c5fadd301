"""One Device interface, chosen by URI:

    local                   this machine, in this process
    rpc://HOST:PORT/KEY     a board from a TVM RPC tracker: the build is uploaded, run and timed there
                            (?wait=S&timeout=S: see RpcDevice)
    qemu://TARGET           a C package under qemu-user: exact numerics, and times that are NOT the device's
    serial://PATH?baud=N    a board running the edgeprune agent for a C package (serial_device.py)

Every device runs a build on inputs and measures it; a Measurement says whether its times are real latency.
"""

from __future__ import annotations

import gc
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs

import numpy as np

from ..artifacts import Build, Measurement
from ..cost.identity import device_identity, host_details
from ..errors import UserError
from ..targets import Target
from . import package

NO_SUCH_KEY = -2
T = TypeVar("T")
RPC_URI = re.compile(r"^rpc://(?P<host>[^:/]+):(?P<port>\d+)/(?P<key>[\w.\-]+)(?:\?(?P<query>.*))?$")
CONNECT_GRACE = 5.0  # seconds, beyond wait + session timeout, for the tracker request, connection and teardown


class Device:
    uri: str

    def run(self, build: Build, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def measure(self, build: Build, runs: int, warmup: int, threads: int | None = None,
                layers: bool = True) -> Measurement:
        raise NotImplementedError

    def identity(self, target: Target, boards: int | None = None) -> dict:
        """Who measures: what a latency table records, so it is not used for another device."""
        return device_identity(self.uri, target)

    def table_name(self, target: Target) -> str:
        """The file name (without .json) of this device's latency table under calibrate/."""
        return target.name


class LocalDevice(Device):
    uri = "local"

    def identity(self, target, boards=None):
        return device_identity(self.uri, target, **host_details(target))

    def table_name(self, target):
        return f"{target.name}-{target.cpu}"

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
    """A board from a TVM RPC tracker, by rpc://HOST:PORT/KEY[?wait=S&timeout=S].

    wait     seconds to wait for a free board under KEY before 'no free board' (default 10): a board just
             released takes a moment to re-register, and parallel calibration keeps every board busy
    timeout  seconds a session may last (default 60): the server ends longer sessions, and this side gives up on
             a board that has not answered within wait + timeout + CONNECT_GRACE (a stopped or hung rpc_server
             would otherwise block forever: TVM's client has no timeout of its own)
    """

    host: str
    port: int
    key: str
    timeout: float = 60.0  # seconds a session may last
    wait_free: float = 10.0  # seconds to wait for a busy board

    @property
    def uri(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"

    def identity(self, target, boards=None):
        return device_identity(self.uri, target, tracker=f"{self.host}:{self.port}", key=self.key, boards=boards or 1)

    def table_name(self, target):
        return self.key

    def _tracker(self):
        import socket

        import tvm.rpc

        try:  # TVM's client retries a dead tracker for a minute: find out in a few seconds instead
            socket.create_connection((self.host, self.port), timeout=5).close()
            return tvm.rpc.connect_tracker(self.host, self.port)
        except Exception as e:  # noqa: BLE001 - socket errors of all kinds
            raise UserError(f"cannot reach the RPC tracker at {self.host}:{self.port} ({self._said(e)}); "
                            "check that it runs and the address") from None

    def boards(self) -> int:
        """Boards registered under the key, free or in use (at least 1); an unknown key is a clear error."""
        tracker = self._tracker()
        try:
            summary = tracker.summary()
        except Exception:  # noqa: BLE001 - a tracker that does not summarize: assume one board
            return 1
        finally:
            tracker.close()
        if self.key not in summary.get("queue_info", {}):
            raise self._no_such_key()
        # server_info lists every server connected to the tracker, busy ones too; queue_info only the free ones.
        registered = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{self.key}")
        return max(1, registered, int(summary["queue_info"][self.key].get("free", 0)))

    def _no_such_key(self) -> UserError:
        return UserError(f"no board is registered under key '{self.key}' at the tracker {self.host}:{self.port}; "
                         "check the key, or start an rpc_server with it")

    def _session(self):
        """A board from the tracker; a tracker that does not answer, or has no free board, is a clear error."""
        tracker = self._tracker()
        # A board just released takes a moment to re-register: wait, bounded, before calling it busy.
        deadline = time.monotonic() + self.wait_free
        while (free := _free_boards(tracker, self.key)) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        if free == NO_SUCH_KEY:
            raise self._no_such_key()
        if free == 0:
            raise UserError(f"the tracker at {self.host}:{self.port} has no free board under key '{self.key}' "
                            f"(waited {self.wait_free:g} s); start an rpc_server with that key or retry later")
        try:
            return tracker.request(self.key, priority=1, session_timeout=self.timeout, max_retry=2)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"no board under key '{self.key}' answered the tracker at {self.host}:{self.port} "
                            f"({self._said(e)})") from None

    def _bounded(self, work: Callable[[], T]) -> T:
        """`work` (a whole session: request, upload, run) in a daemon thread, given up after the bound.

        A board that accepted the connection but never answers blocks TVM's C++ client forever and nothing can
        interrupt it; the thread is left behind (daemon: it does not keep the process alive) and ends when the
        socket does.
        """
        limit = self.wait_free + self.timeout + CONNECT_GRACE
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = work()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        thread = threading.Thread(target=target, name=f"rpc-{self.key}", daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            raise UserError(f"the board under '{self.key}' at the tracker {self.host}:{self.port} did not answer "
                            f"within {limit:g} s; is its rpc_server stopped or hung? (longer sessions: "
                            "?timeout=S in the device URI)")
        if "error" in box:
            raise box["error"]
        return box["value"]

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
            raise UserError(f"the board under '{self.key}' could not load {lib.name} ({self._said(e)}); is it "
                            f"built for that board's target? ({build.target})") from None
        return remote, vm

    def _args(self, remote, build: Build, inputs: list[np.ndarray]):
        import tvm

        package.check_inputs(build, inputs)
        return [tvm.runtime.tensor(np.ascontiguousarray(a), remote.cpu()) for a in inputs]

    def run(self, build, inputs):
        return self._bounded(lambda: self._run(build, inputs))

    def _run(self, build: Build, inputs: list[np.ndarray]) -> list[np.ndarray]:
        remote, vm = self._load(build)
        try:
            res = vm["main"](*self._args(remote, build, inputs))
            items = list(res) if not hasattr(res, "numpy") else [res]
            return [r.numpy() for r in items]
        finally:
            del vm, remote
            gc.collect()  # closes the session: the board goes back to the tracker now, not at exit

    def measure(self, build, runs, warmup, threads=None, layers=True):
        return self._bounded(lambda: self._measure(build, runs, warmup, threads))

    def _measure(self, build: Build, runs: int, warmup: int, threads: int | None) -> Measurement:
        from .local import random_inputs

        remote, vm = self._load(build)
        args = self._args(remote, build, random_inputs(build))
        try:
            if warmup:
                vm.time_evaluator("main", remote.cpu(), number=warmup, repeat=1)(*args)
            result = vm.time_evaluator("main", remote.cpu(), number=1, repeat=runs)(*args)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"the board under '{self.key}' failed while measuring ({self._said(e)})") from None
        finally:
            del vm, remote, args
            gc.collect()
        return Measurement(device=self.uri, target=build.target, runs_ms=self._times_ms(result.results, runs),
                           threads=threads or 0)

    def _times_ms(self, seconds: list[float], runs: int) -> list[float]:
        """The server's times in ms, refused unless there is one per run and each is finite and positive."""
        source = f"the board under '{self.key}' at the tracker {self.host}:{self.port}"
        if len(seconds) != runs:
            raise UserError(f"{source} reported {len(seconds)} times for {runs} runs; check its rpc_server")
        checked = checked_times(list(seconds), "s", source, "check its rpc_server, its TVM version and its clock")
        return [t * 1e3 for t in checked]

    @staticmethod
    def _said(e: BaseException) -> str:
        """An error the server sent, as one short printable line (it may carry the board's own text)."""
        return device_text(_line(e))


def device_text(text: bytes | str, limit: int = 160) -> str:
    """Text a board or server sent (an error, a build id), made safe for one terminal line: printable ASCII only,
    anything else as '?' (no newlines, no escape codes), and at most `limit` characters."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def checked_times(times: list[float], unit: str, source: str, advice: str) -> list[float]:
    """`times` as a device reported them, refused unless every one is finite and positive: a NaN, infinite, zero
    or negative time would give a NaN or negative median, invalid JSON and a `check` that could pass."""
    for i, t in enumerate(times):
        if not (math.isfinite(t) and t > 0):
            raise UserError(f"{source} reported an impossible time ({t:g} {unit} for run {i + 1} of {len(times)}); "
                            f"{advice}")
    return list(times)


def parse_rpc_uri(uri: str) -> RpcDevice | None:
    """rpc://HOST:PORT/KEY[?wait=S&timeout=S] as an RpcDevice; None when `uri` is not an rpc:// URI at all."""
    m = RPC_URI.match(uri)
    if not m:
        return None
    usage = "use rpc://HOST:PORT/KEY[?wait=S&timeout=S]"
    params = parse_qs(m["query"] or "", keep_blank_values=True)
    unknown = sorted(set(params) - {"wait", "timeout"})
    if unknown:
        raise UserError(f"RPC device '{uri}' has unknown parameter(s) {', '.join(unknown)}; {usage}")
    try:
        wait = float(params.get("wait", [RpcDevice.wait_free])[-1])
        timeout = float(params.get("timeout", [RpcDevice.timeout])[-1])
    except ValueError:
        raise UserError(f"RPC device '{uri}': wait and timeout are numbers of seconds; {usage}") from None
    if not (wait >= 0 and timeout > 0):
        raise UserError(f"RPC device '{uri}': wait must be >= 0 and timeout > 0; {usage}")
    return RpcDevice(m["host"], int(m["port"]), m["key"], timeout=timeout, wait_free=wait)


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
    rpc = parse_rpc_uri(uri)
    if rpc:
        return rpc
    if uri.startswith("serial://"):
        from .serial_device import parse_uri

        return parse_uri(uri)
    raise UserError(f"unknown device '{uri}'; use local, rpc://HOST:PORT/KEY, qemu://TARGET or serial://PATH?baud=N")
