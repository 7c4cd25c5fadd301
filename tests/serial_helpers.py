"""Boards for the serial tests, all on this machine behind a pseudo-terminal: the real agent (natively, under qemu, or
built with sanitizers) and FakeBoard, a scripted board that misbehaves in one precise way."""

from __future__ import annotations

import os
import select
import shlex
import struct
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgeprune.artifacts import Build
from edgeprune.measure.serial_device import AGENT_DIR, HELLO_OK, package_build_id
from edgeprune.measure.serial_protocol import PROTOCOL_VERSION, Decoder, Frame, Msg, encode
from edgeprune.targets import get_target

SANITIZERS = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g"
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98"}
SANITIZER_REPORT = ("AddressSanitizer", "runtime error", "UndefinedBehaviorSanitizer")


@contextmanager
def agent_on_pty(program, target: str = "host", stderr=subprocess.DEVNULL, env: dict | None = None):
    """The agent serving the master side of a fresh pty; yields (process, slave path). The test keeps the slave
    open, so the agent outlives each SerialDevice session as it would on a board."""
    master, slave = os.openpty()
    tty.setraw(slave)
    emulator = shlex.split(get_target(target).emulator)
    proc = subprocess.Popen([*emulator, str(program)], stdin=master, stdout=master, stderr=stderr,
                            start_new_session=True, env={**os.environ, **(env or {})})
    os.close(master)  # the agent holds the only master: when it dies, the port reports it
    try:
        yield proc, os.ttyname(slave)
    finally:
        proc.kill()
        proc.wait()
        os.close(slave)


def sanitized_agent(build: Build, out: Path, defines: Iterable[str] = (), package: Path | None = None) -> Path:
    """The POSIX agent for `build` (or for the package copy at `package`) under ASan and UBSan, with extra
    -D`defines` (e.g. EP_MAX_PAYLOAD=64)."""
    name = build.memory.get("package", "model")
    flags = " ".join([SANITIZERS, *(f"-D{d}" for d in defines)])
    cmd = ["make", "-s", "-f", str(AGENT_DIR / "Makefile"), f"PKG={package or build.directory}", f"NAME={name}",
           f"OUT={out}", "CC=gcc", "LDFLAGS=", f"EXTRA_CFLAGS={flags}"]  # ASan links dynamically
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def sanitizer_report(text: str) -> str | None:
    """The first line of a sanitizer report in `text`, if any."""
    return next((ln for ln in text.splitlines() if any(k in ln for k in SANITIZER_REPORT)), None)


# ---------------------------------------------------------------- FakeBoard

Reply = bytes | float  # a frame to send, or seconds to wait before the next one


def frame(msg: int, seq: int, payload: bytes = b"") -> bytes:
    return encode(msg, seq, payload)


def error(seq: int, code: int, text: bytes = b"") -> bytes:
    return encode(Msg.ERROR, seq, bytes([code, seq & 0xFF]) + text)


def progress(seq: int, done: int) -> bytes:
    return encode(Msg.PROGRESS, seq, struct.pack("<H", done))


def hello_ok(build: Build, seq: int, build_id: bytes | None = None, max_payload: int = 1024) -> bytes:
    ident = package_build_id(build).encode() if build_id is None else build_id
    head = HELLO_OK.pack(PROTOCOL_VERSION, max_payload, _nbytes(build.inputs[0].shape),
                         _nbytes(build.outputs[0].shape), 0, len(ident))
    return encode(Msg.HELLO_OK, seq, head + ident)


def _nbytes(shape) -> int:
    return int(np.prod(shape)) * 4


class FakeBoard:
    """A board on the master side of a pty that answers like the agent, with times of `time_us` each, unless
    `answer(board, request)` returns something else: an iterable of frames (bytes) and pauses (floats, seconds), or
    None for the agent's own answer. It serves one request at a time, as the agent does: while it plays a long
    answer, later requests wait in the line."""

    def __init__(self, build: Build, answer: Callable[[FakeBoard, Frame], Iterable[Reply] | None] | None = None,
                 time_us: float = 100.0):
        self.build, self.answer, self.time_us = build, answer, time_us
        self.requests: list[Frame] = []
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(10)
        os.close(self.master)
        os.close(self.slave)

    def agent_answer(self, f: Frame) -> list[Reply]:
        """What the real agent sends for `f`."""
        if f.type == Msg.HELLO:
            return [hello_ok(self.build, f.seq)]
        if f.type == Msg.SET_INPUT:
            return [frame(Msg.ACK, f.seq, struct.pack("<I", struct.unpack_from("<I", f.payload)[0] + len(f.payload)
                                                      - 4))]
        if f.type == Msg.RUN:
            runs = struct.unpack_from("<H", f.payload)[0]
            return [frame(Msg.TIMES, f.seq, struct.pack(f"<H{runs}f", runs, *[self.time_us] * runs))]
        if f.type == Msg.GET_OUTPUT:
            offset, n = struct.unpack("<IH", f.payload)
            return [frame(Msg.OUTPUT, f.seq, struct.pack("<I", offset) + bytes(n))]
        return [error(f.seq, 3, b"unknown request type")]

    def play(self, replies: Iterable[Reply]) -> None:
        for r in replies:
            if self.closed.is_set():
                return
            if isinstance(r, bytes):
                os.write(self.master, r)
            else:
                time.sleep(r)

    def _serve(self) -> None:
        decoder = Decoder()
        while not self.closed.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            for f in decoder.feed(os.read(self.master, 4096)):
                if isinstance(f, Frame):
                    self.requests.append(f)
                    custom = self.answer(self, f) if self.answer else None
                    self.play(self.agent_answer(f) if custom is None else custom)


@contextmanager
def fake_board(build: Build, answer=None, time_us: float = 100.0) -> Iterator[FakeBoard]:
    board = FakeBoard(build, answer, time_us)
    try:
        yield board
    finally:
        board.close()
