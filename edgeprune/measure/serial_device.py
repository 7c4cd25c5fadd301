"""The `serial://PATH?baud=N` device: a board running the edgeprune agent (codegen/agent) for one C package.

The host opens the port, says HELLO and refuses a board whose agent was built from another package, then sends
the input in chunks, asks for runs and reads the output back (frames: serial_protocol.py). Every read has a
deadline and damaged frames are resent a bounded number of times, so a silent, reset or unplugged board ends in
a one-line UserError rather than a hang. A broken or hostile one too: progress extends only a RUN and only up to
a cap, errors about other frames do not use up the resends, impossible times are refused, and the board's text is
shown as printable ASCII (what the host trusts: the end of codegen/agent/protocol.h's comment).

    build_agent(BUILD_DIR) -> path of an agent program for the build's target (Linux boards, qemu-user)
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from ..artifacts import Build, Measurement
from ..errors import UserError
from ..resources import shipped
from ..targets import get_target
from .devices import Device, _line, checked_times, device_text
from .package import check_inputs
from .serial_protocol import PROTOCOL_VERSION, BadFrame, Decoder, Err, Frame, Msg, encode

PREFIX = "serial://"
AGENT_DIR = shipped("codegen/agent")  # the repository's codegen/agent, or an install's copy of it
POLL_S = 0.05  # one blocking read; deadlines are checked between reads
QUIET_S = 0.5  # a line silent this long after an error about another frame: that error was about ours
MAX_RUN_TOTAL = 0xFFFF  # runs + warmup of one RUN: what PROGRESS's u16 count can say (protocol.h)
HELLO_OK = struct.Struct("<HHIIBB")  # version, max payload, input bytes, output bytes, clock, id length


@dataclass(frozen=True)
class Hello:
    version: int
    max_payload: int
    input_bytes: int
    output_bytes: int
    clock: int
    build_id: str


@dataclass
class SerialDevice(Device):
    path: str
    baud: int = 115200
    timeout: float = 5.0  # seconds to wait for any reply
    run_timeout: float = 60.0  # seconds one inference may take on the board, on top of `timeout`
    retries: int = 3  # resends after a damaged frame or a missing reply

    @property
    def uri(self) -> str:
        return f"{PREFIX}{self.path}?baud={self.baud}"

    def run(self, build: Build, inputs: list[np.ndarray]) -> list[np.ndarray]:
        check_inputs(build, inputs)
        spec = build.outputs[0]
        with self._connect(build) as (link, hello):
            link.set_input(_le_f32(inputs[0]), hello)
            link.run(1, 0)
            out = np.frombuffer(link.get_output(hello), dtype="<f4")
        return [out.astype(np.float32).reshape(spec.shape)]

    def measure(self, build: Build, runs: int, warmup: int, threads: int | None = None,
                layers: bool = True) -> Measurement:
        from .local import random_inputs

        if warmup >= MAX_RUN_TOTAL:  # the warm-up runs go with the first batch, which has at least one run
            raise UserError(f"a serial board takes at most {MAX_RUN_TOTAL - 1} warm-up runs, got {warmup}")
        times_us: list[float] = []
        with self._connect(build) as (link, hello):
            link.set_input(_le_f32(random_inputs(build)[0]), hello)
            per_request = (hello.max_payload - 2) // 4  # one TIMES reply holds a batch
            while len(times_us) < runs:
                first = not times_us
                batch = min(per_request, runs - len(times_us), MAX_RUN_TOTAL - (warmup if first else 0))
                times_us += link.run(batch, warmup if first else 0)
        # Layers are not timed one by one on a board: the package runs as one call.
        return Measurement(device=self.uri, target=build.target, runs_ms=[t / 1e3 for t in times_us], threads=1)

    def _open_port(self):
        """The pyserial port (tests wrap it to damage frames)."""
        import serial

        try:
            port = serial.serial_for_url(self.path, baudrate=self.baud, timeout=POLL_S, write_timeout=self.timeout,
                                         exclusive=True)
            port.reset_input_buffer()  # replies a previous session left behind
        except (OSError, ValueError) as e:
            raise UserError(f"cannot open the serial port {self.path} ({_line(e)}); check the path, that no other "
                            "program holds it, and your permissions (group dialout)") from None
        return port

    @contextmanager
    def _connect(self, build: Build) -> Iterator[tuple[_Link, Hello]]:
        if build.format != "c":
            raise UserError(f"{build.directory} is a shared library build; serial boards run C packages: compile "
                            "with --format c")
        port = self._open_port()
        try:
            link = _Link(self, port)
            yield link, link.hello(build)
        finally:
            port.close()


@dataclass(frozen=True)
class _Wait:
    """How long one attempt at a request waits: `wait` s of silence; for a RUN of `runs` runs in all, PROGRESS
    restarts that wait, up to `cap` s in all."""

    wait: float
    runs: int = 0
    cap: float = 0.0


def _damage(f: Frame | BadFrame) -> str | None:
    """Why a frame says something arrived damaged: our request ("damaged request", the agent's BAD_CRC or TOO_LONG)
    or its reply ("damaged reply"); None for an intact frame."""
    if isinstance(f, BadFrame):
        return "damaged reply"
    if f.type == Msg.ERROR and f.payload[:1] in (bytes([Err.BAD_CRC]), bytes([Err.TOO_LONG])):
        return "damaged request"
    return None


def _progresses(payload: bytes, done: int, runs: int) -> bool:
    """A PROGRESS payload that moves a RUN of `runs` runs in all on from `done`: the agent counts strictly up and
    never reaches `runs` (TIMES reports the last run). For any other request `runs` is 0: nothing progresses."""
    return len(payload) == 2 and done < struct.unpack("<H", payload)[0] < runs


class _Link:
    """Requests over one open port: each resent with a new sequence number after a damaged frame or silence, at
    most `retries` times; replies to earlier attempts are recognised by their sequence number and dropped."""

    def __init__(self, dev: SerialDevice, port):
        self.dev, self.port = dev, port
        self.decoder = Decoder()
        self.pending: list[Frame | BadFrame] = []
        self.seq = int.from_bytes(os.urandom(1), "little")  # unlike any seq a previous session left in flight
        self.line_active = time.monotonic()  # when a byte last went either way

    def hello(self, build: Build) -> Hello:
        p = self.request(Msg.HELLO, b"", Msg.HELLO_OK, "HELLO")
        if len(p) < HELLO_OK.size or len(p) < HELLO_OK.size + p[HELLO_OK.size - 1]:
            raise UserError(f"the board at {self.dev.path} answered HELLO with {len(p)} bytes; it does not run an "
                            "edgeprune agent")
        *fields, n = HELLO_OK.unpack_from(p)
        hello = Hello(*fields, build_id=p[HELLO_OK.size: HELLO_OK.size + n].decode("ascii", "replace"))
        self._check_hello(hello, build)
        return hello

    def _check_hello(self, hello: Hello, build: Build) -> None:
        """Refuse an agent of another protocol, another package, or sizes that do not fit the build."""
        want = package_build_id(build)
        flash = f"build its agent with: make -f {AGENT_DIR / 'Makefile'} PKG={build.directory}, and flash or start it"
        if hello.version != PROTOCOL_VERSION:
            raise UserError(f"the agent at {self.dev.path} speaks protocol {hello.version}, this edgeprune "
                            f"{PROTOCOL_VERSION}; {flash}")
        if hello.build_id != want:
            theirs = device_text(hello.build_id, 80)  # the board's text: no newline or escape code reaches stderr
            raise UserError(f"the board at {self.dev.path} runs build {theirs}, not {build.directory} "
                            f"(build {want}); {flash}")
        if hello.input_bytes != _nbytes(build.inputs[0].shape) or hello.output_bytes != _nbytes(
                build.outputs[0].shape) or not 64 <= hello.max_payload <= 4096:
            raise UserError(f"the agent at {self.dev.path} announces sizes that do not fit {build.directory}; {flash}")

    def set_input(self, data: bytes, hello: Hello) -> None:
        chunk = hello.max_payload - 4
        for off in range(0, len(data), chunk):
            part = data[off: off + chunk]
            ack = self.request(Msg.SET_INPUT, struct.pack("<I", off) + part, Msg.ACK, "SET_INPUT")
            if ack != struct.pack("<I", off + len(part)):
                raise UserError(f"the agent at {self.dev.path} acknowledged the wrong input chunk; reset the board")

    def run(self, runs: int, warmup: int) -> list[float]:
        """Microseconds of each of `runs` runs after `warmup` untimed ones, each finite and positive."""
        # PROGRESS restarts the wait for the next runs; the whole RUN may take what its runs may take, no more.
        total = runs + warmup
        cap = self.dev.timeout + total * self.dev.run_timeout
        p = self.request(Msg.RUN, struct.pack("<HH", runs, warmup), Msg.TIMES, "RUN",
                         self.dev.timeout + self.dev.run_timeout, runs=total, cap=cap)
        if len(p) != 2 + 4 * runs or struct.unpack_from("<H", p)[0] != runs:
            raise UserError(f"the agent at {self.dev.path} reported {len(p) // 4} times for {runs} runs")
        return checked_times(list(struct.unpack_from(f"<{runs}f", p, 2)), "us", f"the agent at {self.dev.path}",
                             "its clock is broken or it is not this edgeprune's agent: reset the board, rebuild "
                             "the agent and retry")

    def get_output(self, hello: Hello) -> bytes:
        out, chunk = bytearray(), hello.max_payload - 4
        while len(out) < hello.output_bytes:
            n = min(chunk, hello.output_bytes - len(out))
            p = self.request(Msg.GET_OUTPUT, struct.pack("<IH", len(out), n), Msg.OUTPUT, "GET_OUTPUT")
            if len(p) != 4 + n or struct.unpack_from("<I", p)[0] != len(out):
                raise UserError(f"the agent at {self.dev.path} sent the wrong output chunk; reset the board")
            out += p[4:]
        return bytes(out)

    def request(self, msg: Msg, payload: bytes, expect: Msg, what: str, wait: float | None = None,
                runs: int = 0, cap: float | None = None) -> bytes:
        """The payload of the `expect` reply to `msg`, resent after damage or `wait` s of silence. Only a RUN (`runs`
        runs in all) may be held longer, by PROGRESS, and never past `cap` s."""
        wait = self.dev.timeout if wait is None else wait
        faults = []
        for _ in range(self.dev.retries + 1):
            self.seq = (self.seq + 1) & 0xFF
            self._write(encode(msg, self.seq, payload), what)
            reply = self._await(self.seq, expect, what, _Wait(wait, runs, cap or wait))
            if isinstance(reply, bytes):
                return reply
            faults.append(reply)
        path, tries = self.dev.path, len(faults)
        if all(f == "no answer" for f in faults):
            raise UserError(f"no answer from the board at {path} to {what} within {wait:g} s ({tries} tries); check "
                            f"that the edgeprune agent runs there, the port and the baud rate ({self.dev.baud})")
        raise UserError(f"frames to or from the board at {path} kept arriving damaged during {what} "
                        f"({', '.join(sorted(set(faults)))}; {tries} tries); check the baud rate ({self.dev.baud}) "
                        "and the cable")

    def _await(self, seq: int, expect: Msg, what: str, w: _Wait) -> bytes | str:
        """The reply's payload, or why to resend: "no answer", "damaged reply", "damaged request".

        Damage reported about another seq (a BAD_CRC for a frame queued ahead of ours, a garbled stale reply) is
        not ours, unless the damage hit the seq byte itself: so it counts only if the line then goes quiet with no
        reply to us. A RUN may be legitimately quiet for a whole inference, so for it quiet means its full wait.
        """
        start = time.monotonic()
        deadline, done, suspect = start + w.wait, 0, None
        quiet = w.wait if w.runs else min(QUIET_S, w.wait / 2)
        while True:
            while self.pending:
                f = self.pending.pop(0)
                damage = _damage(f)
                if damage and f.seq == seq:
                    return damage
                if damage or f.seq != seq:
                    suspect = damage or suspect  # else a late reply to an earlier attempt
                    continue
                if f.type == Msg.PROGRESS:
                    if not _progresses(f.payload, done, w.runs):
                        continue  # not a RUN, or a count that does not rise within its runs: no more time
                    done = struct.unpack("<H", f.payload)[0]
                    deadline = min(time.monotonic() + w.wait, start + w.cap)
                    suspect = None  # the board is running our RUN: it got it intact
                elif f.type == Msg.ERROR:
                    raise UserError(self._refusal(f, what))
                elif f.type != expect:
                    raise UserError(f"the board at {self.dev.path} answered {what} with message type "
                                    f"0x{f.type:02x}; it does not run this edgeprune's agent")
                else:
                    return f.payload
            now = time.monotonic()
            if suspect and now - self.line_active >= quiet:
                return suspect
            if now >= deadline:
                if done and now - start >= w.cap:
                    raise UserError(self._overran(what, w))
                return suspect or "no answer"
            self.pending += self.decoder.feed(self._read(what))

    def _overran(self, what: str, w: _Wait) -> str:
        return (f"the board at {self.dev.path} did not finish {what} within {w.cap:g} s ({w.runs} runs of at most "
                f"{self.dev.run_timeout:g} s each), though it kept reporting progress; reset the board and retry")

    def _refusal(self, f: Frame, what: str) -> str:
        code, text = (f.payload[0] if f.payload else 0), device_text(f.payload[2:], limit=80)
        if code == Err.MODEL_FAILED:
            return f"the model failed on the board at {self.dev.path}: {text}"
        return f"the agent at {self.dev.path} refused {what}: {text} (error {code})"

    def _read(self, what: str) -> bytes:
        try:
            data = self.port.read(max(1, self.port.in_waiting))  # returns at once when bytes are waiting
        except OSError as e:  # pyserial's SerialException too: EIO once the other end of the line is gone
            raise UserError(self._lost(what, e)) from None
        if data:
            self.line_active = time.monotonic()
        return data

    def _write(self, data: bytes, what: str) -> None:
        import serial

        try:
            self.port.write(data)
            # No reply can come before the frame is on the wire: the line counts as busy until then.
            self.line_active = time.monotonic() + len(data) * 10 / self.dev.baud
        except serial.SerialTimeoutException:
            raise UserError(f"the board at {self.dev.path} takes no data (writing {what} timed out after "
                            f"{self.dev.timeout:g} s); reset it and check the flow control") from None
        except OSError as e:
            raise UserError(self._lost(what, e)) from None

    def _lost(self, what: str, e: BaseException) -> str:
        return (f"lost the board at {self.dev.path} during {what} ({_line(e)}): the agent stopped or the port "
                "was closed; reset the board and retry")


def _nbytes(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * 4


def _le_f32(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def parse_uri(uri: str) -> SerialDevice:
    """serial://PATH?baud=N[&timeout=S]: PATH absolute (serial:///dev/ttyUSB0), baud 115200 unless given."""
    path, _, query = uri[len(PREFIX):].partition("?")
    usage = "use serial://PATH?baud=N with an absolute PATH, e.g. serial:///dev/ttyUSB0?baud=115200"
    if not path.startswith("/"):
        raise UserError(f"serial device '{uri}' has no absolute path; {usage}")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"baud", "timeout"})
    if unknown:
        raise UserError(f"serial device '{uri}' has unknown parameter(s) {', '.join(unknown)}; {usage}[&timeout=S]")
    try:
        baud = int(params.get("baud", ["115200"])[-1])
        timeout = float(params.get("timeout", ["5"])[-1])
    except ValueError:
        raise UserError(f"serial device '{uri}': baud must be an integer and timeout a number of seconds; {usage}") \
            from None
    if baud <= 0 or not timeout > 0:
        raise UserError(f"serial device '{uri}': baud and timeout must be positive; {usage}")
    return SerialDevice(path, baud, timeout=timeout)


