# -*- test-case-name: tests.test_images -*-
"""``containerd.services.images.v1.Images`` (containerd's ``services/images``).

``images-service`` is the metadata image store plus the ``/images/create``,
``/images/update`` and ``/images/delete`` events; a delete with ``sync``
also waits for a garbage collection, so what only the image held is gone
when the call returns.  The ``images`` gRPC plugin serves it.  Handlers run
on gRPC pool threads and use the database there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from cdtwist.api.events import image_pb2 as events
from cdtwist.api.services.images.v1 import images_pb2 as api
from cdtwist.api.services.images.v1 import images_pb2_grpc as api_grpc
from cdtwist.api.types import descriptor_pb2
from cdtwist.errors import GRPCStatus
from cdtwist.events.exchange import Exchange
from cdtwist.gc.scheduler import GCScheduler
from cdtwist.grpc import context as callctx
from cdtwist.log import get_logger
from cdtwist.metadata.images import Descriptor, Image, ImageStore
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.plugin import EVENT, GC, GRPC, METADATA, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

SERVICE_ID = "images-service"


class ImagesService:
    """The ``images-service`` plugin: the image store, publishing changes, GC on a synchronous delete."""

    def __init__(self, store: ImageStore, exchange: Exchange, scheduler: GCScheduler) -> None:
        self.store = store
        self.exchange = exchange
        self.scheduler = scheduler

    def get(self, namespace: str, name: str) -> Image:
        return self.store.get(namespace, name)

    def list(self, namespace: str, *filter_exprs: str) -> list[Image]:
        return self.store.list(namespace, *filter_exprs)

    def create(self, namespace: str, image: Image) -> Image:
        created = self.store.create(namespace, image)
        self.exchange.publish(namespace, "/images/create", events.ImageCreate(name=created.name, labels=created.labels))
        return created

    def update(self, namespace: str, image: Image, *fieldpaths: str) -> Image:
        updated = self.store.update(namespace, image, *fieldpaths)
        self.exchange.publish(namespace, "/images/update", events.ImageUpdate(name=updated.name, labels=updated.labels))
        return updated

    def delete(
        self, namespace: str, name: str, sync: bool = False, is_active: Callable[[], bool] | None = None
    ) -> None:
        self.store.delete(namespace, name)
        self.exchange.publish(namespace, "/images/delete", events.ImageDelete(name=name))
        if sync:
            self.scheduler.schedule_and_wait_blocking(is_active or (lambda: True))


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def image_to_grpc(image: Image) -> api.Image:
    t = image.target
    return api.Image(
        name=image.name,
        labels=image.labels,
        target=descriptor_pb2.Descriptor(
            media_type=t.media_type, digest=t.digest, size=t.size, annotations=t.annotations
        ),
        created_at=_timestamp(image.created_at),
        updated_at=_timestamp(image.updated_at),
    )


def image_from_grpc(image: api.Image) -> Image:
    t = image.target
    return Image(
        name=image.name,
        labels=dict(image.labels),
        target=Descriptor(t.media_type, t.digest, t.size, dict(t.annotations)),
    )


class ImagesServicer(api_grpc.ImagesServicer):
    """containerd's images service, handler for handler."""

    def __init__(self, service: ImagesService) -> None:
        self.service = service

    def Get(self, request: api.GetImageRequest, context: grpc.ServicerContext) -> api.GetImageResponse:  # noqa: N802
        namespace = callctx.namespace_required(context)
        return api.GetImageResponse(image=image_to_grpc(self.service.get(namespace, request.name)))

    def List(  # noqa: N802
        self, request: api.ListImagesRequest, context: grpc.ServicerContext
    ) -> api.ListImagesResponse:
        namespace = callctx.namespace_required(context)
        found = self.service.list(namespace, *request.filters)
        return api.ListImagesResponse(images=[image_to_grpc(image) for image in found])

    def Create(  # noqa: N802
        self, request: api.CreateImageRequest, context: grpc.ServicerContext
    ) -> api.CreateImageResponse:
        log.debug("create image", name=request.image.name, target=request.image.target.digest)
        if request.image.name == "":
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, "Image.Name required")
        namespace = callctx.namespace_required(context)
        created = self.service.create(namespace, image_from_grpc(request.image))
        return api.CreateImageResponse(image=image_to_grpc(created))

    def Update(  # noqa: N802
        self, request: api.UpdateImageRequest, context: grpc.ServicerContext
    ) -> api.UpdateImageResponse:
        if request.image.name == "":
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, "Image.Name required")
        namespace = callctx.namespace_required(context)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = self.service.update(namespace, image_from_grpc(request.image), *paths)
        return api.UpdateImageResponse(image=image_to_grpc(updated))

    def Delete(self, request: api.DeleteImageRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        log.debug("delete image", name=request.name)
        namespace = callctx.namespace_required(context)
        self.service.delete(namespace, request.name, request.sync, context.is_active)
        return empty_pb2.Empty()


class ImagesGRPC:
    """The ``io.containerd.grpc.v1.images`` plugin."""

    def __init__(self, service: ImagesService) -> None:
        self.servicer = ImagesServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_ImagesServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> ImagesService:
    metadata: MetadataPlugin = ic.get(METADATA)
    scheduler: GCScheduler = ic.get(GC)
    # containerd's service reaches the exchange through ic.Events, not a requirement.
    return ImagesService(ImageStore(metadata.db), ic.get(EVENT), scheduler)


def _init_grpc(ic: InitContext) -> ImagesGRPC:
    return ImagesGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(METADATA, GC), init=_init_service))
register(Registration(type=GRPC, id="images", requires=(SERVICE,), init=_init_grpc))
