"""Fuzzing the serial protocol from both ends, for a bounded number of cases with a fixed seed (CI runs it):

- the host's Decoder on random and mutated frames in random chunks: it never raises, holds at most one frame of
  bytes, decodes the same however the stream is cut, invents no frame, and finds every intact frame again however
  the bytes around it were damaged;
- the agent built with -fsanitize=address,undefined (default and 64-byte frames) on random and mutated requests,
  through a pipe on its stdin/stdout (the POSIX port's other stream; a pty's line discipline only slows it): no
  sanitizer report, every reply well formed, and every intact request answered exactly once (frames hidden in
  rejected or half-received ones are found again). A watchdog bounds the run should the agent wedge.

EDGEPRUNE_FUZZ_SEED picks another seed and EDGEPRUNE_FUZZ_SCALE multiplies the case counts (for a longer run by hand).
"""

from __future__ import annotations

import math
import os
import random
import select
import struct
import subprocess
import threading
import time

import pytest
from serial_helpers import SANITIZER_ENV, sanitized_agent, sanitizer_report

from edgeprune.codegen.build import compile_model
from edgeprune.measure.serial_protocol import MAGIC, MAX_PAYLOAD, OVERHEAD, BadFrame, Decoder, Err, Frame, Msg, encode
from edgeprune.models import zoo

SEED = int(os.environ.get("EDGEPRUNE_FUZZ_SEED", "18"))
SCALE = float(os.environ.get("EDGEPRUNE_FUZZ_SCALE", "1"))
DECODER_STREAMS = int(20000 * SCALE)  # about 25 pieces each: some 500k frames, intact or damaged, and noise
AGENT_REQUESTS = int(300000 * SCALE)  # per agent build
IDLE_PAUSES = 4  # per agent build: a half frame, then a line idle past the agent's 250 ms
WATCHDOG_S = 60 + 240 * SCALE  # an agent still running after this is wedged: killed, and the test fails
REPLIES = {Msg.ERROR, Msg.ACK, Msg.HELLO_OK, Msg.TIMES, Msg.OUTPUT, Msg.PROGRESS}


# ---------------------------------------------------------------- damage


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """`frame` damaged one way: bits flipped, a byte replaced, cut short, bytes inserted or removed, its length field
    changed, or a stray magic put in.

    Cuts, insertions and removals stay at least 4 bytes (the CRC) before the end: a frame cut by one byte and followed
    by a byte equal to the one cut *is* the frame again (odds 1/256), which the decoder rightly takes, and then the
    next frame loses its first byte. Four bytes make those odds 2**-32.
    """
    b = bytearray(frame)
    kind, cut = rng.randrange(7), rng.randrange(len(b) - 3)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b[rng.randrange(len(b))] = rng.randrange(256)  # sometimes the same value: then the frame is intact
    elif kind == 2:
        del b[cut:]
    elif kind == 3:
        b[cut:cut] = rng.randbytes(rng.randint(1, 8))
    elif kind == 4:
        del b[cut: min(cut + rng.randint(1, 8), len(b) - 4)]
    elif kind == 5:
        near = [len(b) - 10 + d for d in (-1, 1) if len(b) - 10 + d >= 0]  # off by one from the true length
        b[4:6] = struct.pack("<H", rng.choice([rng.randrange(0x10000), *near, 4097, 65535]))
    else:
        b[cut:cut] = MAGIC
    return bytes(b)


def noise(rng: random.Random) -> bytes:
    """Line noise, now and then with a magic or half of one in it."""
    junk = bytearray(rng.randbytes(rng.randint(1, 40)))
    if rng.random() < 0.3:
        at = rng.randrange(len(junk) + 1)
        junk[at:at] = rng.choice([MAGIC, MAGIC[:1], MAGIC + bytes([rng.randrange(256)])])
    return bytes(junk)


def is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


# ---------------------------------------------------------------- the host's Decoder


def random_frame(rng: random.Random, max_payload: int) -> Frame:
    n = rng.choice([0, rng.randint(0, 16), rng.randint(0, 64), rng.randint(0, max_payload)])
    return Frame(rng.randrange(256), rng.randrange(256), rng.randbytes(n))


def decoder_stream(rng: random.Random, max_payload: int) -> tuple[bytes, list[Frame], int]:
    """Intact frames, damaged frames, noise and bare headers in random order; returns the stream, its intact
    frames and how many pieces it has. It ends with a frame's worth of zeros, so that any length read from damage
    is used up."""
    pieces, intact = [], []
    for _ in range(rng.randint(1, 50)):
        roll = rng.random()
        f = random_frame(rng, max_payload)
        if roll < 0.4:
            pieces.append(encode(f.type, f.seq, f.payload))
            intact.append(f)
        elif roll < 0.8:
            pieces.append(mutate(rng, encode(f.type, f.seq, f.payload)))
        elif roll < 0.9:
            pieces.append(noise(rng))
        else:
            pieces.append(MAGIC + struct.pack("<BBH", f.type, f.seq, rng.randrange(0x10000)))
    return b"".join(pieces) + bytes(max_payload + OVERHEAD), intact, len(pieces)


