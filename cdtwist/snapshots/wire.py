# -*- test-case-name: tests.test_proxy -*-
"""Snapshot values to and from the gRPC messages (containerd's ``fromInfo``, ``toMounts``...).

Shared by the namespaced snapshots service, the plain one that
``cdtwist serve-plugin`` runs, and the proxy snapshotter that talks to
another process's snapshots service.
"""

from __future__ import annotations

from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as api
from cdtwist.api.types import mount_pb2
from cdtwist.content.wire import timestamp
from cdtwist.errors import CdtwistError, GRPCStatus
from cdtwist.mount import Mount
from cdtwist.snapshots import Info, Kind


def kind_to_grpc(kind: Kind) -> api.Kind:
    """``fromKind``: anything but active or view is committed."""
    if kind == Kind.ACTIVE:
        return api.ACTIVE
    if kind == Kind.VIEW:
        return api.VIEW
    return api.COMMITTED


def kind_from_grpc(kind: int) -> Kind:
    if kind == api.ACTIVE:
        return Kind.ACTIVE
    if kind == api.VIEW:
        return Kind.VIEW
    return Kind.COMMITTED


def info_to_grpc(info: Info) -> api.Info:
    out = api.Info(name=info.name, parent=info.parent, kind=kind_to_grpc(info.kind), labels=info.labels or {})
    # gogo's non-nullable timestamps: always on the wire.
    out.created_at.CopyFrom(timestamp(info.created))
    out.updated_at.CopyFrom(timestamp(info.updated))
    return out


def info_from_grpc(info: api.Info) -> Info:
    return Info(
        kind=kind_from_grpc(info.kind),
        name=info.name,
        parent=info.parent,
        labels=dict(info.labels),
        created=info.created_at.ToNanoseconds(),
        updated=info.updated_at.ToNanoseconds(),
    )


def mounts_to_grpc(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def mounts_from_grpc(mounts: list[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def labels_of(
    request: api.PrepareSnapshotRequest | api.ViewSnapshotRequest | api.CommitSnapshotRequest,
) -> dict[str, str] | None:
    """A request's labels; None when there are none (Go's nil map: no ``WithLabels``)."""
    return dict(request.labels) if request.labels else None


def unconverted(err: Exception) -> CdtwistError:
    """What grpc-go sends for an error a handler returns without ``errdefs.ToGRPC``: Unknown, same text."""
    if isinstance(err, GRPCStatus):
        return err
    text = err.message if isinstance(err, CdtwistError) else str(err)
    return CdtwistError(text)
