# -*- test-case-name: tests.test_metrics -*-
"""Prometheus metrics over HTTP on ``[metrics].address`` at ``/v1/metrics``.

Served by twisted.web on the reactor; the exposition is rendered in the
I/O pool (collectors read /proc), so scraping never blocks the reactor nor
touches the gRPC pool.  Works on TCP and UNIX sockets alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from twisted.internet.threads import deferToThreadPool

from cdtwist.web import WebService

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site


METRICS_PATH = b"v1"


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsService(WebService):
    name = "metrics"

    def __init__(self, address: str, registry: CollectorRegistry, reactor: Any, pool: ThreadPool) -> None:
        super().__init__(address, reactor, pool)
        self.registry = registry

    def site(self) -> Site:
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET, Request, Site

        registry, reactor, pool = self.registry, self.reactor, self.pool

        class Exposition(Resource):
            """Prometheus text format, rendered in the pool (collectors read /proc)."""

            isLeaf = True

            def render_GET(self, request: Request) -> object:  # noqa: N802
                def done(body: bytes) -> None:
                    request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
                    request.write(body)
                    request.finish()

                def failed(failure: Any) -> None:
                    request.setResponseCode(500)
                    request.write(str(failure.value).encode())
                    request.finish()

                deferToThreadPool(reactor, pool, generate_latest, registry).addCallbacks(done, failed)
                return NOT_DONE_YET

        root = Resource()
        v1 = Resource()
        root.putChild(METRICS_PATH, v1)
        v1.putChild(b"metrics", Exposition())
        return Site(root)