def package_build_id(build: Build) -> str:
    """The id the package's header defines (<NAME>_BUILD_ID, from cpackage.build_id): what its agent announces."""
    header = Path(build.directory) / f"{build.memory.get('package', 'model')}.h"
    m = re.search(r'#define \w+_BUILD_ID "([^"]*)"', header.read_text()) if header.is_file() else None
    if not m:
        raise UserError(f"{header} is missing or has no build id; recompile the model with --format c")
    return m.group(1)


def build_agent(build_dir: str | Path, target: str | None = None, output: str | Path | None = None) -> Path:
    """Compile codegen/agent with the package in `build_dir` for its target (Linux or qemu-user: stdin/stdout or a
    tty); returns the program, by default <build_dir>/agent_<name>."""
    build = Build.load(build_dir)
    if build.format != "c":
        raise UserError(f"{build_dir} is a shared library build; the agent links a C package: compile with --format c")
    t = get_target(target or build.target)
    if t.name != build.target:
        raise UserError(f"{build_dir} is built for {build.target}, not {t.name}; build the agent for {build.target}")
    if "none" in t.triple:
        raise UserError(f"{t.name} has no OS: compile {AGENT_DIR}/agent.c and port_baremetal.c into your firmware "
                        "(see port_baremetal.c)")
    if shutil.which(t.cross_compiler) is None:
        raise UserError(f"C compiler {t.cross_compiler} for {t.name} is not installed; install it")
    name = build.memory.get("package", "model")
    out = Path(output or Path(build_dir) / f"agent_{name}").resolve()
    cmd = ["make", "-s", "-f", str(AGENT_DIR / "Makefile"), f"PKG={Path(build_dir).resolve()}", f"NAME={name}",
           f"OUT={out}", f"CC={t.cross_compiler}", f"CFLAGS={' '.join(t.cflags)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        first = next((ln for ln in lines if "error" in ln), lines[-1])
        raise UserError(f"the agent did not build with {t.cross_compiler} ({first[:200]}); please report it")
    return out