def feed_in_chunks(rng: random.Random, stream: bytes, max_payload: int) -> list[Frame | BadFrame]:
    dec, out, at = Decoder(max_payload), [], 0
    while at < len(stream):
        step = rng.choice([1, rng.randint(1, 16), rng.randint(1, 600)])
        out += dec.feed(stream[at: at + step])
        at += step
        assert len(dec.buf) < OVERHEAD + max_payload  # at most one frame being received
    return out


@pytest.mark.slow
def test_decoder_fuzz():
    rng = random.Random(SEED)
    t0, frames, pieces, total = time.monotonic(), 0, 0, 0
    for case in range(DECODER_STREAMS):
        max_payload = rng.choice([64, 1024, MAX_PAYLOAD])
        stream, intact, n = decoder_stream(rng, max_payload)
        whole = Decoder(max_payload).feed(stream)
        assert feed_in_chunks(rng, stream, max_payload) == whole, f"case {case}: depends on how the stream is cut"
        got = [f for f in whole if isinstance(f, Frame)]
        assert all(len(f.payload) <= max_payload and encode(f.type, f.seq, f.payload) in stream for f in got), case
        assert is_subsequence(intact, got), f"case {case}: an intact frame was lost"
        frames, pieces, total = frames + len(intact), pieces + n, total + len(stream)
    print(f"decoder: {DECODER_STREAMS} streams, {pieces} pieces ({frames} intact frames, the rest damaged frames, "
          f"noise and bare headers), {total / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s")


# ---------------------------------------------------------------- the agent under ASan and UBSan


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model, x = zoo.make("gated_add", 16)
    path = zoo.export_onnx(model, x, root / "net.onnx")
    return compile_model(path, "host", root / "pkg", fmt="c", package_name="net")


class Requests:
    """Requests for an agent whose frames hold `max_payload` bytes: right and wrong sizes, offsets and counts, unknown
    types, few runs (a RUN that would run long is always one the agent refuses first)."""

    def __init__(self, rng: random.Random, input_bytes: int, output_bytes: int, max_payload: int):
        self.rng, self.input_bytes, self.output_bytes, self.max_payload = rng, input_bytes, output_bytes, max_payload

    def payload(self, kind: int) -> bytes:
        rng, room = self.rng, self.max_payload
        if kind == Msg.SET_INPUT:
            offset = rng.choice([0, rng.randrange(self.input_bytes + 8), rng.randrange(1 << 32)])
            return struct.pack("<I", offset) + rng.randbytes(rng.randint(0, room - 4))
        if kind == Msg.RUN:
            max_runs = (room - 2) // 4
            runs, warmup = rng.choice([(rng.randint(0, 3), rng.randint(0, 2)), (max_runs + 1, 65535),
                                       (0, rng.randrange(0x10000)), (1, 65535), (rng.randrange(0x10000), 9)])
            return struct.pack("<HH", runs, warmup)
        if kind == Msg.GET_OUTPUT:
            offset = rng.choice([0, rng.randrange(self.output_bytes + 8), rng.randrange(1 << 32)])
            return struct.pack("<IH", offset, rng.choice([rng.randint(0, room), rng.randrange(0x10000)]))
        return rng.randbytes(rng.randint(0, 8))

    def frame(self) -> bytes:
        rng = self.rng
        kind = rng.choice([Msg.HELLO, Msg.SET_INPUT, Msg.SET_INPUT, Msg.RUN, Msg.GET_OUTPUT, rng.randrange(256)])
        p = self.payload(kind)
        if rng.random() < 0.1:  # a payload of the wrong size for its type
            p = p[: rng.randrange(len(p) + 1)] if rng.random() < 0.5 else p + rng.randbytes(rng.randint(1, 4))
        return encode(kind, rng.randrange(256), p[: self.max_payload])


