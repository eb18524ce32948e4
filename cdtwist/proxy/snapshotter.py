# -*- test-case-name: tests.test_proxy -*-
"""A snapshotter that forwards every call to another process's Snapshots API.

containerd's ``snapshots/proxy``: each request names the proxy plugin as
its ``snapshotter`` (an external snapshotter serving one engine ignores
it), and the peer's status codes come back as cdtwist's error classes.
The namespaced metadata layer sits on top exactly as on a built-in engine.
Every method blocks on the network: callers are on pool threads.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import field_mask_pb2

from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as api
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as api_grpc
from cdtwist.mount import Mount
from cdtwist.proxy.channel import ProxyClient
from cdtwist.snapshots import Info, Snapshotter, Usage, WalkFunc
from cdtwist.snapshots.wire import info_from_grpc, info_to_grpc, mounts_from_grpc


class ProxySnapshotter(ProxyClient[api_grpc.SnapshotsStub], Snapshotter):
    """:class:`~cdtwist.snapshots.Snapshotter` over a :class:`ProxyChannel`; also a ``Cleaner``."""

    stub_class = api_grpc.SnapshotsStub

    def stat(self, key: str) -> Info:
        req = api.StatSnapshotRequest(snapshotter=self.name, key=key)
        return info_from_grpc(self._call(lambda s: s.Stat(req)).info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = api.UpdateSnapshotRequest(
            snapshotter=self.name, info=info_to_grpc(info), update_mask=field_mask_pb2.FieldMask(paths=fieldpaths)
        )
        return info_from_grpc(self._call(lambda s: s.Update(req)).info)

    def usage(self, key: str) -> Usage:
        resp = self._call(lambda s: s.Usage(api.UsageRequest(snapshotter=self.name, key=key)))
        return Usage(inodes=resp.inodes, size=resp.size)

    def mounts(self, key: str) -> list[Mount]:
        resp = self._call(lambda s: s.Mounts(api.MountsRequest(snapshotter=self.name, key=key)))
        return mounts_from_grpc(resp.mounts)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = api.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return mounts_from_grpc(self._call(lambda s: s.Prepare(req)).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = api.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return mounts_from_grpc(self._call(lambda s: s.View(req)).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = api.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key, labels=labels or {})
        self._call(lambda s: s.Commit(req))

    def remove(self, key: str) -> None:
        self._call(lambda s: s.Remove(api.RemoveSnapshotRequest(snapshotter=self.name, key=key)))

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        req = api.ListSnapshotsRequest(snapshotter=self.name, filters=filters)
        for resp in self._stream(lambda s: s.List(req)):
            for info in resp.info:
                fn(info_from_grpc(info))

    def cleanup(self) -> None:
        self._call(lambda s: s.Cleanup(api.CleanupRequest(snapshotter=self.name)))

    def close(self) -> None:
        """The channel is the plugin's, closed when the plugin stops (``ProxyClient.stop``)."""
