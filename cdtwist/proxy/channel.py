# -*- test-case-name: tests.test_proxy -*-
"""The gRPC connection a proxy plugin forwards its calls over.

Like containerd's ``proxyClients``, the dial is lazy: boot never waits on a
peer that is down, calls made while it is unreachable fail at once with
Unavailable, and the channel keeps redialling (1 s, growing to 3 s, as
containerd's backoff) so calls work again as soon as the peer is back.

Reachability is asked, not watched: introspection probes the channel
(which also makes an idle one dial), so no thread polls it meanwhile.

A socket path or ``unix:`` string is dialled by grpcio directly.  Any other
address is a Twisted client endpoint string (``tcp:``, ``tls:``,
``cdtls:`` with a verified peer name): grpcio dials a private UNIX socket
and :class:`~cdtwist.bridge.BridgeService` relays each connection through
that endpoint, so TLS is set up the Twisted way and the peer's name is
checked by service-identity.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.endpoints import client_description, server_description, unix_path
from cdtwist.errors import CdtwistError, Unavailable, from_grpc_code
from cdtwist.log import get_logger
from cdtwist.sockets import prepare_unix_path, remove_socket

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

log = get_logger(__name__)

#: containerd's defaults.DefaultMaxRecvMsgSize / DefaultMaxSendMsgSize.
MAX_MESSAGE_SIZE = 16 << 20
#: How long boot waits for a first connection before reporting the peer down.
FIRST_CONNECT_TIMEOUT = 1.0
_PROBE_METHOD = "/grpc.health.v1.Health/Check"
#: How long introspection waits for an idle or reconnecting channel.
HEALTH_PROBE_TIMEOUT = 0.5
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    # containerd: backoff.DefaultConfig with MaxDelay 3 s.
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


def rpc_error(err: grpc.RpcError) -> CdtwistError:
    """A peer's status as cdtwist's error class (``errdefs.FromGRPC``)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return from_grpc_code(code, details or "")


class ProxyChannel:
    """One plugin's connection to its peer, with the peer's reachability for introspection.

    :param name: the proxy plugin's name (for messages).
    :param address: as configured (path, ``unix:``, ``host:port`` or a client endpoint string).
    :param bridge_dir: where the private relay socket goes when one is needed.
    """

    def __init__(self, name: str, address: str, *, reactor: Any, io_pool: ThreadPool, bridge_dir: str) -> None:
        self.name = name
        self.address = address
        self.reactor = reactor
        self.io_pool = io_pool
        path = unix_path(address)
        self.bridge_socket = ""
        self.backend_description = ""
        if path is not None:
            self.target = "unix:" + os.path.abspath(path)
        else:
            self.backend_description = client_description(address)
            digest = hashlib.sha256(address.encode()).hexdigest()[:12]
            self.bridge_socket = os.path.join(bridge_dir, f"proxy-{digest}.sock")
            self.target = "unix:" + self.bridge_socket
        self.channel: grpc.Channel | None = None
        self.bridge: Any = None

    # -- lifecycle (reactor thread) -----------------------------------------

    def start(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        if self.bridge_socket:
            from twisted.internet.endpoints import clientFromString

            from cdtwist.bridge import BridgeService

            # Parse now: a bad endpoint string fails the plugin with its message.
            backend = clientFromString(self.reactor, self.backend_description)
            await deferToThreadPool(self.reactor, self.io_pool, prepare_unix_path, self.bridge_socket)
            bridge = BridgeService(
                self.reactor,
                server_description(self.bridge_socket, unix_mode=0o600),
                self.backend_description,
                backend=backend,
            )
            await bridge.startService()
            self.bridge = bridge
        self.channel = grpc.insecure_channel(self.target, options=_OPTIONS)
        ready = await deferToThreadPool(self.reactor, self.io_pool, self.ready, FIRST_CONNECT_TIMEOUT)
        if not ready:
            log.warn(
                "proxy plugin peer not reachable yet; calls fail with Unavailable until it is",
                plugin=self.name,
                address=self.address,
            )

    def ready(self, timeout: float) -> bool:
        """The peer answers within ``timeout`` seconds (an idle channel dials).  Blocking.

        Probes with a health check that waits for the connection: any answer,
        UNIMPLEMENTED included, proves a live peer.  (grpcio's connectivity
        futures would leave a polling thread behind.)
        """
        channel = self.channel
        if channel is None:
            return False
        probe = channel.unary_unary(_PROBE_METHOD, request_serializer=None, response_deserializer=None)
        try:
            probe(b"", timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        except ValueError:  # closed meanwhile
            return False
        return True

    def stop(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await deferToThreadPool(self.reactor, self.io_pool, channel.close)
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            await bridge.stopService()
            await deferToThreadPool(self.reactor, self.io_pool, remove_socket, self.bridge_socket)

    # -- state ----------------------------------------------------------------

    def health_error(self) -> CdtwistError | None:
        """Why the peer cannot be used right now, or None (introspection shows it as the plugin's error).

        Blocking for up to :data:`HEALTH_PROBE_TIMEOUT`: callers are on pool threads.
        """
        if self.channel is None:
            return Unavailable(f"proxy plugin {self.name}: not started")
        if not self.ready(HEALTH_PROBE_TIMEOUT):
            return Unavailable(f"proxy plugin {self.name}: cannot reach {self.address}")
        return None

    def get(self) -> grpc.Channel:
        channel = self.channel
        if channel is None:
            raise Unavailable(f"proxy plugin {self.name}: not started")
        return channel


S = TypeVar("S")
T = TypeVar("T")


class ProxyClient(Generic[S]):
    """What a proxy plugin's instance shares: the stub, error mapping, health, stopping."""

    #: the generated stub class of the API the plugin forwards
    stub_class: Callable[[grpc.Channel], S]

    def __init__(self, name: str, channel: ProxyChannel) -> None:
        self.name = name
        self.channel = channel

    def _call(self, fn: Callable[[S], T]) -> T:
        """One call on a fresh stub; the peer's status becomes cdtwist's error class."""
        try:
            return fn(self.stub_class(self.channel.get()))
        except grpc.RpcError as e:
            raise rpc_error(e) from None

    def _stream(self, open_stream: Callable[[S], Any]) -> Iterator[Any]:
        """The messages of a server stream; cancelled if the caller stops early."""
        stream = self._call(open_stream)
        try:
            while True:
                try:
                    yield next(stream)
                except StopIteration:
                    return
                except grpc.RpcError as e:
                    raise rpc_error(e) from None
        finally:
            stream.cancel()

    def health_error(self) -> Exception | None:
        return self.channel.health_error()

    def stop(self) -> Deferred[None]:
        return self.channel.stop()
