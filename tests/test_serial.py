"""The serial://PATH?baud=N device against the C agent (codegen/agent), all on this machine: the agent runs behind
a pseudo-terminal (natively for host, under qemu-arm for cortex-a7) and SerialDevice opens the pty's slave side as
it would a board's /dev/ttyUSB0. Also the framing alone, and the faults: a killed agent, damaged frames both ways,
a silent port, and an agent built from another package."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import tty
import zlib
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
from helpers import assert_close, assert_one_line_error
from serial_helpers import (
    SANITIZER_ENV,
    agent_on_pty,
    error,
    fake_board,
    frame,
    hello_ok,
    progress,
    sanitized_agent,
    sanitizer_report,
)

from edgeprune.codegen.build import compile_model
from edgeprune.errors import UserError
from edgeprune.measure.devices import get_device
from edgeprune.measure.serial_device import AGENT_DIR, SerialDevice, build_agent, package_build_id
from edgeprune.measure.serial_protocol import MAGIC, MAX_PAYLOAD, BadFrame, Decoder, Err, Frame, Msg, encode
from edgeprune.models import zoo
from edgeprune.targets import get_target

NET, RES = "gated_add", 40  # 7 kernels, a 19 KB input: 19 SET_INPUT chunks, so chunking is exercised


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    model, x = zoo.make(NET, RES)
    path = zoo.export_onnx(model, x, root / "net.onnx")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    return root, path, x.numpy(), ref


@pytest.fixture(scope="module")
def host(net):
    root, path, _, _ = net
    build = compile_model(path, "host", root / "host", fmt="c", package_name="net")
    return build, build_agent(build.directory)


# ---------------------------------------------------------------- framing, no agent


def test_frames_roundtrip_with_zlib_crc():
    frame = encode(Msg.SET_INPUT, 300, b"\x01\x02payload")
    body = frame[2:-4]
    assert frame[:2] == MAGIC and body[:4] == bytes([Msg.SET_INPUT, 300 & 0xFF, 9, 0])
    assert struct.unpack("<I", frame[-4:])[0] == zlib.crc32(body)
    assert Decoder().feed(frame) == [Frame(Msg.SET_INPUT, 44, b"\x01\x02payload")]
    dec = Decoder()  # byte by byte, as a slow line delivers it
    got = [f for b in frame + encode(Msg.HELLO, 7) for f in dec.feed(bytes([b]))]
    assert got == [Frame(Msg.SET_INPUT, 44, b"\x01\x02payload"), Frame(Msg.HELLO, 7)]
    assert len(encode(Msg.OUTPUT, 1, bytes(MAX_PAYLOAD))) == MAX_PAYLOAD + 10
    with pytest.raises(ValueError):
        encode(Msg.OUTPUT, 1, bytes(MAX_PAYLOAD + 1))


def test_decoder_skips_noise_and_reports_damaged_frames():
    good = encode(Msg.ACK, 3, b"\x00\x04\x00\x00")
    damaged = bytearray(encode(Msg.ACK, 2, b"abcd"))
    damaged[7] ^= 0x01
    too_long = MAGIC + struct.pack("<BBH", Msg.OUTPUT, 9, 5000)
    stream = b"boot log \xa5 noise" + bytes(damaged) + too_long + good
    assert Decoder().feed(stream) == [BadFrame("crc", 2), BadFrame("too long", 9), Frame(Msg.ACK, 3, good[6:-4])]
    # A damaged length that swallows the next frame: the rescan still finds it.
    swallowing = bytearray(encode(Msg.ACK, 4, b"xy"))
    swallowing[4] = 40
    assert Decoder().feed(bytes(swallowing) + good + bytes(40)) == [BadFrame("crc", 4), Frame(Msg.ACK, 3, good[6:-4])]
    assert Decoder(max_payload=64).feed(encode(Msg.OUTPUT, 1, bytes(65))) == [BadFrame("too long", 1)]


def test_serial_uris():
    dev = get_device("serial:///dev/ttyUSB0")
    assert isinstance(dev, SerialDevice) and (dev.path, dev.baud) == ("/dev/ttyUSB0", 115200)
    dev = get_device("serial:///dev/ttyACM1?baud=921600&timeout=0.5")
    assert (dev.path, dev.baud, dev.timeout) == ("/dev/ttyACM1", 921600, 0.5)
    assert dev.uri == "serial:///dev/ttyACM1?baud=921600"
    for uri, needle in (("serial://ttyUSB0", "absolute path"), ("serial:///dev/x?speed=9600", "unknown parameter"),
                        ("serial:///dev/x?baud=fast", "baud must be an integer"),
                        ("serial:///dev/x?baud=0", "positive")):
        with pytest.raises(UserError, match=needle):
            get_device(uri)
    with pytest.raises(UserError, match=r"local, rpc://HOST:PORT/KEY, qemu://TARGET or serial://PATH\?baud=N"):
        get_device("bluetooth://x")


# ---------------------------------------------------------------- the agent, end to end


def test_host_agent_matches_onnxruntime_and_edgeprune_run(net, host, cli, tmp_path):
    _, _, x, ref = net
    build, agent = host
    np.save(tmp_path / "x.npy", x)
    rc, _, err = cli("run", build.directory, "-i", tmp_path / "x.npy", "-o", tmp_path / "local.npy")
    assert rc == 0, err
    with agent_on_pty(agent) as (_, path):
        dev = SerialDevice(path)
        ours = dev.run(build, [x])[0]
        assert_close(ours, ref)
        assert_close(ours, np.load(tmp_path / "local.npy"))
        m = dev.measure(build, runs=7, warmup=2)
        assert len(m.runs_ms) == 7 and all(t > 0 for t in m.runs_ms)
        assert m.real_time and m.device == f"serial://{path}?baud=115200"
        rc, out, err = cli("measure", build.directory, "--device", f"serial://{path}?baud=115200", "--runs", "300",
                           "--json")  # more runs than one reply holds: two RUN batches
        assert rc == 0, err
        report = json.loads(out)
        assert report["runs"] == 300 and report["real_time"] is True and report["median_ms"] > 0


@pytest.mark.slow
def test_cortex_a7_agent_under_qemu(net, tmp_path):
    _, path, x, ref = net
    build = compile_model(path, "cortex-a7", tmp_path / "a7", fmt="c", package_name="net")
    agent = build_agent(build.directory)
    assert struct.unpack_from("<H", agent.read_bytes(), 18)[0] == 40  # ELF e_machine: EM_ARM
    with agent_on_pty(agent, "cortex-a7") as (_, port):
        dev = SerialDevice(port, timeout=10)
        assert_close(dev.run(build, [x])[0], ref)
        m = dev.measure(build, runs=3, warmup=1)
        assert len(m.runs_ms) == 3 and all(t > 0 for t in m.runs_ms)


def test_agent_is_portable_c99(host, tmp_path):
    """The agent core with the POSIX port, and with the bare-metal port for a Cortex-M7, under -pedantic -Werror."""
    build, _ = host
    pkg = ["-I", str(build.directory), '-DEP_PKG_HEADER="net.h"', "-DEP_PKG_RUN=net_run",
           "-DEP_PKG_LAST_ERROR=net_last_error", "-DEP_PKG_UPPER=NET"]
    strict = ["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-c"]
    compilers = [("gcc", [], "port_posix.c")]
    if shutil.which("arm-none-eabi-gcc"):
        compilers.append(("arm-none-eabi-gcc", [*get_target("cortex-m7").cflags, "-DEP_CPU_HZ=480000000"],
                          "port_baremetal.c"))
    for cc, flags, port in compilers:
        for src in ("agent.c", port):
            proc = subprocess.run([cc, *strict, *flags, *pkg, str(AGENT_DIR / src), "-o", str(tmp_path / "a.o")],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{cc} {src}: {proc.stderr}"


def test_build_agent_refuses_the_wrong_target(host):
    build, _ = host
    with pytest.raises(UserError, match="built for host, not cortex-a7"):
        build_agent(build.directory, "cortex-a7")


# ---------------------------------------------------------------- faults


def test_agent_killed_mid_run_is_a_one_line_error(host, cli):
    build, agent = host
    with agent_on_pty(agent) as (proc, path):
        killer = threading.Timer(1.0, proc.kill)
        killer.start()
        t0 = time.monotonic()
        rc, _, err = cli("measure", build.directory, "--device", f"serial://{path}", "--runs", "1000000",
                         "--warmup", "0")
        killer.join()
    assert rc == 2
    assert_one_line_error(err, f"lost the board at {path} during RUN")
    assert time.monotonic() - t0 < 10


def test_agent_rejects_damaged_and_oversized_frames_and_resyncs(host):
    import serial

    build, agent = host
    with agent_on_pty(agent) as (_, path), serial.Serial(path, timeout=2) as port:
        def reply() -> Frame:
            dec, deadline = Decoder(), time.monotonic() + 5
            while time.monotonic() < deadline:
                frames = dec.feed(port.read(max(1, port.in_waiting)))
                if frames:
                    return frames[0]
            pytest.fail("the agent did not answer")

        damaged = bytearray(encode(Msg.HELLO, 41))
        damaged[6] ^= 0x10  # a CRC byte
        port.write(b"noise" + bytes(damaged))
        err = reply()
        assert (err.type, err.seq, err.payload[0], err.payload[1]) == (Msg.ERROR, 41, Err.BAD_CRC, 41)
        port.write(MAGIC + struct.pack("<BBH", Msg.SET_INPUT, 42, 60000))
        err = reply()
        assert (err.type, err.payload[0], err.payload[1]) == (Msg.ERROR, Err.TOO_LONG, 42)
        port.write(encode(Msg.RUN, 43, struct.pack("<HH", 1, 0)))
        err = reply()
        assert (err.type, err.payload[0]) == (Msg.ERROR, Err.NO_INPUT)
        port.write(encode(Msg.SET_INPUT, 44, bytes(100))[:30])  # a sender that dies mid-frame ...
        time.sleep(0.5)  # ... leaves the line idle: the agent drops the half frame
        port.write(encode(Msg.HELLO, 44))
        hello = reply()
        assert (hello.type, hello.seq) == (Msg.HELLO_OK, 44)
        assert package_build_id(build).encode() in hello.payload


class _Damaging:
    """A pyserial port that flips one byte in each of the next `writes` frames sent and the next `reads` frames
    received (the byte after the header: a payload or CRC byte, so only the CRC can tell)."""

    def __init__(self, port, writes: int, reads: int):
        self.port, self.writes, self.reads = port, writes, reads
        self.sent = 0
        self.seen, self.pos, self.mark = bytearray(), 0, 0

    def __getattr__(self, name):
        return getattr(self.port, name)

    def write(self, data: bytes) -> int:
        self.sent += 1
        if self.writes:
            self.writes -= 1
            data = data[:6] + bytes([data[6] ^ 0x40]) + data[7:]
        return self.port.write(data)

    def read(self, n: int) -> bytes:
        data = bytearray(self.port.read(n))
        self.seen += data
        while self.reads:  # frame starts in the whole stream, so a frame split across reads is hit too
            k = self.seen.find(MAGIC, self.mark)
            if k < 0 or k + 6 >= self.pos + len(data):
                break
            if k + 6 >= self.pos:
                data[k + 6 - self.pos] ^= 0x40
                self.reads -= 1
            self.mark = k + 1
        self.pos += len(data)
        return bytes(data)


@dataclass
class _DamagingDevice(SerialDevice):
    damage_writes: int = 0
    damage_reads: int = 0
    port: _Damaging | None = None

    def _open_port(self):
        self.port = _Damaging(super()._open_port(), self.damage_writes, self.damage_reads)
        return self.port


def test_damaged_frames_are_resent_then_refused(net, host):
    _, _, x, ref = net
    build, agent = host
    with agent_on_pty(agent) as (_, path):
        for writes, reads in ((2, 0), (0, 2), (1, 1)):  # within the 3 resends: the run succeeds
            dev = _DamagingDevice(path, timeout=2, damage_writes=writes, damage_reads=reads)
            assert_close(dev.run(build, [x])[0], ref)
            assert dev.port.writes == 0 and dev.port.reads == 0
        clean = _DamagingDevice(path)
        clean.run(build, [x])
        assert dev.port.sent > clean.port.sent  # the damaged ones were resent
        for writes, reads, needle in ((99, 0, "damaged request"), (0, 99, "damaged reply")):
            dev = _DamagingDevice(path, timeout=2, retries=2, damage_writes=writes, damage_reads=reads)
            with pytest.raises(UserError, match=f"kept arriving damaged during HELLO \\({needle}; 3 tries\\)"):
                dev.run(build, [x])


def test_silent_port_times_out(host, cli):
    build, _ = host
    master, slave = os.openpty()  # nothing behind the master: a board that never answers
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f"no answer from the board at {path} to HELLO within 0.2 s \\(2 tries\\)"):
            SerialDevice(path, timeout=0.2, retries=1).measure(build, runs=3, warmup=0)
        assert time.monotonic() - t0 < 2
        rc, _, err = cli("measure", build.directory, "--device", f"serial://{path}?timeout=0.2")
        assert rc == 2
        assert_one_line_error(err, "no answer from the board", "baud rate (115200)")
        assert time.monotonic() - t0 < 5
    finally:
        os.close(master)
        os.close(slave)


def test_wrong_firmware_is_refused(net, host, cli, tmp_path):
    _, _, x, _ = net
    build, _ = host
    model, x1 = zoo.make(NET, RES, seed=1)  # same network, other weights: another build
    other = compile_model(zoo.export_onnx(model, x1, tmp_path / "other.onnx"), "host", tmp_path / "other",
                          fmt="c", package_name="net")
    theirs, ours = package_build_id(other), package_build_id(build)
    assert theirs != ours
    with agent_on_pty(build_agent(other.directory)) as (_, path):
        with pytest.raises(UserError, match=re.escape(f"runs build {theirs}, not {build.directory} (build {ours})")):
            SerialDevice(path).run(build, [x])
        rc, _, err = cli("measure", build.directory, "--device", f"serial://{path}?baud=115200")
        assert rc == 2
        assert_one_line_error(err, f"runs build {theirs}", f"PKG={build.directory}", "flash")
        assert SerialDevice(path).run(other, [x1.numpy()])[0].shape == tuple(other.outputs[0].shape)


# ---------------------------------------------------------------- hostile boards (issue 18)


def _stream(make, seconds: float = 6.0, every: float = 0.2):
    """make(0), a pause, make(1), ... for `seconds`: a board that keeps talking (bounded, so that a host that would
    wait forever fails the test's time bound instead of hanging it)."""
    for k in range(int(seconds / every)):
        yield make(k)
        yield every


def _timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
    except UserError as e:
        return str(e), time.monotonic() - t0
    pytest.fail("no UserError")


def test_progress_does_not_hold_other_requests(host):
    """A board that answers HELLO with PROGRESS every 0.2 s: PROGRESS belongs to RUN, so HELLO still times out."""
    build, _ = host

    def answer(board, f):
        return _stream(lambda k: progress(f.seq, 1)) if f.type == Msg.HELLO else None

    with fake_board(build, answer) as board:
        err, elapsed = _timed(SerialDevice(board.path, timeout=0.5, retries=1).measure, build, runs=3, warmup=0)
    assert "no answer from the board" in err and "to HELLO within 0.5 s (2 tries)" in err
    assert elapsed < 4, elapsed  # 1 s of waiting; unbounded (the board's 6 s of PROGRESS, then more) before


@pytest.mark.parametrize("counts", ["repeated", "past the runs"])
def test_progress_holds_a_run_only_while_its_count_rises_within_the_runs(host, counts):
    """PROGRESS(1) again and again, or 1, 2, 3, ... past the 3 runs asked for: neither keeps RUN waiting."""
    build, _ = host
    count = (lambda k: 1) if counts == "repeated" else (lambda k: k + 1)

    def answer(board, f):
        return _stream(lambda k: progress(f.seq, count(k))) if f.type == Msg.RUN else None

    with fake_board(build, answer) as board:
        dev = SerialDevice(board.path, timeout=0.5, run_timeout=0.5, retries=1)
        err, elapsed = _timed(dev.measure, build, runs=3, warmup=0)
    assert "to RUN within 1 s (2 tries)" in err
    assert elapsed < 5, elapsed  # at most 2.4 s of waiting


def test_a_run_has_an_overall_cap(host):
    """Counts that rise within the 33 runs, one every 0.2 s, would hold RUN 6.4 s: it ends at its cap,
    timeout + 33 x run_timeout = 2.15 s, without a resend."""
    build, _ = host

    def answer(board, f):
        return _stream(lambda k: progress(f.seq, k + 1), seconds=6.4) if f.type == Msg.RUN else None

    with fake_board(build, answer) as board:
        dev = SerialDevice(board.path, timeout=0.5, run_timeout=0.05, retries=1)
        err, elapsed = _timed(dev.measure, build, runs=3, warmup=30)
        runs_sent = sum(f.type == Msg.RUN for f in board.requests)
    assert f"the board at {board.path} did not finish RUN within 2.15 s" in err
    assert 2.1 < elapsed < 5, elapsed
    assert runs_sent == 1


@pytest.mark.parametrize("value", [float("nan"), -5.0, float("inf"), 0.0])
def test_impossible_times_are_refused(host, cli, value):
    """NaN, negative, infinite or zero microseconds never reach a Measurement: measure and check fail in one line."""
    build, _ = host
    with fake_board(build, time_us=value) as board:
        err, _ = _timed(SerialDevice(board.path).measure, build, runs=3, warmup=0)
        assert "reported an impossible time" in err
        rc, out, err = cli("measure", build.directory, "--device", f"serial://{board.path}", "--runs", "3", "--json")
        assert rc == 2 and out == ""
        assert_one_line_error(err, "impossible time", f"{value:g} us")
        rc, _, err = cli("check", build.directory, "--device", f"serial://{board.path}", "--latency", "1s",
                         "--runs", "3")
        assert rc == 2
        assert_one_line_error(err, "impossible time")


def test_errors_about_other_frames_do_not_use_up_the_retries(host):
    """A session opened behind 20 RUN replies and 4 BAD_CRC errors for frames that are not its own: the errors
    are not about its HELLO, which is answered after them."""
    build, _ = host

    def backlog(seq):
        for k in range(20):
            yield frame(Msg.TIMES, seq + 100 + k, struct.pack("<Hf", 1, 100.0))
            yield 0.02
            if k % 5 == 4:
                yield error(seq + 60 + k, Err.BAD_CRC, b"bad CRC")
        yield hello_ok(build, seq)

    def answer(board, f):
        return backlog(f.seq) if f.type == Msg.HELLO and len(board.requests) == 1 else None

    with fake_board(build, answer) as board:
        m = SerialDevice(board.path, timeout=2).measure(build, runs=3, warmup=0)
        assert m.runs_ms == [0.1] * 3
        assert sum(f.type == Msg.HELLO for f in board.requests) == 1


def test_an_error_about_another_seq_then_silence_resends_at_once(host):
    """Our HELLO's seq byte damaged on the way: the agent's BAD_CRC names another seq, and nothing else comes. Once
    the line is quiet, that error is taken as ours and HELLO is resent, well before the 5 s timeout."""
    build, _ = host

    def answer(board, f):
        if f.type == Msg.HELLO and len(board.requests) == 1:
            return [error(f.seq ^ 0x80, Err.BAD_CRC, b"bad CRC")]
        return None

    with fake_board(build, answer) as board:
        t0 = time.monotonic()
        SerialDevice(board.path, timeout=5).measure(build, runs=3, warmup=0)
        assert time.monotonic() - t0 < 2.5
        assert sum(f.type == Msg.HELLO for f in board.requests) == 2


def test_device_text_is_one_printable_line(host, cli):
    """A 3 KB refusal with newlines and terminal escapes, and a build id with a newline: one short line each."""
    build, _ = host
    rude = b"no\nTraceback (most recent call last):\n\x1b[2J" + b"x" * 3000

    def refuse(board, f):
        return [error(f.seq, Err.BAD_ARGS, rude)] if f.type == Msg.HELLO else None

    def odd_id(board, f):
        return [hello_ok(build, f.seq, build_id=b"abc\nTraceback\x1b[2J")] if f.type == Msg.HELLO else None

    for answer, needle in ((refuse, "refused HELLO: no?Traceback (most recent call last):??[2Jxxx"),
                           (odd_id, "runs build abc?Traceback?[2J, not")):
        with fake_board(build, answer) as board:
            rc, _, err = cli("measure", build.directory, "--device", f"serial://{board.path}")
        assert rc == 2
        # assert_one_line_error would refuse the board's own word "Traceback": the checks here are the same.
        (line,) = err.splitlines()
        assert line.startswith("edgeprune: error: ") and needle in line, line
        assert "\x1b" not in err and len(line) < 400, line


def test_warmup_and_runs_of_one_request_fit_the_progress_counter(host):
    """PROGRESS counts runs in 16 bits: no RUN asks for more than 65535 runs in all."""
    build, _ = host
    with fake_board(build) as board:
        SerialDevice(board.path).measure(build, runs=600, warmup=65534)
        asked = [struct.unpack("<HH", f.payload) for f in board.requests if f.type == Msg.RUN]
    assert all(runs + warmup <= 0xFFFF for runs, warmup in asked), asked
    assert sum(runs for runs, _ in asked) == 600
    with pytest.raises(UserError, match="at most 65534 warm-up runs"):
        SerialDevice("/dev/null").measure(build, runs=3, warmup=65535)


# ---------------------------------------------------------------- the agent's own defences (issue 18)


def _read_frames(port, count: int, seconds: float = 3.0) -> list:
    """The next `count` frames from the agent (fewer if it goes quiet for `seconds`)."""
    dec, got, deadline = Decoder(), [], time.monotonic() + seconds
    while len(got) < count and time.monotonic() < deadline:
        got += dec.feed(port.read(max(1, port.in_waiting)))
    return got


def test_agent_rescans_the_bytes_of_a_rejected_frame(host):
    """A good frame hidden in the bytes of a rejected one is still found: after TOO_LONG, after a bad CRC, and
    after a line that went idle mid-frame (the host's Decoder does the same)."""
    import serial

    build, agent = host
    hello = encode(Msg.HELLO, 9)
    junk_len16 = MAGIC + struct.pack("<BBH", Msg.SET_INPUT, 7, 16)  # waits for 16 + 4 more bytes
    cases = {  # what goes on the line -> the frames the agent answers with
        "too long": (MAGIC + bytes([Msg.RUN, 0x33]) + hello,  # HELLO's magic read as the length 0x50A5
                     [(Msg.ERROR, 0x33), (Msg.HELLO_OK, 9)]),
        "bad crc": (junk_len16 + hello + bytes(10), [(Msg.ERROR, 7), (Msg.HELLO_OK, 9)]),
        "idle": (junk_len16 + hello, [(Msg.HELLO_OK, 9)]),
    }
    with agent_on_pty(agent) as (_, path), serial.Serial(path, timeout=0.1) as port:
        for name, (line, want) in cases.items():
            port.write(line)
            got = [(f.type, f.seq) for f in _read_frames(port, len(want))]
            assert got == want, name
            time.sleep(0.4)  # the agent drops what is left of the junk when the line idles


def test_agent_refuses_more_runs_than_its_progress_counts(host):
    """RUN with 65535 warm-up runs and 1 timed: PROGRESS would wrap, so the agent refuses it (before the input
    check: no input needed here)."""
    import serial

    _, agent = host
    with agent_on_pty(agent) as (_, path), serial.Serial(path, timeout=0.1) as port:
        port.write(encode(Msg.RUN, 5, struct.pack("<HH", 1, 0xFFFF)))
        (f,) = _read_frames(port, 1)
        assert (f.type, f.payload[0]) == (Msg.ERROR, Err.BAD_ARGS)
        assert b"65535" in f.payload
        port.write(encode(Msg.RUN, 6, struct.pack("<HH", 1, 0xFFFE)))
        (f,) = _read_frames(port, 1)
        assert (f.type, f.payload[0]) == (Msg.ERROR, Err.NO_INPUT)


def test_agent_bounds_the_build_id_by_its_payload(host, tmp_path):
    """An agent built with 64-byte frames for a package with a 60-character id: HELLO_OK carries the first 50
    characters (64 - 14) and nothing is written past the frame buffer (the agent runs under ASan and UBSan)."""
    import serial

    build, _ = host
    pkg = tmp_path / "pkg"
    shutil.copytree(build.directory, pkg)
    header = pkg / "net.h"
    long_id = "f" * 60
    header.write_text(re.sub(r'(#define NET_BUILD_ID ")[^"]*"', rf'\g<1>{long_id}"', header.read_text()))
    agent = sanitized_agent(build, tmp_path / "agent", ["EP_MAX_PAYLOAD=64"], package=pkg)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr, agent_on_pty(agent, stderr=stderr, env=SANITIZER_ENV) as (proc, path), \
            serial.Serial(path, timeout=0.1) as port:
        port.write(encode(Msg.HELLO, 3))
        got = _read_frames(port, 1)
        alive = proc.poll() is None
    assert sanitizer_report(log.read_text()) is None, log.read_text()
    assert alive and len(got) == 1 and got[0].type == Msg.HELLO_OK
    assert len(got[0].payload) == 64 and got[0].payload[13] == 50 and got[0].payload[14:] == b"f" * 50
