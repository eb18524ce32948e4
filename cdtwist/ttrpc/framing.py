# -*- test-case-name: tests.test_ttrpc_framing -*-
"""ttrpc frames: a 10-byte big-endian header plus at most 4 MiB of data.

This mirrors ``channel.go`` of github.com/containerd/ttrpc so the bytes on
the wire are the Go library's.  Decoding is incremental (Twisted hands us
arbitrary chunks) and never buffers the body of an oversized frame: like
Go's ``Discard`` it only counts the bytes away, then reports the frame so
the caller can answer RESOURCE_EXHAUSTED on that stream and keep the
connection.  Nothing here touches a reactor, so both the Twisted protocols
and the asyncio client share it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER",
    "HEADER_LENGTH",
    "MESSAGE_LENGTH_MAX",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "OversizedFrame",
    "OversizedMessageError",
    "encode_frame",
    "oversized_message",
]

#: ``[0:4]`` data length, ``[4:8]`` stream id, ``[8]`` type, ``[9]`` flags.
HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size
#: ``messageLengthMax`` in channel.go.
MESSAGE_LENGTH_MAX = 4 << 20
_MAX_STREAM_ID = 0xFFFFFFFF


class MessageType(enum.IntEnum):
    """``messageType``: the only three the protocol defines; others are ignored."""

    REQUEST = 0x1
    RESPONSE = 0x2
    DATA = 0x3


#: The remote side will send no more data on this stream.
FLAG_REMOTE_CLOSED = 0x1
#: The remote side will send data (client-streaming request).
FLAG_REMOTE_OPEN = 0x2
#: The frame carries no payload (Go's implementation flag, not in PROTOCOL.md).
FLAG_NO_DATA = 0x4


def oversized_message(length: int, maximum: int = MESSAGE_LENGTH_MAX) -> str:
    """Go's RESOURCE_EXHAUSTED text, word for word (clients may match on it)."""
    return f"message length {length} exceed maximum message size of {maximum}"


class OversizedMessageError(ValueError):
    """Refusal to send a frame above the limit (Go 1.2's ``OversizedMessageErr``)."""

    def __init__(self, length: int, maximum: int = MESSAGE_LENGTH_MAX) -> None:
        self.length = length
        self.maximum = maximum
        super().__init__(oversized_message(length, maximum))


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message; ``type`` stays an int so unknown types survive decoding."""

    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose body was discarded because ``length`` exceeds the limit."""

    stream_id: int
    type: int
    flags: int
    length: int
    maximum: int = MESSAGE_LENGTH_MAX

    @property
    def message(self) -> str:
        return oversized_message(self.length, self.maximum)


def encode_frame(
    stream_id: int,
    msg_type: int,
    data: bytes = b"",
    flags: int = 0,
    *,
    max_length: int | None = MESSAGE_LENGTH_MAX,
) -> bytes:
    """Header plus data, ready for ``transport.write``.

    Raises :class:`OversizedMessageError` rather than emit a frame the peer
    must discard; ``max_length=None`` lifts the check (tests of the peer).
    """
    if max_length is not None and len(data) > max_length:
        raise OversizedMessageError(len(data), max_length)
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} does not fit in 32 bits")
    return HEADER.pack(len(data), stream_id, msg_type, flags) + bytes(data)


class FrameDecoder:
    """Incremental decoder: :meth:`feed` chunks, get back whole frames in order.

    Memory is bounded by one frame of at most ``max_length`` bytes plus a
    header: an oversized frame's body is skipped as it streams past.
    """

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._skipping: OversizedFrame | None = None
        self._skip_left = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (or still to discard); 0 at a frame boundary."""
        return len(self._buffer) + self._skip_left

    def feed(self, chunk: bytes) -> list[Frame | OversizedFrame]:
        """Consume ``chunk``; return every frame it completes, oldest first."""
        out: list[Frame | OversizedFrame] = []
        view = memoryview(chunk)
        if self._skipping is not None:
            take = min(self._skip_left, len(view))
            self._skip_left -= take
            view = view[take:]
            if self._skip_left:
                return out
            out.append(self._skipping)
            self._skipping = None
        if not view:
            return out
        buf = self._buffer
        buf += view
        offset = 0
        end = len(buf)
        while end - offset >= HEADER_LENGTH:
            length, stream_id, msg_type, flags = HEADER.unpack_from(buf, offset)
            if length > self.max_length:
                offset += HEADER_LENGTH
                skipped = min(length, end - offset)
                offset += skipped
                report = OversizedFrame(stream_id, msg_type, flags, length, self.max_length)
                if skipped < length:
                    self._skipping = report
                    self._skip_left = length - skipped
                    break
                out.append(report)
                continue
            if end - offset - HEADER_LENGTH < length:
                break
            start = offset + HEADER_LENGTH
            out.append(Frame(stream_id, msg_type, flags, bytes(buf[start : start + length])))
            offset = start + length
        del buf[:offset]
        return out
