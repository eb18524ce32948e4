"""``containerd.services.snapshots.v1.Snapshots`` over a real grpcio server: codes, messages, streams, events.

The server is cdtwist's servicer with the error interceptor on a UNIX
socket, over the metadata layer and a native engine (and an in-memory one
where many snapshots are needed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
from google.protobuf import field_mask_pb2
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import typeurl
from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as api
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as api_grpc
from cdtwist.events.exchange import Exchange
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.metadata import leases as leasing
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector
from cdtwist.metadata.snapshots import NamespacedSnapshotter
from cdtwist.snapshots import Kind
from cdtwist.snapshots import service as svc
from cdtwist.snapshots.native import NativeSnapshotter
from tests.test_snapshots_service_metadata import TmpSnapshotter

Code = grpc.StatusCode
ROOT = {"containerd.io/gc.root": "2023-01-01T00:00:00Z"}


class InlineReactor:
    def callFromThread(self, f, *args):  # noqa: N802
        f(*args)


class Fixture:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cdtss", dir="/tmp")
        case.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = DB(os.path.join(self.tmp, "meta.sqlite"))
        self.db.open()
        case.addCleanup(self.db.close)
        self.collector = Collector(self.db)
        self.native = NativeSnapshotter(os.path.join(self.tmp, "native"))
        case.addCleanup(self.native.close)
        self.memory = TmpSnapshotter()
        self.exchange = Exchange(InlineReactor())  # type: ignore[arg-type]
        self.events = self.exchange.subscribe()
        case.addCleanup(self.events.close)
        wrapped = {
            name: svc.EventedSnapshotter(NamespacedSnapshotter(self.db, name, engine, self.collector), self.exchange)
            for name, engine in (("native", self.native), ("memory", self.memory))
        }
        self.service = svc.SnapshotsService(wrapped)
        self.server = grpc.server(ThreadPoolExecutor(8), interceptors=[ErrorAndMetricsInterceptor()])
        svc.SnapshotsGRPC(self.service).register_grpc(self.server)
        self.address = os.path.join(self.tmp, "s.sock")
        self.server.add_insecure_port("unix:" + self.address)
        self.server.start()
        case.addCleanup(lambda: self.server.stop(None).wait(5))
        self.channel = grpc.insecure_channel("unix:" + self.address)
        case.addCleanup(self.channel.close)
        self.stub = api_grpc.SnapshotsStub(self.channel)

    @staticmethod
    def md(namespace: str | None = "default", lease: str | None = None) -> list[tuple[str, str]]:
        out = []
        if namespace is not None:
            out.append(("containerd-namespace", namespace))
        if lease is not None:
            out.append(("containerd-lease", lease))
        return out

    def drain_events(self) -> list[tuple[str, str, dict[str, str]]]:
        out = []
        while (env := self.events.get(0.05)) is not None:
            msg = typeurl.unmarshal_any(env.event)
            out.append((env.namespace, env.topic, {f.name: v for f, v in msg.ListFields()}))
        return out


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture(self)
        self.stub = self.f.stub

    def assertStatus(self, code: grpc.StatusCode, message: str, fn, *args, **kw):  # type: ignore[no-untyped-def]  # noqa: N802
        err = self.assertRaises(grpc.RpcError, fn, *args, **kw)
        self.assertEqual((err.code(), err.details()), (code, message))
        return err


class RoundTripTests(_Case):
    def test_lifecycle(self) -> None:
        md = self.f.md()
        r = self.stub.Prepare(api.PrepareSnapshotRequest(snapshotter="native", key="a", labels=ROOT), metadata=md)
        self.assertEqual([(m.type, m.options) for m in r.mounts], [("bind", ["rbind", "rw"])])
        self.assertEqual(r.mounts[0].source, os.path.join(self.f.tmp, "native", "snapshots", "1"))
        self.stub.Commit(api.CommitSnapshotRequest(snapshotter="native", name="c", key="a"), metadata=md)
        v = self.stub.View(api.ViewSnapshotRequest(snapshotter="native", key="v", parent="c"), metadata=md)
        self.assertEqual([(m.type, m.options) for m in v.mounts], [("bind", ["rbind", "ro"])])
        m = self.stub.Mounts(api.MountsRequest(snapshotter="native", key="v"), metadata=md)
        self.assertEqual(m.mounts, v.mounts)
        st = self.stub.Stat(api.StatSnapshotRequest(snapshotter="native", key="v"), metadata=md).info
        self.assertEqual((st.name, st.parent, st.kind, dict(st.labels)), ("v", "c", api.VIEW, {}))
        self.assertEqual(st.created_at, st.updated_at)
        self.assertGreater(st.created_at.seconds, 0)
        c = self.stub.Stat(api.StatSnapshotRequest(snapshotter="native", key="c"), metadata=md).info
        self.assertEqual((c.kind, c.parent), (api.COMMITTED, ""))
        u = self.stub.Usage(api.UsageRequest(snapshotter="native", key="c"), metadata=md)
        self.assertEqual((u.size, u.inodes), (4096, 1))
        infos = [
            i for resp in self.stub.List(api.ListSnapshotsRequest(snapshotter="native"), metadata=md) for i in resp.info
        ]
        self.assertEqual([(i.name, i.kind) for i in infos], [("c", api.COMMITTED), ("v", api.VIEW)])
        self.stub.Remove(api.RemoveSnapshotRequest(snapshotter="native", key="v"), metadata=md)
        self.assertEqual(
            self.f.drain_events(),
            [
                ("default", "/snapshot/prepare", {"key": "a"}),
                ("default", "/snapshot/commit", {"key": "a", "name": "c"}),
                ("default", "/snapshot/remove", {"key": "v"}),
            ],
        )

    def test_update_with_mask(self) -> None:
        md = self.f.md()
        self.stub.Prepare(
            api.PrepareSnapshotRequest(snapshotter="memory", key="k", labels={"a": "1", "b": "2"}), metadata=md
        )
        info = api.Info(name="k", labels={"a": "x", "c": "3"}, kind=api.COMMITTED, parent="ignored")
        mask = field_mask_pb2.FieldMask(paths=["labels.a", "labels.b"])
        out = self.stub.Update(
            api.UpdateSnapshotRequest(snapshotter="memory", info=info, update_mask=mask), metadata=md
        )
        self.assertEqual((dict(out.info.labels), out.info.kind, out.info.parent), ({"a": "x"}, api.ACTIVE, ""))
        out = self.stub.Update(api.UpdateSnapshotRequest(snapshotter="memory", info=info), metadata=md)
        self.assertEqual(dict(out.info.labels), {"a": "x", "c": "3"})
        self.assertGreater(out.info.updated_at.ToNanoseconds(), out.info.created_at.ToNanoseconds())
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'cannot update "name" field on snapshot "k": invalid argument',
            self.stub.Update,
            api.UpdateSnapshotRequest(
                snapshotter="memory", info=info, update_mask=field_mask_pb2.FieldMask(paths=["name"])
            ),
            metadata=md,
        )
        # updates publish nothing
        self.assertEqual([t for _, t, _ in self.f.drain_events()], ["/snapshot/prepare"])

    def test_list_streams_blocks_of_100(self) -> None:
        md = self.f.md("many")
        for i in range(250):
            self.stub.Prepare(api.PrepareSnapshotRequest(snapshotter="memory", key=f"k{i:03d}"), metadata=md)
        sizes = [len(r.info) for r in self.stub.List(api.ListSnapshotsRequest(snapshotter="memory"), metadata=md)]
        self.assertEqual(sizes, [100, 100, 50])
        req = api.ListSnapshotsRequest(snapshotter="memory", filters=["name~=k00", "name==k249"])
        names = [i.name for r in self.stub.List(req, metadata=md) for i in r.info]
        self.assertEqual(names, [f"k00{i}" for i in range(10)] + ["k249"])
        self.assertEqual(list(self.stub.List(api.ListSnapshotsRequest(snapshotter="memory"), metadata=self.f.md())), [])

    def test_lease_header(self) -> None:
        self.f.db.update(lambda tx: leasing.create(tx, "default", "l1"))
        md = self.f.md(lease="l1")
        self.stub.Prepare(api.PrepareSnapshotRequest(snapshotter="memory", key="a"), metadata=md)
        self.stub.Commit(api.CommitSnapshotRequest(snapshotter="memory", name="c", key="a"), metadata=md)
        held = self.f.db.view(lambda tx: leasing.list_resources(tx, "default", "l1"))
        self.assertEqual([(r.type, r.id) for r in held], [("snapshots/memory", "c")])
        self.assertStatus(
            Code.NOT_FOUND,
            "lease does not exist: not found",
            self.stub.Prepare,
            api.PrepareSnapshotRequest(snapshotter="memory", key="b"),
            metadata=self.f.md(lease="nope"),
        )


class ErrorTests(_Case):
    def test_snapshotter_argument(self) -> None:
        md = self.f.md()
        calls = [
            (self.stub.Prepare, api.PrepareSnapshotRequest),
            (self.stub.View, api.ViewSnapshotRequest),
            (self.stub.Mounts, api.MountsRequest),
            (self.stub.Commit, api.CommitSnapshotRequest),
            (self.stub.Remove, api.RemoveSnapshotRequest),
            (self.stub.Stat, api.StatSnapshotRequest),
            (self.stub.Update, api.UpdateSnapshotRequest),
            (self.stub.Usage, api.UsageRequest),
            (self.stub.Cleanup, api.CleanupRequest),
        ]
        for fn, req in calls:
            self.assertStatus(
                Code.INVALID_ARGUMENT, "snapshotter argument missing: invalid argument", fn, req(), metadata=md
            )
            self.assertStatus(
                Code.INVALID_ARGUMENT,
                "snapshotter not loaded: btrfs: invalid argument",
                fn,
                req(snapshotter="btrfs"),
                metadata=md,
            )
        for name in ("", "btrfs"):
            err = self.assertRaises(grpc.RpcError, list, self.stub.List(api.ListSnapshotsRequest(snapshotter=name)))
            self.assertEqual(err.code(), Code.INVALID_ARGUMENT)

    def test_namespace(self) -> None:
        self.assertStatus(
            Code.FAILED_PRECONDITION,
            "namespace is required: failed precondition",
            self.stub.Prepare,
            api.PrepareSnapshotRequest(snapshotter="memory", key="a"),
            metadata=self.f.md(None),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'namespace validation: identifier "-x" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: '
            "invalid argument",
            self.stub.Stat,
            api.StatSnapshotRequest(snapshotter="memory", key="a"),
            metadata=self.f.md("-x"),
        )

    def test_list_errors_are_not_converted(self) -> None:
        """containerd's List returns Walk's error as is: grpc-go sends it as Unknown."""
        err = self.assertRaises(
            grpc.RpcError,
            list,
            self.stub.List(api.ListSnapshotsRequest(snapshotter="memory"), metadata=self.f.md(None)),
        )
        self.assertEqual((err.code(), err.details()), (Code.UNKNOWN, "namespace is required: failed precondition"))
        err = self.assertRaises(
            grpc.RpcError,
            list,
            self.stub.List(api.ListSnapshotsRequest(snapshotter="memory", filters=["name=="]), metadata=self.f.md()),
        )
        self.assertEqual(err.code(), Code.UNKNOWN)
        self.assertTrue(err.details().endswith(": invalid argument"), err.details())

    def test_cleanup_is_not_implemented(self) -> None:
        """containerd 1.6's event wrapper hides the engines' Cleaner: the GC cleans, never this call."""
        for name in ("native", "memory"):
            self.assertStatus(
                Code.UNIMPLEMENTED,
                "snapshotter does not implement Cleanup method: not implemented",
                self.stub.Cleanup,
                api.CleanupRequest(snapshotter=name),
                metadata=self.f.md(),
            )

    def test_failures_publish_nothing(self) -> None:
        md = self.f.md()
        self.assertStatus(
            Code.NOT_FOUND,
            "parent snapshot p does not exist: not found",
            self.stub.Prepare,
            api.PrepareSnapshotRequest(snapshotter="memory", key="a", parent="p"),
            metadata=md,
        )
        self.assertStatus(
            Code.NOT_FOUND,
            "snapshot a does not exist: not found",
            self.stub.Remove,
            api.RemoveSnapshotRequest(snapshotter="memory", key="a"),
            metadata=md,
        )
        self.assertEqual(self.f.drain_events(), [])


class ConversionTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        self.assertEqual(
            [svc.kind_to_grpc(k) for k in (Kind.UNKNOWN, Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED)],
            [api.COMMITTED, api.VIEW, api.ACTIVE, api.COMMITTED],
        )
        self.assertEqual(
            [svc.kind_from_grpc(k) for k in (api.UNKNOWN, api.VIEW, api.ACTIVE, api.COMMITTED)],
            [Kind.COMMITTED, Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED],
        )

    def test_zero_times_go_on_the_wire(self) -> None:
        from cdtwist.snapshots import Info

        out = svc.info_to_grpc(Info(name="x"))
        self.assertTrue(out.HasField("created_at"))
        self.assertEqual(out.created_at.seconds, 0)

    def test_plugin_serves_loaded_snapshotters_only(self) -> None:
        tmp = tempfile.mkdtemp(prefix="cdtss", dir="/tmp")
        self.addCleanup(shutil.rmtree, tmp, True)
        db = DB(os.path.join(tmp, "meta.sqlite"))
        db.open()
        self.addCleanup(db.close)
        engine = TmpSnapshotter()
        ic = SimpleNamespace(
            get=lambda t: {"io.containerd.metadata.v1": SimpleNamespace(db=db), "io.containerd.event.v1": None}[t],
            get_by_type=lambda t: {"memory": engine},
        )
        service = svc._init_service(ic)  # type: ignore[arg-type]
        self.assertEqual(list(service), ["memory"])
        self.assertIs(service["memory"].snapshotter.backend, engine)
