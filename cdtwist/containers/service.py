# -*- test-case-name: tests.test_containers -*-
"""``containerd.services.containers.v1.Containers`` (containerd's ``services/containers``).

``containers-service`` is the metadata container store plus the
``/containers/create``, ``/containers/update`` and ``/containers/delete``
events; the ``containers`` gRPC plugin serves it.  ListStream sends one
container per message, as containerd 1.6 does.  Handlers run on gRPC pool
threads and use the database there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from cdtwist.api.events import container_pb2 as events
from cdtwist.api.services.containers.v1 import containers_pb2 as api
from cdtwist.api.services.containers.v1 import containers_pb2_grpc as api_grpc
from cdtwist.errors import GRPCStatus
from cdtwist.events.exchange import Exchange
from cdtwist.grpc import context as callctx
from cdtwist.log import get_logger
from cdtwist.metadata.containers import Container, ContainerStore
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.plugin import EVENT, GRPC, METADATA, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

SERVICE_ID = "containers-service"


class ContainersService:
    """The ``containers-service`` plugin: the container store, publishing every change."""

    def __init__(self, store: ContainerStore, exchange: Exchange) -> None:
        self.store = store
        self.exchange = exchange

    def get(self, namespace: str, id: str) -> Container:
        return self.store.get(namespace, id)

    def list(self, namespace: str, *filter_exprs: str) -> list[Container]:
        return self.store.list(namespace, *filter_exprs)

    def create(self, namespace: str, container: Container) -> Container:
        created = self.store.create(namespace, container)
        runtime = events.ContainerCreate.Runtime(name=created.runtime_name)
        if created.runtime_options is not None:
            runtime.options.CopyFrom(created.runtime_options)
        self.exchange.publish(
            namespace, "/containers/create", events.ContainerCreate(id=created.id, image=created.image, runtime=runtime)
        )
        return created

    def update(self, namespace: str, container: Container, *fieldpaths: str) -> Container:
        updated = self.store.update(namespace, container, *fieldpaths)
        self.exchange.publish(
            namespace,
            "/containers/update",
            events.ContainerUpdate(
                id=updated.id, image=updated.image, labels=updated.labels, snapshot_key=updated.snapshot_key
            ),
        )
        return updated

    def delete(self, namespace: str, id: str) -> None:
        self.store.delete(namespace, id)
        self.exchange.publish(namespace, "/containers/delete", events.ContainerDelete(id=id))


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def container_to_grpc(container: Container) -> api.Container:
    """``containerToProto``: the runtime and both times are always present."""
    msg = api.Container(
        id=container.id,
        labels=container.labels,
        image=container.image,
        runtime=api.Container.Runtime(name=container.runtime_name),
        snapshotter=container.snapshotter,
        snapshot_key=container.snapshot_key,
        created_at=_timestamp(container.created_at),
        updated_at=_timestamp(container.updated_at),
    )
    if container.runtime_options is not None:
        msg.runtime.options.CopyFrom(container.runtime_options)
    if container.spec is not None:
        msg.spec.CopyFrom(container.spec)
    for name, ext in container.extensions.items():
        msg.extensions[name].CopyFrom(ext)
    return msg


def container_from_grpc(msg: api.Container) -> Container:
    """``containerFromProto``: an absent runtime, options or spec stays absent (not empty)."""
    options = None
    if msg.HasField("runtime") and msg.runtime.HasField("options"):
        options = type(msg.runtime.options)()
        options.CopyFrom(msg.runtime.options)
    spec = None
    if msg.HasField("spec"):
        spec = type(msg.spec)()
        spec.CopyFrom(msg.spec)
    extensions = {}
    for name, ext in msg.extensions.items():
        copy = type(ext)()
        copy.CopyFrom(ext)
        extensions[name] = copy
    return Container(
        id=msg.id,
        labels=dict(msg.labels),
        image=msg.image,
        runtime_name=msg.runtime.name,
        runtime_options=options,
        spec=spec,
        snapshotter=msg.snapshotter,
        snapshot_key=msg.snapshot_key,
        extensions=extensions,
    )


class ContainersServicer(api_grpc.ContainersServicer):
    """containerd's containers service, handler for handler."""

    def __init__(self, service: ContainersService) -> None:
        self.service = service

    def Get(  # noqa: N802
        self, request: api.GetContainerRequest, context: grpc.ServicerContext
    ) -> api.GetContainerResponse:
        namespace = callctx.namespace_required(context)
        return api.GetContainerResponse(container=container_to_grpc(self.service.get(namespace, request.id)))

    def List(  # noqa: N802
        self, request: api.ListContainersRequest, context: grpc.ServicerContext
    ) -> api.ListContainersResponse:
        namespace = callctx.namespace_required(context)
        found = self.service.list(namespace, *request.filters)
        return api.ListContainersResponse(containers=[container_to_grpc(c) for c in found])

    def ListStream(  # noqa: N802
        self, request: api.ListContainersRequest, context: grpc.ServicerContext
    ) -> Iterator[api.ListContainerMessage]:
        namespace = callctx.namespace_required(context)
        found = self.service.list(namespace, *request.filters)
        for container in found:
            if not context.is_active():
                return
            yield api.ListContainerMessage(container=container_to_grpc(container))

    def Create(  # noqa: N802
        self, request: api.CreateContainerRequest, context: grpc.ServicerContext
    ) -> api.CreateContainerResponse:
        namespace = callctx.namespace_required(context)
        created = self.service.create(namespace, container_from_grpc(request.container))
        return api.CreateContainerResponse(container=container_to_grpc(created))

    def Update(  # noqa: N802
        self, request: api.UpdateContainerRequest, context: grpc.ServicerContext
    ) -> api.UpdateContainerResponse:
        if request.container.id == "":
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, "Container.ID required")
        namespace = callctx.namespace_required(context)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = self.service.update(namespace, container_from_grpc(request.container), *paths)
        return api.UpdateContainerResponse(container=container_to_grpc(updated))

    def Delete(  # noqa: N802
        self, request: api.DeleteContainerRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        namespace = callctx.namespace_required(context)
        self.service.delete(namespace, request.id)
        return empty_pb2.Empty()


class ContainersGRPC:
    """The ``io.containerd.grpc.v1.containers`` plugin."""

    def __init__(self, service: ContainersService) -> None:
        self.servicer = ContainersServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_ContainersServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> ContainersService:
    metadata: MetadataPlugin = ic.get(METADATA)
    return ContainersService(ContainerStore(metadata.db), ic.get(EVENT))


def _init_grpc(ic: InitContext) -> ContainersGRPC:
    return ContainersGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(EVENT, METADATA), init=_init_service))
register(Registration(type=GRPC, id="containers", requires=(SERVICE,), init=_init_grpc))
