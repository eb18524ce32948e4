# -*- test-case-name: tests.test_ttrpc_protocol,tests.test_ttrpc_interop -*-
"""The Twisted half shared by the ttrpc server and client protocols.

:class:`FramedProtocol` turns ``dataReceived`` chunks into frames and
guarantees three things both sides rely on: frames are written only from
the reactor thread (a handler that fired its Deferred from a worker thread
cannot interleave bytes), a bug while handling a frame drops the connection
with a logged error instead of leaving it half-parsed, and a peer that
vanishes mid-frame is logged.  :func:`peer_credentials` reads
``SO_PEERCRED`` for Go's ``UnixCredentialsFunc`` handshake.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Protocol
from twisted.python import threadable
from twisted.python.failure import Failure

from cdtwist.log import get_logger
from cdtwist.ttrpc.framing import (
    HEADER,
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    OversizedFrame,
    OversizedMessageError,
)

__all__ = ["FramedProtocol", "PeerCredentials", "peer_credentials"]

log = get_logger(__name__)

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """``struct ucred`` of the connecting process, as the kernel recorded it at connect()."""

    pid: int
    uid: int
    gid: int


def peer_credentials(transport: object) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a UNIX-socket transport; None for anything else (memory, TCP)."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    sock = get_handle()
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


class FramedProtocol(Protocol):
    """Frame I/O for one ttrpc connection; subclasses implement the two ``*Received`` hooks."""

    #: Reactor used for timers and for hopping back from worker threads.
    reactor: Any = None

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self.max_length = max_length
        self._decoder = FrameDecoder(max_length)
        self.closed = False

    def _get_reactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return self.reactor

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for item in self._decoder.feed(data):
                if self.closed:
                    return
                if isinstance(item, Frame):
                    self.frameReceived(item)
                else:
                    self.oversizedFrameReceived(item)
        except Exception:
            log.failure("ttrpc: error handling message, closing connection")
            self.abort()

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def oversizedFrameReceived(self, frame: OversizedFrame) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if self._decoder.buffered:
            log.error(
                "ttrpc: connection closed inside a frame, {pending} bytes unread",
                pending=self._decoder.buffered,
            )

    # -- output ------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now: nothing more is read or written."""
        self.closed = True
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def send_frame(self, stream_id: int, msg_type: int, data: bytes = b"", flags: int = 0) -> bool:
        """Write one frame; False if the connection is gone.

        Raises :class:`OversizedMessageError` before writing anything, so
        callers can turn it into a status instead.  Safe from any thread.
        """
        if len(data) > self.max_length:
            raise OversizedMessageError(len(data), self.max_length)
        header = HEADER.pack(len(data), stream_id, msg_type, flags)
        if threadable.ioThread is not None and not threadable.isInIOThread():
            reactor = IReactorFromThreads(self._get_reactor())
            reactor.callFromThread(self._write, header, data)
            return not self.closed
        return self._write(header, data)

    def _write(self, header: bytes, data: bytes) -> bool:
        if self.closed or self.transport is None:
            return False
        if data:
            self.transport.writeSequence([header, data])
        else:
            self.transport.write(header)
        return True
