# -*- test-case-name: tests.test_proxy -*-
"""The gRPC connection a proxy plugin forwards its calls over.

Like containerd's ``proxyClients``, the dial is lazy: boot never waits on a
peer that is down, calls made while it is unreachable fail at once with
Unavailable, and the channel keeps redialling (1 s, growing to 3 s, as
containerd's backoff) so calls work again as soon as the peer is back.

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
import threading
from typing import TYPE_CHECKING, Any

import grpc
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.endpoints import client_description, server_description, unix_path
from cdtwist.errors import CdtwistError, Unavailable, from_grpc_code
from cdtwist.log import get_logger
from cdtwist.sockets import remove_socket

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

log = get_logger(__name__)

#: containerd's defaults.DefaultMaxRecvMsgSize / DefaultMaxSendMsgSize.
MAX_MESSAGE_SIZE = 16 << 20
#: How long boot waits for a first connection before reporting the peer down.
FIRST_CONNECT_TIMEOUT = 1.0
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
        self._lock = threading.Lock()
        self._state: grpc.ChannelConnectivity | None = None
        self._ever_ready = False

    # -- lifecycle (reactor thread) -----------------------------------------

    def start(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        if self.bridge_socket:
            from twisted.internet.endpoints import clientFromString

            from cdtwist.bridge import BridgeService

            # Parse now: a bad endpoint string fails the plugin with its message.
            backend = clientFromString(self.reactor, self.backend_description)
            await deferToThreadPool(self.reactor, self.io_pool, _prepare_socket_path, self.bridge_socket)
            bridge = BridgeService(
                self.reactor,
                server_description(self.bridge_socket, unix_mode=0o600),
                self.backend_description,
                backend=backend,
            )
            await bridge.startService()
            self.bridge = bridge
        self.channel = grpc.insecure_channel(self.target, options=_OPTIONS)
        self.channel.subscribe(self._on_state, try_to_connect=True)
        ready = await deferToThreadPool(self.reactor, self.io_pool, self._wait_ready, FIRST_CONNECT_TIMEOUT)
        if not ready:
            log.warn(
                "proxy plugin peer not reachable yet; calls fail with Unavailable until it is",
                plugin=self.name,
                address=self.address,
            )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.channel is not None
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def stop(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.unsubscribe(self._on_state)
            await deferToThreadPool(self.reactor, self.io_pool, channel.close)
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            await bridge.stopService()
            await deferToThreadPool(self.reactor, self.io_pool, remove_socket, self.bridge_socket)

    # -- state ----------------------------------------------------------------

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            previous, self._state = self._state, state
            if state == grpc.ChannelConnectivity.READY:
                self._ever_ready = True
        if previous is not None and previous != state:
            if state == grpc.ChannelConnectivity.READY:
                log.info("proxy plugin connected", plugin=self.name, address=self.address)
            elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                log.warn("proxy plugin peer unreachable", plugin=self.name, address=self.address)

    def health_error(self) -> CdtwistError | None:
        """Why the peer cannot be used right now, or None (introspection shows it as the plugin's error)."""
        with self._lock:
            state, ever_ready = self._state, self._ever_ready
        if self.channel is None:
            return Unavailable(f"proxy plugin {self.name}: not started")
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE or (
            not ever_ready and state != grpc.ChannelConnectivity.READY
        ):
            return Unavailable(f"proxy plugin {self.name}: cannot reach {self.address}")
        return None

    def get(self) -> grpc.Channel:
        channel = self.channel
        if channel is None:
            raise Unavailable(f"proxy plugin {self.name}: not started")
        return channel


def _prepare_socket_path(path: str) -> None:
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    remove_socket(path)
