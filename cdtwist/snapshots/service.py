# -*- test-case-name: tests.test_snapshots_service -*-
"""``containerd.services.snapshots.v1.Snapshots`` (containerd's ``services/snapshots``).

``snapshots-service`` maps each loaded snapshotter's name to its namespaced
metadata snapshotter, wrapped to publish ``/snapshot/prepare``,
``/snapshot/commit`` and ``/snapshot/remove``; the ``snapshots`` gRPC plugin
serves it, picking the snapshotter named in each request.  Status codes
and messages are containerd's, including its quirks: ``List`` returns
errors unconverted (code Unknown, the message intact), and ``Cleanup`` is
not implemented by any snapshotter the service hands out (the event
wrapper hides the engines' ``Cleaner``), exactly as containerd 1.6 answers.

Handlers run on gRPC pool threads and block on the database and the
engines there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from cdtwist.api.events import snapshot_pb2 as events
from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as api
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as api_grpc
from cdtwist.errors import InvalidArgument, NotImplemented_
from cdtwist.events.exchange import Exchange
from cdtwist.grpc import context as callctx
from cdtwist.log import get_logger
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.metadata.snapshots import NamespacedSnapshotter, snapshotters_for
from cdtwist.mount import Mount
from cdtwist.plugin import EVENT, GRPC, METADATA, SERVICE, SNAPSHOTTER, Registration, register
from cdtwist.snapshots import Info, Usage
from cdtwist.snapshots.wire import (
    info_from_grpc,
    info_to_grpc,
    kind_from_grpc,
    kind_to_grpc,
    labels_of,
    mounts_to_grpc,
    unconverted,
)

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

__all__ = ["SnapshotsService", "SnapshotsServicer", "info_from_grpc", "info_to_grpc", "kind_from_grpc", "kind_to_grpc"]

SERVICE_ID = "snapshots-service"
#: List sends infos in blocks of this many.
LIST_BLOCK = 100


class EventedSnapshotter:
    """A namespaced snapshotter that publishes its changes (``services/snapshots/snapshotters.go``).

    ``view``, ``update`` and the reads publish nothing, as in containerd.
    """

    def __init__(self, snapshotter: NamespacedSnapshotter, exchange: Exchange) -> None:
        self.snapshotter = snapshotter
        self.exchange = exchange

    @property
    def name(self) -> str:
        return self.snapshotter.name

    def stat(self, namespace: str, key: str) -> Info:
        return self.snapshotter.stat(namespace, key)

    def update(self, namespace: str, info: Info, *fieldpaths: str) -> Info:
        return self.snapshotter.update(namespace, info, *fieldpaths)

    def usage(self, namespace: str, key: str) -> Usage:
        return self.snapshotter.usage(namespace, key)

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        return self.snapshotter.mounts(namespace, key)

    def infos(self, namespace: str, *filter_exprs: str) -> Iterator[Info]:
        return self.snapshotter.infos(namespace, *filter_exprs)

    def walk(self, namespace: str, fn: object, *filter_exprs: str) -> None:
        self.snapshotter.walk(namespace, fn, *filter_exprs)  # type: ignore[arg-type]

    def view(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        return self.snapshotter.view(namespace, key, parent, labels, lease)

    def prepare(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        mounts = self.snapshotter.prepare(namespace, key, parent, labels, lease)
        self.exchange.publish(namespace, "/snapshot/prepare", events.SnapshotPrepare(key=key, parent=parent))
        return mounts

    def commit(
        self,
        namespace: str,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> None:
        self.snapshotter.commit(namespace, name, key, labels, lease)
        self.exchange.publish(namespace, "/snapshot/commit", events.SnapshotCommit(key=key, name=name))

    def remove(self, namespace: str, key: str, lease: str | None = None) -> None:
        self.snapshotter.remove(namespace, key, lease)
        self.exchange.publish(namespace, "/snapshot/remove", events.SnapshotRemove(key=key))


class SnapshotsService(Mapping[str, EventedSnapshotter]):
    """The ``snapshots-service`` plugin: every usable snapshotter by name (containerd's map)."""

    def __init__(self, snapshotters: Mapping[str, EventedSnapshotter]) -> None:
        self._snapshotters = dict(snapshotters)

    def __getitem__(self, name: str) -> EventedSnapshotter:
        return self._snapshotters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshotters)

    def __len__(self) -> int:
        return len(self._snapshotters)

    def get_snapshotter(self, name: str) -> EventedSnapshotter:
        """``getSnapshotter``: InvalidArgument when missing or not loaded."""
        if name == "":
            raise InvalidArgument("snapshotter argument missing")
        sn = self._snapshotters.get(name)
        if sn is None:
            raise InvalidArgument(f"snapshotter not loaded: {name}")
        return sn


