# -*- test-case-name: tests.test_ttrpc_service -*-
"""The daemon's ttrpc server on ``[ttrpc].address``.

Shims dial it to forward their task events; any plugin instance with a
``register_ttrpc(services)`` method adds its services, collected after
every plugin has started (as containerd's ``server.New`` does).  A socket
path or ``unix:`` endpoint gets containerd's protections (0660, uid:gid,
same-user peer check); another endpoint string is served as given, with no
peer check, so it should be a TLS endpoint requiring client certificates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred

from cdtwist.endpoints import server_endpoint, unix_mode, unix_path
from cdtwist.log import get_logger
from cdtwist.ttrpc.server import Services, TTRPCServerFactory, listen_ttrpc

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort

log = get_logger(__name__)

#: How long stop waits for calls in flight before closing connections.
STOP_GRACE = 1.0


class TTRPCServerService(Service):
    name = "ttrpc"

    def __init__(self, address: str, uid: int, gid: int, servicers: Callable[[], list[Any]], reactor: Any) -> None:
        self.address = address
        self.uid = uid
        self.gid = gid
        self.servicers = servicers
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.factory: TTRPCServerFactory | None = None

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return ensureDeferred(self._listen())

    async def _listen(self) -> None:
        services = Services()
        for instance in self.servicers():
            register = getattr(instance, "register_ttrpc", None)
            if callable(register):
                register(services)
        path = unix_path(self.address)
        if path is not None:
            self.factory = TTRPCServerFactory(services, reactor=self.reactor)
            self.port = await listen_ttrpc(
                self.reactor, path, self.factory, self.uid, self.gid, mode=unix_mode(self.address)
            )
        else:
            log.warn("ttrpc served without a peer credential check", address=self.address)
            self.factory = TTRPCServerFactory(services, reactor=self.reactor, require_peer=None)
            self.port = await server_endpoint(self.reactor, self.address).listen(self.factory)
        log.info("serving...", address=self.address)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await port.stopListening()
        factory, self.factory = self.factory, None
        if factory is not None:
            shutdown = factory.shutdown()
            timeout = self.reactor.callLater(STOP_GRACE, factory.close)
            await shutdown
            if timeout.active():
                timeout.cancel()

