# -*- test-case-name: tests.test_namespaces -*-
"""``containerd.services.namespaces.v1.Namespaces`` over the metadata DB.

Handlers run on gRPC pool threads and use the database directly; events
go through the exchange, which crosses to the reactor by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from cdtwist.api.events import namespace_pb2 as events
from cdtwist.api.services.namespaces.v1 import namespace_pb2 as api
from cdtwist.api.services.namespaces.v1 import namespace_pb2_grpc as api_grpc
from cdtwist.errors import CdtwistError, GRPCStatus, InvalidArgument
from cdtwist.events.exchange import Exchange
from cdtwist.grpc import context as callctx
from cdtwist.metadata import namespaces as store
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.plugin import EVENT, GRPC, METADATA, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

SERVICE_ID = "namespaces-service"


class NamespacesService(api_grpc.NamespacesServicer):
    def __init__(self, metadata: MetadataPlugin, exchange: Exchange) -> None:
        self.db = metadata.db
        self.exchange = exchange

    def Get(  # noqa: N802 - generated API
        self, request: api.GetNamespaceRequest, context: grpc.ServicerContext
    ) -> api.GetNamespaceResponse:
        labels = self.db.view(lambda tx: store.labels(tx, request.name))
        return api.GetNamespaceResponse(namespace=api.Namespace(name=request.name, labels=labels))

    def List(  # noqa: N802
        self, request: api.ListNamespacesRequest, context: grpc.ServicerContext
    ) -> api.ListNamespacesResponse:
        def read(tx: object) -> list[api.Namespace]:
            return [
                api.Namespace(name=name, labels=store.labels(tx, name))  # type: ignore[arg-type]
                for name in store.list_names(tx)  # type: ignore[arg-type]
            ]

        return api.ListNamespacesResponse(namespaces=self.db.view(read))  # type: ignore[arg-type]

    def Create(  # noqa: N802
        self, request: api.CreateNamespaceRequest, context: grpc.ServicerContext
    ) -> api.CreateNamespaceResponse:
        ns = request.namespace
        self.db.update(lambda tx: store.create(tx, ns.name, dict(ns.labels)))
        self.exchange.publish(
            callctx.namespace(context),
            "/namespaces/create",
            events.NamespaceCreate(name=ns.name, labels=dict(ns.labels)),
        )
        return api.CreateNamespaceResponse(namespace=ns)

    def Update(  # noqa: N802
        self, request: api.UpdateNamespaceRequest, context: grpc.ServicerContext
    ) -> api.UpdateNamespaceResponse:
        ns = request.namespace
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []

        def update(tx: object) -> None:
            if paths:
                for path in paths:
                    if not path.startswith("labels."):
                        raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, f'cannot update "{path}" field')
                    key = path[len("labels."):]
                    store.set_label(tx, ns.name, key, ns.labels.get(key, ""))  # type: ignore[arg-type]
                return
            for key in store.labels(tx, ns.name):  # type: ignore[arg-type]
                store.set_label(tx, ns.name, key, "")  # type: ignore[arg-type]
            for key, value in ns.labels.items():
                store.set_label(tx, ns.name, key, value)  # type: ignore[arg-type]

        try:
            self.db.update(update)
        except InvalidArgument as e:
            # containerd's Update hands store errors back unconverted: the
            # client sees code Unknown carrying the class in the text.
            raise CdtwistError(str(e)) from None
        self.exchange.publish(
            callctx.namespace(context),
            "/namespaces/update",
            events.NamespaceUpdate(name=ns.name, labels=dict(ns.labels)),
        )
        return api.UpdateNamespaceResponse()

    def Delete(  # noqa: N802
        self, request: api.DeleteNamespaceRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.db.update(lambda tx: store.delete(tx, request.name))
        # containerd publishes the delete inside the deleted namespace.
        self.exchange.publish(request.name, "/namespaces/delete", events.NamespaceDelete(name=request.name))
        return empty_pb2.Empty()


class NamespacesGRPC:
    """The ``io.containerd.grpc.v1.namespaces`` plugin: exposes the service."""

    def __init__(self, service: NamespacesService) -> None:
        self.service = service

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_NamespacesServicer_to_server(self.service, server)


def _init_service(ic: InitContext) -> NamespacesService:
    return NamespacesService(ic.get(METADATA), ic.get(EVENT))


def _init_grpc(ic: InitContext) -> NamespacesGRPC:
    return NamespacesGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(EVENT, METADATA), init=_init_service))
register(Registration(type=GRPC, id="namespaces", requires=(SERVICE,), init=_init_grpc))
