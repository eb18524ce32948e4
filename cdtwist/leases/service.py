# -*- test-case-name: tests.test_leases -*-
"""``containerd.services.leases.v1.Leases`` (containerd's ``services/leases``).

``leases-service`` is the metadata lease manager; deleting with ``sync``
also waits for a garbage collection, so what only the lease held is gone
when the call returns.  containerd publishes no lease events, neither does
this.  Handlers run on gRPC pool threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from cdtwist.api.services.leases.v1 import leases_pb2 as api
from cdtwist.api.services.leases.v1 import leases_pb2_grpc as api_grpc
from cdtwist.gc.scheduler import GCScheduler
from cdtwist.grpc import context as callctx
from cdtwist.metadata import leases as store
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector, collector_for
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.plugin import GC, GRPC, METADATA, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

SERVICE_ID = "leases-service"


class LeasesService:
    """The ``leases-service`` plugin: leases over the metadata database, GC on synchronous delete."""

    def __init__(self, db: DB, collector: Collector, scheduler: Callable[[], GCScheduler]) -> None:
        self.db = db
        self.collector = collector
        #: looked up on first use: containerd's registration does not order it after the GC.
        self._scheduler = scheduler

    def create(self, namespace: str, lease_id: str, labels: dict[str, str]) -> store.Lease:
        return self.db.update(lambda tx: store.create(tx, namespace, lease_id or store.random_id(), labels))

    def delete(
        self, namespace: str, lease_id: str, sync: bool = False, is_active: Callable[[], bool] | None = None
    ) -> None:
        self.db.update(lambda tx: store.delete(tx, namespace, lease_id, self.collector))
        if sync:
            self._scheduler().schedule_and_wait_blocking(is_active or (lambda: True))

    def list(self, namespace: str, *filter_exprs: str) -> list[store.Lease]:
        return self.db.view(lambda tx: store.list_leases(tx, namespace, *filter_exprs))

    def add_resource(self, namespace: str, lease_id: str, resource: store.Resource) -> None:
        self.db.update(lambda tx: store.add_resource(tx, namespace, lease_id, resource))

    def delete_resource(self, namespace: str, lease_id: str, resource: store.Resource) -> None:
        self.db.update(lambda tx: store.delete_resource(tx, namespace, lease_id, resource, self.collector))

    def list_resources(self, namespace: str, lease_id: str) -> list[store.Resource]:
        return self.db.view(lambda tx: store.list_resources(tx, namespace, lease_id))


def lease_to_grpc(lease: store.Lease) -> api.Lease:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(lease.created_at)
    return api.Lease(id=lease.id, labels=lease.labels, created_at=created)


class LeasesServicer(api_grpc.LeasesServicer):
    def __init__(self, service: LeasesService) -> None:
        self.service = service

    def Create(self, request: api.CreateRequest, context: grpc.ServicerContext) -> api.CreateResponse:  # noqa: N802
        namespace = callctx.namespace_required(context)
        lease = self.service.create(namespace, request.id, dict(request.labels))
        return api.CreateResponse(lease=lease_to_grpc(lease))

    def Delete(self, request: api.DeleteRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        namespace = callctx.namespace_required(context)
        self.service.delete(namespace, request.id, request.sync, context.is_active)
        return empty_pb2.Empty()

    def List(self, request: api.ListRequest, context: grpc.ServicerContext) -> api.ListResponse:  # noqa: N802
        namespace = callctx.namespace_required(context)
        leases = self.service.list(namespace, *request.filters)
        return api.ListResponse(leases=[lease_to_grpc(lease) for lease in leases])

    def AddResource(  # noqa: N802
        self, request: api.AddResourceRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        namespace = callctx.namespace_required(context)
        resource = store.Resource(request.resource.id, request.resource.type)
        self.service.add_resource(namespace, request.id, resource)
        return empty_pb2.Empty()

    def DeleteResource(  # noqa: N802
        self, request: api.DeleteResourceRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        namespace = callctx.namespace_required(context)
        resource = store.Resource(request.resource.id, request.resource.type)
        self.service.delete_resource(namespace, request.id, resource)
        return empty_pb2.Empty()

    def ListResources(  # noqa: N802
        self, request: api.ListResourcesRequest, context: grpc.ServicerContext
    ) -> api.ListResourcesResponse:
        namespace = callctx.namespace_required(context)
        resources = self.service.list_resources(namespace, request.id)
        return api.ListResourcesResponse(resources=[api.Resource(id=r.id, type=r.type) for r in resources])


class LeasesGRPC:
    """The ``io.containerd.grpc.v1.leases`` plugin."""

    def __init__(self, service: LeasesService) -> None:
        self.servicer = LeasesServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_LeasesServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> LeasesService:
    metadata: MetadataPlugin = ic.get(METADATA)
    # containerd lists only metadata as required and looks the GC up anyway.
    return LeasesService(metadata.db, collector_for(metadata.db), lambda: ic.get(GC))


def _init_grpc(ic: InitContext) -> LeasesGRPC:
    return LeasesGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(METADATA,), init=_init_service))
register(Registration(type=GRPC, id="leases", requires=(SERVICE,), init=_init_grpc))