class Replies(threading.Thread):
    """Everything the agent writes, decoded as it comes (so the agent never blocks on a full pipe)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.decoder = stream, Decoder()
        self.frames: list[Frame | BadFrame] = []
        self.last = time.monotonic()

    def run(self) -> None:
        while data := os.read(self.stream.fileno(), 65536):
            self.frames += self.decoder.feed(data)
            self.last = time.monotonic()

    def wait_quiet(self, seconds: float = 1.0, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() - self.last < seconds and time.monotonic() < deadline:
            time.sleep(0.1)


def plan(rng: random.Random, requests: Requests, count: int, max_payload: int) -> tuple[list[list[bytes]], int]:
    """`count` requests, a third of them damaged, with noise between, as pieces in runs separated by idle pauses;
    and how many request frames lie whole in the stream (each must be answered once). Counted on the stream, not
    per piece: damage at a piece's edge can be undone by its neighbour (a piece cut to a lone magic byte, then one
    that lost its first byte)."""
    runs, pieces, spans, at = [], [], [], 0
    pauses = {rng.randrange(count) for _ in range(IDLE_PAUSES)}
    for i in range(count):
        f = requests.frame()
        if i in pauses:  # a damaged length swallows this request, then the line idles
            piece = MAGIC + struct.pack("<BBH", Msg.SET_INPUT, 0, max_payload) + f
        else:
            piece = mutate(rng, f) if rng.random() < 0.35 else f
        if rng.random() < 0.1:
            piece += noise(rng)
        pieces.append(piece)
        spans.append((at, at + len(piece), f))
        at += len(piece)
        if i in pauses:
            runs.append(pieces)
            pieces = []
    runs.append([*pieces, bytes(max_payload + OVERHEAD)])  # uses up any length read from damage
    stream = b"".join(b"".join(r) for r in runs)
    return runs, len(whole_frames(stream, spans))


def whole_frames(stream: bytes, spans: list[tuple[int, int, bytes]]) -> set[int]:
    """Where in `stream` a request's frame lies whole, overlapping that request's own piece (start, end): by
    position, as the same frame can be sent twice (a refused RUN has a fixed payload and 256 seqs)."""
    found = set()
    for start, end, f in spans:
        at = stream.find(f, max(0, start - len(f) + 1), end + len(f) - 1)
        while 0 <= at < end:
            found.add(at)
            at = stream.find(f, at + 1, end + len(f) - 1)
    return found


def write_whole_pieces(stdin, pieces: list[bytes]) -> None:
    """Pieces in writes of at most PIPE_BUF bytes, which a pipe delivers whole: a writer descheduled for longer than
    the agent's idle time never leaves half a frame in the line."""
    chunk = bytearray()
    for piece in pieces:
        if len(chunk) + len(piece) > select.PIPE_BUF:
            os.write(stdin.fileno(), chunk)
            chunk = bytearray()
        chunk += piece
    os.write(stdin.fileno(), chunk)


def drive(agent, runs: list[list[bytes]]) -> list[Frame | BadFrame]:
    """The runs of pieces into the agent's stdin, idling 0.4 s between runs; returns its replies, after checking
    that it reported nothing and exited cleanly at the end of the input."""
    proc = subprocess.Popen([str(agent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **SANITIZER_ENV})
    watchdog = threading.Timer(WATCHDOG_S, proc.kill)
    watchdog.start()
    replies = Replies(proc.stdout)
    replies.start()
    try:
        for k, pieces in enumerate(runs):
            if k:
                time.sleep(0.4)  # past the agent's 250 ms: it gives up on the half frame and hunts through it again
            write_whole_pieces(proc.stdin, pieces)
        replies.wait_quiet()
        proc.stdin.close()  # end of file: the agent returns from ep_agent_serve
        proc.wait(30)
    except BrokenPipeError:
        proc.wait(30)  # the agent died (a sanitizer report, or the watchdog): its stderr says which
    finally:
        watchdog.cancel()
        proc.kill()
    replies.join(5)
    report = sanitizer_report(proc.stderr.read().decode(errors="replace"))
    assert report is None and proc.returncode == 0, report or f"agent exited with {proc.returncode}"
    return replies.frames


def _about_damage(f: Frame) -> bool:
    return f.type == Msg.ERROR and f.payload[:1] in (bytes([Err.BAD_CRC]), bytes([Err.TOO_LONG]))


@pytest.mark.slow
@pytest.mark.parametrize("max_payload", [1024, 64])
def test_agent_fuzz_under_sanitizers(package, tmp_path, max_payload):
    rng = random.Random(SEED * 1000 + max_payload)
    agent = sanitized_agent(package, tmp_path / "agent", [f"EP_MAX_PAYLOAD={max_payload}"])
    requests = Requests(rng, math.prod(package.inputs[0].shape) * 4, math.prod(package.outputs[0].shape) * 4,
                        max_payload)
    t0 = time.monotonic()
    runs, intact = plan(rng, requests, AGENT_REQUESTS, max_payload)
    replies = drive(agent, runs)
    assert not [f for f in replies if isinstance(f, BadFrame)], "the agent sent a damaged frame"
    assert all(f.type in REPLIES and len(f.payload) <= max_payload for f in replies)
    # Each intact request gets one answer; a damaged one gets BAD_CRC or TOO_LONG (never a frame it could pass for).
    answers = sum(f.type != Msg.PROGRESS and not _about_damage(f) for f in replies)
    assert answers == intact, f"{intact} intact requests, {answers} answers"
    print(f"agent (EP_MAX_PAYLOAD={max_payload}): {AGENT_REQUESTS} requests ({intact} intact), {len(replies)} "
          f"replies, {time.monotonic() - t0:.1f} s")