class SnapshotsServicer(api_grpc.SnapshotsServicer):
    """containerd's snapshots gRPC service, handler for handler."""

    def __init__(self, service: SnapshotsService) -> None:
        self.service = service

    def Prepare(  # noqa: N802 - generated API
        self, request: api.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> api.PrepareSnapshotResponse:
        log.debug("prepare snapshot", parent=request.parent, key=request.key)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        mounts = sn.prepare(namespace, request.key, request.parent, labels_of(request), callctx.lease(context))
        return api.PrepareSnapshotResponse(mounts=mounts_to_grpc(mounts))

    def View(  # noqa: N802
        self, request: api.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> api.ViewSnapshotResponse:
        log.debug("prepare view snapshot", parent=request.parent, key=request.key)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        mounts = sn.view(namespace, request.key, request.parent, labels_of(request), callctx.lease(context))
        return api.ViewSnapshotResponse(mounts=mounts_to_grpc(mounts))

    def Mounts(self, request: api.MountsRequest, context: grpc.ServicerContext) -> api.MountsResponse:  # noqa: N802
        log.debug("get snapshot mounts", key=request.key)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        return api.MountsResponse(mounts=mounts_to_grpc(sn.mounts(namespace, request.key)))

    def Commit(  # noqa: N802
        self, request: api.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        log.debug("commit snapshot", key=request.key, name=request.name)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        sn.commit(namespace, request.name, request.key, labels_of(request), callctx.lease(context))
        return empty_pb2.Empty()

    def Remove(  # noqa: N802
        self, request: api.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        log.debug("remove snapshot", key=request.key)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        sn.remove(namespace, request.key, callctx.lease(context))
        return empty_pb2.Empty()

    def Stat(  # noqa: N802
        self, request: api.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> api.StatSnapshotResponse:
        log.debug("stat snapshot", key=request.key)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        return api.StatSnapshotResponse(info=info_to_grpc(sn.stat(namespace, request.key)))

    def Update(  # noqa: N802
        self, request: api.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> api.UpdateSnapshotResponse:
        log.debug("update snapshot", key=request.info.name)
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = sn.update(namespace, info_from_grpc(request.info), *paths)
        return api.UpdateSnapshotResponse(info=info_to_grpc(info))

    def List(  # noqa: N802
        self, request: api.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[api.ListSnapshotsResponse]:
        sn = self.service.get_snapshotter(request.snapshotter)
        try:
            namespace = callctx.namespace_required(context)
            block: list[api.Info] = []
            for info in sn.infos(namespace, *request.filters):
                block.append(info_to_grpc(info))
                if len(block) >= LIST_BLOCK:
                    yield api.ListSnapshotsResponse(info=block)
                    block = []
        except Exception as e:
            raise unconverted(e) from e
        if block:
            yield api.ListSnapshotsResponse(info=block)

    def Usage(self, request: api.UsageRequest, context: grpc.ServicerContext) -> api.UsageResponse:  # noqa: N802
        sn = self.service.get_snapshotter(request.snapshotter)
        namespace = callctx.namespace_required(context)
        usage = sn.usage(namespace, request.key)
        return api.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: api.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.get_snapshotter(request.snapshotter)
        # containerd's event wrapper embeds only the Snapshotter interface,
        # so its Cleaner check never succeeds: the GC does the cleaning.
        raise NotImplemented_("snapshotter does not implement Cleanup method")


class SnapshotsGRPC:
    """The ``io.containerd.grpc.v1.snapshots`` plugin."""

    def __init__(self, service: SnapshotsService) -> None:
        self.servicer = SnapshotsServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_SnapshotsServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> SnapshotsService:
    metadata: MetadataPlugin = ic.get(METADATA)
    exchange: Exchange = ic.get(EVENT)
    # Snapshotters that failed or were skipped are not served, as containerd's metadata plugin leaves them out.
    backends = ic.get_by_type(SNAPSHOTTER)
    wrapped = snapshotters_for(metadata.db, backends)
    return SnapshotsService({name: EventedSnapshotter(sn, exchange) for name, sn in wrapped.items()})


def _init_grpc(ic: InitContext) -> SnapshotsGRPC:
    return SnapshotsGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(EVENT, METADATA), init=_init_service))
register(Registration(type=GRPC, id="snapshots", requires=(SERVICE,), init=_init_grpc))
