# -*- test-case-name: tests.test_proxy -*-
"""Content values to and from the gRPC messages, as containerd puts them on the wire.

Shared by the content service and by the proxy content store that talks
to another process's content service.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from cdtwist.api.services.content.v1 import content_pb2 as api
from cdtwist.content.local import Info, Status

#: Go's zero ``time.Time`` as gogo marshals it: containerd's timestamps are
#: non-nullable, so unset ones still go on the wire as this.
GO_ZERO_SECONDS = -62135596800


def timestamp(ns: int | None) -> timestamp_pb2.Timestamp:
    """``ns`` since the epoch; None is Go's zero time."""
    if ns is None:
        return timestamp_pb2.Timestamp(seconds=GO_ZERO_SECONDS)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp) -> int | None:
    """Nanoseconds since the epoch; Go's zero time (or an unset field) is None."""
    if ts.seconds == GO_ZERO_SECONDS and ts.nanos == 0:
        return None
    return ts.ToNanoseconds()


def info_to_grpc(info: Info, updated: bool = True) -> api.Info:
    out = api.Info(digest=info.digest, size=info.size, labels=info.labels)
    out.created_at.CopyFrom(timestamp(info.created_at))
    out.updated_at.CopyFrom(timestamp(info.updated_at if updated else None))
    return out


def info_from_grpc(info: api.Info) -> Info:
    return Info(
        info.digest,
        info.size,
        from_timestamp(info.created_at) or 0,
        from_timestamp(info.updated_at) or 0,
        dict(info.labels),
    )


def status_from_grpc(status: api.Status) -> Status:
    return Status(
        ref=status.ref,
        offset=status.offset,
        total=status.total,
        expected=status.expected,
        started_at=from_timestamp(status.started_at) or 0,
        updated_at=from_timestamp(status.updated_at) or 0,
    )
