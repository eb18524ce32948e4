# -*- test-case-name: tests.test_tls -*-
"""Serve a UNIX-socket-only grpcio server over TCP+TLS by relaying bytes.

grpcio binds its own sockets and its TLS cannot express everything cdtwist
wants from an endpoint string (``cdtls:``, ``systemd:``, ...), so grpcio
listens only on a private UNIX socket and Twisted terminates TLS and copies
plaintext HTTP/2 both ways.  Each direction is flow-controlled: while one
side's write buffer is over its high-water mark (``buffer_size``) the other
side stops reading (a push producer registered on the writing transport),
so a slow peer costs at most a couple of buffers of memory.  A side whose
reads are paused notices its peer's loss only when written to or resumed
(Twisted polls it for reads only while reading); ``linger`` bounds how long
a close may wait to flush.

The UNIX connection is opened only after the TLS handshake succeeds, so a
client whose certificate is refused never reaches grpcio.  Half-close is
passed on where the transport can express it (TCP, UNIX); Twisted's TLS
cannot half-close, so EOF from the backend closes a TLS client after
flushing.  Losing either end closes the other.

The same relay serves the other direction: a grpcio *client* (a proxy
plugin) dials a private UNIX socket and each connection is relayed to any
Twisted client endpoint (``backend=``), TLS with a checked peer name included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from cdtwist.log import get_logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IDelayedCall,
        IListeningPort,
        IReactorTime,
        IReactorUNIX,
        IStreamClientEndpoint,
    )
    from twisted.python.failure import Failure

__all__ = ["BridgeService", "StreamBridgeFactory", "StreamBridgeProtocol"]

log = get_logger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CLOSE_TIMEOUT = 2.0
#: a peer that neither reads nor answers close_notify is cut off after this
DEFAULT_LINGER = 30.0
#: Per-transport high-water mark (and read size).  Twisted's 64 KiB default
#: pauses the other side so often that an 8 MiB response crawls at a third
#: of the UNIX socket's speed; 1 MiB recovers most of it at a bounded
#: ~1 MiB buffered per direction per connection.
DEFAULT_BUFFER_SIZE = 1 << 20


def _socket_transport(transport: Any) -> Any:
    """The TCP/UNIX transport under a TLS layer (or the transport itself)."""
    return transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport


def _can_half_close(transport: Any) -> bool:
    # TLSMemoryBIOProtocol copies the TCP transport's interfaces, but a FIN
    # under TLS would be a truncation, not a half-close.
    return not isinstance(transport, TLSMemoryBIOProtocol) and IHalfCloseableDescriptor.providedBy(transport)


@implementer(IPushProducer)
class ReadThrottle:
    """Stops one side reading while the other side's write buffer is full."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        #: how often backpressure kicked in (observability and tests)
        self.pauses = 0

    def pauseProducing(self) -> None:  # noqa: N802
        self.pauses += 1
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        # The consumer is going away; its own connectionLost closes us.
        pass


@implementer(IHalfCloseableProtocol)
class _End(Protocol):
    """One side of a bridge; both sides relay and close the same way."""

    owner: StreamBridgeFactory
    peer: _End | None = None
    read_throttle: ReadThrottle | None = None
    read_closed = False
    write_closed = False
    closing = False
    lost = False
    _linger: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.peer is not None and not self.closing:
            self.peer.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:  # noqa: N802
        self.read_closed = True
        if self.peer is not None and not self.peer.lost:
            self.peer.shut_write()
        if self.write_closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def shut_write(self) -> None:
        """The peer sent EOF: nothing more will be written here."""
        transport: Any = self.transport
        if _can_half_close(transport):
            # A registered producer would keep the half-close waiting forever.
            transport.unregisterProducer()
            transport.loseWriteConnection()
        else:
            self.close()

    def close(self) -> None:
        """Flush what is buffered, then close; abort if that takes longer than the linger time."""
        if self.lost or self.closing:
            return
        self.closing = True
        transport: Any = self.transport
        # A registered producer would keep loseConnection waiting forever.
        transport.unregisterProducer()
        # Reads paused by the (now gone) peer's backpressure must restart, or a
        # TLS close could never see the peer's close_notify.
        transport.resumeProducing()
        transport.loseConnection()
        if not self.lost:
            self._linger = self.owner.clock.callLater(self.owner.linger, self.abort)

    def abort(self) -> None:
        self._cancel_linger()
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = True
        self._cancel_linger()
        self._end_lost()

    def _end_lost(self) -> None:
        raise NotImplementedError


