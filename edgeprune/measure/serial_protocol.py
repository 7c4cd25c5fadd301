"""Frames of the edgeprune serial protocol (the C side and the full message table: codegen/agent/protocol.h).

    magic A5 50 | type u8 | seq u8 | len u16 | payload | crc32 u32      (little-endian; CRC over type..payload)

Pure byte handling, no I/O: `encode` makes a frame, `Decoder` turns a byte stream back into frames, skipping
noise and reporting damaged ones so the caller can resend.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

PROTOCOL_VERSION = 1
MAGIC = b"\xa5\x50"
HEAD = struct.Struct("<BBH")  # type, seq, len (after the magic)
OVERHEAD = len(MAGIC) + HEAD.size + 4
MAX_PAYLOAD = 4096  # the most any agent may announce; longer frames are noise


class Msg(IntEnum):
    HELLO = 0x01
    SET_INPUT = 0x02
    RUN = 0x03
    GET_OUTPUT = 0x04
    ERROR = 0x7F
    ACK = 0x80
    HELLO_OK = 0x81
    TIMES = 0x83
    OUTPUT = 0x84
    PROGRESS = 0x85


class Err(IntEnum):
    BAD_CRC = 1
    TOO_LONG = 2
    UNKNOWN_TYPE = 3
    BAD_ARGS = 4
    MODEL_FAILED = 5
    NO_INPUT = 6


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int
    payload: bytes = b""


@dataclass(frozen=True)
class BadFrame:
    """A frame that arrived damaged: its CRC does not match ("crc") or its length is impossible ("too long")."""

    reason: str
    seq: int


def encode(msg: int, seq: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = HEAD.pack(msg, seq & 0xFF, len(payload)) + payload
    return MAGIC + body + struct.pack("<I", zlib.crc32(body))


class Decoder:
    """Bytes in, frames out. After a damaged frame it rescans from the byte after that frame's magic: a good frame
    may start inside the bytes a corrupted length swallowed."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        self.buf += data
        out: list[Frame | BadFrame] = []
        while True:
            start = self.buf.find(MAGIC)
            if start < 0:  # keep a trailing first magic byte: its partner may be in the next read
                del self.buf[: len(self.buf) - (self.buf[-1:] == MAGIC[:1])]
                return out
            del self.buf[:start]
            if len(self.buf) < len(MAGIC) + HEAD.size:
                return out
            msg, seq, n = HEAD.unpack_from(self.buf, len(MAGIC))
            if n > self.max_payload:
                out.append(BadFrame("too long", seq))
                del self.buf[:1]
                continue
            end = len(MAGIC) + HEAD.size + n
            if len(self.buf) < end + 4:
                return out
            (crc,) = struct.unpack_from("<I", self.buf, end)
            if crc != zlib.crc32(self.buf[len(MAGIC): end]):
                out.append(BadFrame("crc", seq))
                del self.buf[:1]
                continue
            out.append(Frame(msg, seq, bytes(self.buf[len(MAGIC) + HEAD.size: end])))
            del self.buf[: end + 4]
