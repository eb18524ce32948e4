# -*- test-case-name: tests.test_debug,tests.test_metrics -*-
"""An HTTP site on a configured address: the shape metrics and debug share.

A UNIX socket gets the same protection as the API socket (parent 0770,
stale file removed, live one refused, mode and owner set); any other
address is a Twisted endpoint string.  twisted.web is imported only when a
site is actually served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.endpoints import server_endpoint, unix_mode, unix_path
from cdtwist.log import get_logger
from cdtwist.sockets import prepare_unix_path, secure_socket

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site

log = get_logger(__name__)


class WebService(Service):
    """Serve :meth:`site` on ``address`` while running."""

    def __init__(self, address: str, reactor: Any, pool: ThreadPool, uid: int = 0, gid: int = 0) -> None:
        self.address = address
        self.reactor = reactor
        self.pool = pool
        self.uid = uid
        self.gid = gid
        self.port: IListeningPort | None = None

    def site(self) -> Site:
        raise NotImplementedError

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return ensureDeferred(self._listen())

    async def _listen(self) -> None:
        from twisted.web.server import Site

        site = self.site()
        assert isinstance(site, Site)
        site.noisy = False
        path = unix_path(self.address)
        if path:
            await deferToThreadPool(self.reactor, self.pool, prepare_unix_path, path, self.uid, self.gid)
        self.port = await server_endpoint(self.reactor, self.address).listen(site)
        if path:
            mode = unix_mode(self.address)
            await deferToThreadPool(self.reactor, self.pool, secure_socket, path, self.uid, self.gid, mode)
        log.info("serving...", service=self.name, address=self.address)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await port.stopListening()