class _BackendProtocol(_End):
    """The UNIX connection to grpcio."""

    def __init__(self, bridge: StreamBridgeProtocol) -> None:
        self.bridge = bridge
        self.owner = bridge.factory

    def _end_lost(self) -> None:
        self.bridge._end_lost()


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, bridge: StreamBridgeProtocol) -> None:
        self.bridge = bridge

    def buildProtocol(self, addr: IAddress) -> _BackendProtocol:  # noqa: N802
        p = _BackendProtocol(self.bridge)
        p.factory = self
        return p


@implementer(IHandshakeListener)
class StreamBridgeProtocol(_End):
    """The accepted connection (plaintext, or the inside of TLS)."""

    factory: StreamBridgeFactory

    def __init__(self) -> None:
        self.backend: _BackendProtocol | None = None
        self._pending: list[bytes] = []
        self._dialing: Deferred[Any] | None = None
        self._finished = False
        self._waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:  # noqa: N802
        self.owner = self.factory
        self.factory.bridges.add(self)
        _no_delay(self.transport)
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._dial()
        # else: wait for handshakeCompleted, so refused peers never reach the backend.

    def handshakeCompleted(self) -> None:  # noqa: N802
        if not self.lost and self.backend is None and self._dialing is None:
            self._dial()

    def _dial(self) -> None:
        # Read nothing more until there is somewhere to put it.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        d = self.factory.connect_backend(self)
        self._dialing = d
        d.addCallbacks(self._attach, self._dial_failed)

    def _attach(self, backend: _BackendProtocol) -> None:
        self._dialing = None
        if self.lost:
            backend.close()
            return
        self.backend = backend
        self.peer, backend.peer = backend, self
        _no_delay(backend.transport)
        inbound: Any = self.transport
        for transport in (_socket_transport(inbound), backend.transport):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = self.factory.buffer_size
        self.read_throttle = ReadThrottle(inbound)
        backend.read_throttle = ReadThrottle(backend.transport)
        backend.transport.registerProducer(self.read_throttle, True)  # type: ignore[union-attr]
        inbound.registerProducer(backend.read_throttle, True)
        # Resume before flushing: the flush itself may pause us again.
        inbound.resumeProducing()
        pending, self._pending = self._pending, []
        if pending:
            backend.transport.writeSequence(pending)  # type: ignore[union-attr]
        if self.read_closed:
            backend.shut_write()

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = None
        if not failure.check(CancelledError):
            log.warn(
                "bridge: cannot reach backend",
                target=self.factory.target,
                error=failure.getErrorMessage(),
            )
        self._pending = []
        self.close()
        self._check_finished()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.closing:
            return
        if self.backend is None:
            self._pending.append(data)
        else:
            self.backend.transport.write(data)  # type: ignore[union-attr]

    def _end_lost(self) -> None:
        """Either end went away: take the other one down too."""
        if self.lost:
            if self._dialing is not None:
                self._dialing.cancel()
            if self.backend is not None:
                self.backend.close()
        elif self.backend is not None and self.backend.lost:
            self.close()
        self._check_finished()

    def _check_finished(self) -> None:
        if self._finished or not self.lost or self._dialing is not None:
            return
        if self.backend is not None and not self.backend.lost:
            return
        self._finished = True
        self.factory.bridges.discard(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> Deferred[None]:
        """Fires once both ends are gone."""
        if self._finished:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def close_both(self) -> None:
        if self._dialing is not None:
            self._dialing.cancel()
        if self.backend is not None:
            self.backend.close()
        self.close()

    def abort_both(self) -> None:
        if self.backend is not None:
            self.backend.abort()
        self.abort()


class StreamBridgeFactory(Factory):
    """Accepts connections and relays each to *target_unix_path*."""

    protocol = StreamBridgeProtocol
    noisy = False

    def __init__(
        self,
        reactor: IReactorUNIX,
        target_unix_path: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        linger: float = DEFAULT_LINGER,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        backend: IStreamClientEndpoint | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor  # type: ignore[assignment]
        #: what log lines name as the far end
        self.target = target_unix_path
        #: dialled for each connection; default the UNIX socket at *target_unix_path*
        self.backend = backend
        self.connect_timeout = connect_timeout
        #: seconds a closing connection may take to flush before it is aborted
        self.linger = linger
        self.buffer_size = buffer_size
        #: live bridges, so stopping can close them
        self.bridges: set[StreamBridgeProtocol] = set()

    def connect_backend(self, bridge: StreamBridgeProtocol) -> Deferred[_BackendProtocol]:
        endpoint = self.backend
        if endpoint is None:
            endpoint = UNIXClientEndpoint(self.reactor, self.target, timeout=self.connect_timeout)
        return endpoint.connect(_BackendFactory(bridge))

    def close_all(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> Deferred[None]:
        """Close every bridge; abort those still flushing after *timeout* seconds."""
        bridges = list(self.bridges)
        if not bridges:
            return succeed(None)
        waits = [b.when_closed() for b in bridges]
        for b in bridges:
            b.close_both()
        timer = self.clock.callLater(timeout, lambda: [b.abort_both() for b in bridges])
        done = gatherResults(waits)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        done.addBoth(finished)
        return done


class BridgeService(Service):
    """Listen on *listen_description* (e.g. a ``cdtls:`` string) and bridge to a UNIX socket."""

    def __init__(
        self,
        reactor: Any,
        listen_description: str,
        target_unix_path: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        linger: float = DEFAULT_LINGER,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        backend: IStreamClientEndpoint | None = None,
    ) -> None:
        self.reactor = reactor
        self.listen_description = listen_description
        self.close_timeout = close_timeout
        self.factory = StreamBridgeFactory(
            reactor,
            target_unix_path,
            connect_timeout=connect_timeout,
            linger=linger,
            buffer_size=buffer_size,
            backend=backend,
        )
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        d: Deferred[Any] = maybeDeferred(lambda: serverFromString(self.reactor, self.listen_description))
        d.addCallback(lambda endpoint: endpoint.listen(self.factory))
        self._listening = d

        def listening(port: IListeningPort) -> None:
            self._listening = None
            self.port = port
            log.info("bridge listening", address=str(port.getHost()), target=self.factory.target)

        def failed(f: Failure) -> Failure:
            self._listening = None
            self.running = 0
            return f

        d.addCallbacks(listening, failed)
        return d

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        if self._listening is not None:
            self._listening.cancel()
        port, self.port = self.port, None
        d: Deferred[Any] = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        d.addCallback(lambda _: self.factory.close_all(self.close_timeout))
        d.addCallback(lambda _: None)
        return d


def _no_delay(transport: object) -> None:
    """Disable Nagle on the client's TCP socket (through a TLS wrapper too).

    gRPC writes small frames and waits for answers: with Nagle and the peer's
    delayed ACK every call would stall ~40 ms.
    """
    while transport is not None:
        set_no_delay = getattr(type(transport), "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(transport, True)
            except OSError:
                pass  # not a TCP socket (a UNIX endpoint): nothing to tune
            return
        transport = getattr(transport, "transport", None)
