# -*- test-case-name: tests.test_proxy -*-
"""The Snapshots API over one engine, without namespaces (containerd's ``contrib/snapshotservice``).

What an external snapshotter serves: the ``snapshotter`` field of each
request is ignored, keys are the engine's own, errors carry containerd's
codes, ``List`` returns walk errors unconverted (code Unknown) and
``Cleanup`` runs the engine's bulk cleanup when it has one.  Handlers run
on gRPC pool threads and block on the engine there.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import empty_pb2

from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as api
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as api_grpc
from cdtwist.errors import NotImplemented_
from cdtwist.snapshots import Cleaner, Info, Snapshotter
from cdtwist.snapshots.wire import info_from_grpc, info_to_grpc, labels_of, mounts_to_grpc, unconverted

#: List sends infos in blocks of this many.
LIST_BLOCK = 100


class PlainSnapshotsServicer(api_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_SnapshotsServicer_to_server(self, server)

    #: served on ``--tcp-address`` too: that is the point of serving it over TLS
    register_tcp = register_grpc

    def Prepare(  # noqa: N802 - generated API
        self, request: api.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> api.PrepareSnapshotResponse:
        mounts = self.sn.prepare(request.key, request.parent, labels_of(request))
        return api.PrepareSnapshotResponse(mounts=mounts_to_grpc(mounts))

    def View(  # noqa: N802
        self, request: api.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> api.ViewSnapshotResponse:
        mounts = self.sn.view(request.key, request.parent, labels_of(request))
        return api.ViewSnapshotResponse(mounts=mounts_to_grpc(mounts))

    def Mounts(self, request: api.MountsRequest, context: grpc.ServicerContext) -> api.MountsResponse:  # noqa: N802
        return api.MountsResponse(mounts=mounts_to_grpc(self.sn.mounts(request.key)))

    def Commit(  # noqa: N802
        self, request: api.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.sn.commit(request.name, request.key, labels_of(request))
        return empty_pb2.Empty()

    def Remove(  # noqa: N802
        self, request: api.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    def Stat(  # noqa: N802
        self, request: api.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> api.StatSnapshotResponse:
        return api.StatSnapshotResponse(info=info_to_grpc(self.sn.stat(request.key)))

    def Update(  # noqa: N802
        self, request: api.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> api.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(info_from_grpc(request.info), *paths)
        return api.UpdateSnapshotResponse(info=info_to_grpc(info))

    def List(  # noqa: N802
        self, request: api.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[api.ListSnapshotsResponse]:
        infos: list[Info] = []
        try:
            # The engine's walk holds its store open; collect, then stream.
            self.sn.walk(infos.append, *request.filters)
        except Exception as e:
            raise unconverted(e) from e
        for start in range(0, len(infos), LIST_BLOCK):
            yield api.ListSnapshotsResponse(info=[info_to_grpc(i) for i in infos[start : start + LIST_BLOCK]])

    def Usage(self, request: api.UsageRequest, context: grpc.ServicerContext) -> api.UsageResponse:  # noqa: N802
        usage = self.sn.usage(request.key)
        return api.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: api.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        if not isinstance(self.sn, Cleaner):
            raise NotImplemented_("snapshotter does not implement Cleanup method")
        self.sn.cleanup()
        return empty_pb2.Empty()
