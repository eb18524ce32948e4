# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics over HTTP on ``[metrics].address`` at ``/v1/metrics``.

Served by twisted.web on the reactor (prometheus-client's Twisted
resource renders in a thread), so scraping never touches the gRPC pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from cdtwist.endpoints import server_endpoint
from cdtwist.log import get_logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort

log = get_logger(__name__)

METRICS_PATH = b"v1"


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsService(Service):
    name = "metrics"

    def __init__(self, address: str, registry: CollectorRegistry, reactor: Any) -> None:
        self.address = address
        self.registry = registry
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return ensureDeferred(self._listen())

    async def _listen(self) -> None:
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        v1 = Resource()
        root.putChild(METRICS_PATH, v1)
        v1.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.noisy = False
        endpoint = server_endpoint(self.reactor, self.address, unix_mode=0o660)
        self.port = await endpoint.listen(site)
        log.info("serving metrics", address=self.address)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return Deferred.fromCoroutine(_stop(port))


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()
