"""Containers: the metadata container store, its GC roots and ``containerd.services.containers.v1.Containers``.

``StoreTests`` port containerd's ``metadata/containers_test.go``
(TestContainersList, TestContainersCreateUpdateDelete) with the exact
error texts of ``metadata/containers.go``; ``GCTests`` check that a
container holds its snapshot and what its labels name; ``ServiceTests`` run
the servicer behind cdtwist's error interceptor on a real grpcio server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import any_pb2, field_mask_pb2
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import typeurl
from cdtwist.api.services.containers.v1 import containers_pb2 as api
from cdtwist.api.services.containers.v1 import containers_pb2_grpc as api_grpc
from cdtwist.containers import service as containers_service
from cdtwist.containers.service import ContainersGRPC, ContainersService, container_from_grpc, container_to_grpc
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.events.exchange import Exchange
from cdtwist.gc import Node
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.metadata import containers as store
from cdtwist.metadata import gc as mgc
from cdtwist.metadata import namespaces
from cdtwist.metadata.containers import Container, ContainerStore
from cdtwist.metadata.db import DB
from cdtwist.plugin import EVENT, GRPC, METADATA, SERVICE, loader, registry

Code = grpc.StatusCode
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNC = "io.containerd.runc.v2"
IDENTIFIER_RE = "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


def spec(**doc: Any) -> any_pb2.Any:
    """An OCI spec packed as containerd's typeurl packs it (JSON under the spec's type url)."""
    return any_pb2.Any(type_url=SPEC_URL, value=json.dumps({"ociVersion": "1.0.2", **doc}).encode())


def ext(value: str) -> any_pb2.Any:
    return any_pb2.Any(type_url="example.com/ext", value=value.encode())


def container(cid: str = "c1", **kw: Any) -> Container:
    fields: dict[str, Any] = {"runtime_name": RUNC, "spec": spec()}
    fields.update(kw)
    return Container(cid, **fields)


class InlineReactor:
    def callFromThread(self, f, *args):  # noqa: N802
        f(*args)


class _StoreCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()
        self.collector = mgc.Collector(self.db)
        self.store = ContainerStore(self.db, self.collector)

    def assertError(self, cls: type[CdtwistError], message: str, fn, *args, **kw):  # type: ignore[no-untyped-def]  # noqa: N802
        err = self.assertRaises(cls, fn, *args, **kw)
        self.assertIs(type(err), cls)
        self.assertEqual(str(err), message)
        return err


class StoreTests(_StoreCase):
    def test_list_with_filters(self) -> None:
        """TestContainersList: OR of filters, id/runtime.name/image/labels only."""
        created = {}
        for i in range(4):
            cid = f"container-{i}"
            c = container(
                cid,
                labels={"idlabel": cid, "even": str(i % 2 == 0).lower(), "odd": str(i % 2 != 0).lower()},
                image="docker.io/library/busybox:latest" if i < 2 else "",
                runtime_name=RUNC if i != 3 else "io.containerd.other.v1",
                snapshotter="overlayfs",
                snapshot_key=cid,
            )
            before = time.time_ns()
            result = self.store.create("ns", c)
            self.assertEqual(result.created_at, result.updated_at)
            self.assertGreaterEqual(result.created_at, before)
            self.assertEqual(replace(result, created_at=0, updated_at=0), c)
            created[cid] = result
        every = list(created)
        cases: dict[tuple[str, ...], list[str]] = {
            (): every,
            ("labels.even==true", "labels.odd==true"): every,
            ("labels.even==true",): ["container-0", "container-2"],
            ("labels.odd==true",): ["container-1", "container-3"],
            ("id==container-0",): ["container-0"],
            ("labels.idlabel==container-0,labels.even==true",): ["container-0"],
            ("image==docker.io/library/busybox:latest",): ["container-0", "container-1"],
            ("image",): ["container-0", "container-1"],
            (f"runtime.name=={RUNC}",): ["container-0", "container-1", "container-2"],
            ("runtime.name~=other",): ["container-3"],
            ("runtime",): [],
            ("runtime.name",): every,
            ("id",): every,
            ("snapshotter==overlayfs",): [],  # not a container field for filters
            ("snapshotkey==container-0",): [],
            ("spec",): [],
            ('labels."idlabel"==container-2',): ["container-2"],
        }
        for filters, ids in cases.items():
            results = self.store.list("ns", *filters)
            self.assertEqual([r.id for r in results], ids, filters)
            for r in results:
                self.assertEqual(r, created[r.id])
        self.assertEqual(self.store.list("other"), [])
        err = self.assertRaises(InvalidArgument, self.store.list, "ns", 'labels."a')
        self.assertTrue(str(err).endswith(": invalid argument: invalid argument"), str(err))
        for cid in created:
            self.store.delete("ns", cid)
            self.assertError(NotFound, f"container {cid}: not found", self.store.delete, "ns", cid)
        self.assertEqual(self.store.list("ns"), [])

    def test_list_order_is_bytewise(self) -> None:
        for cid in ["b", "B", "a1", "a", "a-0", "Z9"]:
            self.store.create("ns", container(cid))
        self.assertEqual([c.id for c in self.store.list("ns")], ["B", "Z9", "a", "a-0", "a1", "b"])

    def test_create_validation_messages(self) -> None:
        prefix = "create container failed validation: "
        long_id = "a" * 77
        cases: list[tuple[Container, str]] = [
            (container(""), "container.ID: identifier must not be empty"),
            (container("bad id"), f'container.ID: identifier "bad id" must match {IDENTIFIER_RE}'),
            (container(long_id), f'container.ID: identifier "{long_id}" greater than maximum length (76 characters)'),
            (container(extensions={"": ext("x")}), "container.Extension keys must not be zero-length"),
            (
                container(labels={"k" * 4000: "v" * 100}),
                "containers.Labels: label key and value greater than maximum size (4096 bytes), key: kkkkkkkkkk",
            ),
            (container(runtime_name=""), "container.Runtime.Name must be set"),
            (container(spec=None), "container.Spec must be set"),
            (container(snapshot_key="k"), "container.Snapshotter must be set if container.SnapshotKey is set"),
            # the order of checks: id, extensions, labels, runtime, spec, snapshotter
            (container("", runtime_name="", spec=None), "container.ID: identifier must not be empty"),
            (container(runtime_name="", spec=None, snapshot_key="k"), "container.Runtime.Name must be set"),
        ]
        for c, message in cases:
            self.assertError(InvalidArgument, prefix + message + ": invalid argument", self.store.create, "ns", c)
        self.assertEqual(self.store.list("ns"), [])
        # nothing was written: not even the namespace's containers bucket
        self.assertError(
            NotFound, 'cannot delete container "c1" in namespace "ns": not found', self.store.delete, "ns", "c1"
        )

    def test_create_write_errors_roll_back(self) -> None:
        self.assertError(
            CdtwistError,
            'failed to write container "c1": failed to set label ""="v": key required',
            self.store.create,
            "ns",
            container(labels={"": "v"}),
        )
        self.assertError(
            CdtwistError,
            'failed to write container "c1": key too large',
            self.store.create,
            "ns",
            container(extensions={"e" * 32769: ext("x")}),
        )
        self.assertEqual(self.db.view(lambda tx: namespaces.list_names(tx)), [])
        # an empty key with an empty value is simply dropped
        created = self.store.create("ns", container(labels={"": "", "a": "b", "gone": ""}))
        self.assertEqual(created.labels, {"a": "b"})

    def test_create_keeps_every_field(self) -> None:
        options = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x0a\x04runc")
        c = container(
            labels={"a": "b"},
            image="img:1",
            runtime_options=options,
            snapshotter="native",
            snapshot_key="c1-snap",
            extensions={"x": ext("1"), "empty": any_pb2.Any()},
        )
        created = self.store.create("ns", c)
        got = self.store.get("ns", "c1")
        self.assertEqual(got, created)
        self.assertEqual(got.runtime_options, options)
        self.assertEqual(got.spec, spec())
        self.assertEqual(got.extensions, {"x": ext("1"), "empty": any_pb2.Any()})
        # absent options stay absent; an empty Any is still present (bolt keeps empty values)
        other = self.store.create("ns", container("c2", runtime_options=any_pb2.Any(), spec=any_pb2.Any()))
        self.assertEqual(self.store.get("ns", "c2"), other)
        self.assertEqual(self.store.get("ns", "c2").runtime_options, any_pb2.Any())
        self.assertIsNone(self.store.create("ns", container("c3")).runtime_options)
        self.assertIsNone(self.store.get("ns", "c3").runtime_options)
        # the caller's record is not changed
        mine = container("c4", labels={"a": "", "b": "c"})
        self.store.create("ns", mine)
        self.assertEqual(mine.labels, {"a": "", "b": "c"})
        self.assertEqual(mine.created_at, 0)

    def test_already_exists_and_not_found(self) -> None:
        self.store.create("ns", container())
        self.assertError(AlreadyExists, 'container "c1": already exists', self.store.create, "ns", container())
        self.store.create("other", container())  # ids are per namespace
        self.assertError(NotFound, 'container "c2" in namespace "ns": not found', self.store.get, "ns", "c2")
        self.assertError(NotFound, 'container "c1" in namespace "nope": not found', self.store.get, "nope", "c1")
        self.assertError(NotFound, 'container "" in namespace "ns": not found', self.store.get, "ns", "")
        self.assertError(NotFound, "container c2: not found", self.store.delete, "ns", "c2")
        self.assertError(NotFound, "container : not found", self.store.delete, "ns", "")
        self.assertError(
            NotFound, 'cannot delete container "c1" in namespace "nope": not found', self.store.delete, "nope", "c1"
        )
        self.assertError(NotFound, 'container "c2": not found', self.store.update, "ns", container("c2"))
        self.assertError(
            NotFound,
            'cannot update container "c1" in namespace "nope": not found',
            self.store.update,
            "nope",
            container(),
        )
        self.assertError(
            InvalidArgument, "must specify a container id: invalid argument", self.store.update, "ns", container("")
        )
        # the bucket outlives the namespace's last container, as bolt's does
        self.store.delete("ns", "c1")
        self.assertError(NotFound, "container c1: not found", self.store.delete, "ns", "c1")
        self.assertError(NotFound, 'container "c1": not found', self.store.update, "ns", container())

    def test_update_field_masks(self) -> None:
        """TestContainersCreateUpdateDelete's update cases, plus every error text."""
        base = self.store.create(
            "ns",
            container(
                labels={"foo": "one", "bar": "two"},
                image="image-1",
                snapshotter="overlayfs",
                snapshot_key="key-1",
                extensions={"hello": ext("world"), "keep": ext("me")},
            ),
        )
        time.sleep(0.001)

        def update(c: Container, *paths: str) -> Container:
            result = self.store.update("ns", c, *paths)
            self.assertEqual(result.created_at, base.created_at)
            self.assertGreater(result.updated_at, base.updated_at)
            stored = self.store.get("ns", c.id)
            self.assertEqual(replace(stored, extensions={}), replace(result, extensions={}))
            return result

        # labels.<key>: set, clear, absent in the request means clear
        r = update(container(labels={"foo": "new", "baz": "three"}), "labels.foo", "labels.baz", "labels.bar")
        self.assertEqual(r.labels, {"foo": "new", "baz": "three"})
        # labels: replace the map
        r = update(container(labels={"only": "this", "empty": ""}), "labels")
        self.assertEqual(r.labels, {"only": "this"})
        # image and snapshotkey
        r = update(container(image="image-2", snapshot_key="key-2"), "image", "snapshotkey")
        self.assertEqual((r.image, r.snapshot_key, r.snapshotter), ("image-2", "key-2", "overlayfs"))
        # spec
        r = update(container(spec=spec(hostname="h")), "spec")
        self.assertEqual(r.spec, spec(hostname="h"))
        # runtime options are never updated
        opts = any_pb2.Any(type_url="x", value=b"y")
        r = update(container(runtime_options=opts, labels={"a": "b"}, snapshotter="overlayfs"), "labels")
        self.assertIsNone(r.runtime_options)
        self.assertIsNone(self.store.get("ns", "c1").runtime_options)
        # extensions.<key>: set, and an absent key becomes an empty Any (kept)
        r = update(container(extensions={"hello": ext("there")}), "extensions.hello", "extensions.new")
        self.assertEqual(r.extensions, {"hello": ext("there"), "keep": ext("me"), "new": any_pb2.Any()})
        self.assertEqual(self.store.get("ns", "c1").extensions, r.extensions)
        # extensions: the answer holds the request's map, the store merges (bolt never deletes)
        r = update(container(extensions={"other": ext("o")}), "extensions")
        self.assertEqual(r.extensions, {"other": ext("o")})
        self.assertEqual(
            self.store.get("ns", "c1").extensions,
            {"hello": ext("there"), "keep": ext("me"), "new": any_pb2.Any(), "other": ext("o")},
        )

        # errors
        def fails(cls: type[CdtwistError], message: str, c: Container, *paths: str) -> None:
            before = self.store.get("ns", "c1")
            self.assertError(cls, message, self.store.update, "ns", c, *paths)
            self.assertEqual(self.store.get("ns", "c1"), before)

        for path in ("runtime", "runtime.name", "snapshotter", "id", "created_at", "Labels", "snapshot_key", "name"):
            fails(InvalidArgument, f'cannot update "{path}" field on "c1": invalid argument', container(), path)
        fails(InvalidArgument, "update failed validation: container.Spec must be set: invalid argument",
              container(spec=None), "spec")  # fmt: skip
        fails(
            InvalidArgument,
            "update failed validation: container.Extension keys must not be zero-length: invalid argument",
            container(),
            "extensions.",
        )
        fails(
            InvalidArgument,
            "update failed validation: containers.Labels: label key and value greater than maximum size "
            "(4096 bytes), key: kkkkkkkkkk: invalid argument",
            container(labels={"k" * 5000: "v"}),
            "labels",
        )
        fails(
            CdtwistError,
            'failed to write container "c1": failed to set label ""="v": key required',
            container(labels={"": "v"}),
            "labels.",
        )
        fails(InvalidArgument, "container.Snapshotter field is immutable: invalid argument", container(snapshotter="x"))
        fails(InvalidArgument, "container.Snapshotter field is immutable: invalid argument",
              container(snapshotter="", runtime_name="other"))  # fmt: skip
        fails(InvalidArgument, "container.Runtime.Name field is immutable: invalid argument",
              container(snapshotter="overlayfs", runtime_name="other"))  # fmt: skip
        # a full replace names the stored snapshotter, or fails before validation
        fails(InvalidArgument, "container.Snapshotter field is immutable: invalid argument",
              container(snapshot_key="k"))  # fmt: skip
        # with a mask, a snapshot key alone passes validation while the snapshotter is stored
        self.store.update("ns", container(snapshot_key="k3"), "snapshotkey")

    def test_full_replace(self) -> None:
        self.store.create(
            "ns",
            container(labels={"a": "1"}, image="i", snapshotter="native", snapshot_key="k",
                      runtime_options=ext("opts"), extensions={"e": ext("1")}),
        )  # fmt: skip
        new = container(labels={"b": "2"}, image="", snapshotter="native", snapshot_key="k2",
                        spec=spec(hostname="x"), extensions={"f": ext("2")},
                        runtime_options=ext("ignored"))  # fmt: skip
        r = self.store.update("ns", new)
        self.assertEqual((r.labels, r.image, r.snapshot_key, r.spec), ({"b": "2"}, "", "k2", spec(hostname="x")))
        self.assertEqual(r.runtime_options, ext("opts"))
        self.assertEqual(r.extensions, {"f": ext("2")})
        self.assertEqual(self.store.get("ns", "c1").extensions, {"e": ext("1"), "f": ext("2")})
        # a full replace without a spec fails validation
        self.assertError(
            InvalidArgument,
            "update failed validation: container.Spec must be set: invalid argument",
            self.store.update,
            "ns",
            container(snapshotter="native", spec=None),
        )

    def test_delete_marks_the_collector_dirty(self) -> None:
        self.store.create("ns", container())
        self.assertFalse(self.collector.dirty)
        self.store.update("ns", container(labels={"a": "b"}), "labels")
        self.assertFalse(self.collector.dirty)
        self.store.delete("ns", "c1")
        self.assertTrue(self.collector.dirty)

    def test_namespace_delete_refuses_while_containers_exist(self) -> None:
        self.store.create("ns", container())
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "ns"))
        self.assertEqual(str(err), 'namespace "ns" must be empty, but it still has containers: failed precondition')
        # containerd's order: images, blobs, containers, snapshots
        names = [check.__name__ for check in namespaces.OBJECT_CHECKS]
        self.assertLess(names.index("_has_blobs"), names.index("_has_containers"))
        self.assertLess(names.index("_has_containers"), names.index("_has_snapshots"))
        self.db.update(
            lambda tx: tx.execute(
                "INSERT INTO images(namespace, name, target_media_type, target_digest, target_size, created_at,"
                " updated_at) VALUES ('ns', 'i', 'm', 'sha256:x', 1, 0, 0)"
            )
        )
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "ns"))
        self.assertIn("still has images, containers: failed precondition", str(err))
        self.db.update(lambda tx: tx.execute("DELETE FROM images"))
        self.store.delete("ns", "c1")
        self.db.update(lambda tx: namespaces.delete(tx, "ns"))
        # the namespace (and its containers bucket) is gone; creating brings both back
        self.assertError(
            NotFound, 'cannot delete container "c1" in namespace "ns": not found', self.store.delete, "ns", "c1"
        )
        self.store.create("ns", container())
        self.assertEqual(self.db.view(namespaces.list_names), ["ns"])

    def test_module_functions_in_one_transaction(self) -> None:
        """The API the tasks service reads containers with."""
        self.store.create("ns", container("a", labels={"x": "1"}))
        self.store.create("ns", container("b"))
        self.assertEqual(self.db.view(lambda tx: store.get(tx, "ns", "a")).labels, {"x": "1"})
        self.assertEqual([c.id for c in self.db.view(lambda tx: store.list_(tx, "ns", "labels.x"))], ["a"])
        err = self.assertRaises(NotFound, self.db.view, lambda tx: store.get(tx, "ns", "zz"))
        self.assertEqual(str(err), 'container "zz" in namespace "ns": not found')


class GCTests(_StoreCase):
    def test_roots(self) -> None:
        """The container part of containerd's scanRoots."""
        d = ["sha256:" + str(i) * 64 for i in range(5)]
        for ns, cid, snapshotter, key, labels in [
            ("ns1", "c1", "overlayfs", "c1-snap", {}),
            ("ns1", "c2", "", "", {mgc.LABEL_GC_CONTENT_REF: d[0], "other": d[1]}),
            ("ns2", "c1", "native", "k", {mgc.LABEL_GC_SNAP_REF + "overlayfs": "s2",
                                          mgc.LABEL_GC_CONTENT_REF + ".m": d[2],
                                          mgc.LABEL_GC_CONTENT_REF + "x": d[3]}),
            ("ns2", "c2", "native", "", {}),
        ]:  # fmt: skip
            self.store.create(ns, container(cid, labels=labels, snapshotter=snapshotter, snapshot_key=key))
        collector = mgc.Collector(self.db, kinds=[store.KIND])
        self.assertEqual(
            set(self.db.view(collector.roots)),
            {
                Node(mgc.SNAPSHOT, "ns1", "overlayfs/c1-snap"),
                Node(mgc.CONTENT, "ns1", d[0]),
                Node(mgc.SNAPSHOT, "ns2", "native/k"),
                Node(mgc.SNAPSHOT, "ns2", "overlayfs/s2"),
                Node(mgc.CONTENT, "ns2", d[2]),
                Node(mgc.SNAPSHOT, "ns2", "native/"),
            },
        )

    def test_registered_in_the_global_graph(self) -> None:
        self.assertIn(store.KIND, mgc.KINDS)
        self.assertEqual(store.KIND.scan_all, None)  # containers are never collected

    def test_container_holds_its_snapshot_and_blobs(self) -> None:
        """With the real content and snapshot kinds: the sweep keeps what a container holds, until it goes."""
        from cdtwist.metadata import content as mcontent
        from cdtwist.metadata import snapshots as msnapshots

        blob, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64

        def seed(tx: Any) -> None:
            tx.execute("INSERT INTO namespaces(name) VALUES ('ns')")
            for dg in (blob, other):
                tx.execute("INSERT INTO content_blobs VALUES ('ns', ?, 1, 0, 0)", (dg,))
            tx.execute("INSERT INTO snapshotters(namespace, snapshotter) VALUES ('ns', 'native')")
            for key, parent in (("base", ""), ("c1-snap", "base"), ("loose", "")):
                tx.execute(
                    "INSERT INTO snapshots(namespace, snapshotter, key, bkey, parent, created_at, updated_at)"
                    " VALUES ('ns', 'native', ?, ?, ?, 0, 0)",
                    (key, f"ns/1/{key}", parent),
                )

        self.db.update(seed)
        self.store.create(
            "ns", container(snapshotter="native", snapshot_key="c1-snap", labels={mgc.LABEL_GC_CONTENT_REF: blob})
        )
        collector = mgc.Collector(self.db, kinds=[store.KIND, mcontent.KIND, msnapshots.KIND])

        def left() -> tuple[list[str], list[str]]:
            def q(tx: Any) -> tuple[list[str], list[str]]:
                blobs = [r[0] for r in tx.execute("SELECT digest FROM content_blobs ORDER BY digest")]
                snaps = [r[0] for r in tx.execute("SELECT key FROM snapshots ORDER BY key")]
                return blobs, snaps

            return self.db.view(q)

        collector.garbage_collect()
        self.assertEqual(left(), ([blob], ["base", "c1-snap"]))
        self.store.delete("ns", "c1")
        collector.garbage_collect()
        self.assertEqual(left(), ([], []))


# -- the service over gRPC ---------------------------------------------------------------


class Fixture:
    """DB, exchange, the containers service on a grpcio server with cdtwist's interceptor, a stub."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cdtct", dir="/tmp")
        case.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = DB(os.path.join(self.tmp, "meta.sqlite"))
        self.db.open()
        case.addCleanup(self.db.close)
        self.collector = mgc.Collector(self.db)
        self.exchange = Exchange(InlineReactor())  # type: ignore[arg-type]
        self.events = self.exchange.subscribe()
        case.addCleanup(self.events.close)
        self.service = ContainersService(ContainerStore(self.db, self.collector), self.exchange)
        self.server = grpc.server(ThreadPoolExecutor(4), interceptors=[ErrorAndMetricsInterceptor()])
        ContainersGRPC(self.service).register_grpc(self.server)
        address = os.path.join(self.tmp, "c.sock")
        self.server.add_insecure_port("unix:" + address)
        self.server.start()
        case.addCleanup(lambda: self.server.stop(None).wait(5))
        self.channel = grpc.insecure_channel("unix:" + address)
        case.addCleanup(self.channel.close)
        self.stub = api_grpc.ContainersStub(self.channel)

    @staticmethod
    def md(namespace: str | None = "default") -> list[tuple[str, str]]:
        return [("containerd-namespace", namespace)] if namespace is not None else []

    def create(self, cid: str = "c1", namespace: str | None = "default", **kw: Any) -> api.Container:
        fields: dict[str, Any] = {"runtime": api.Container.Runtime(name=RUNC), "spec": spec()}
        fields.update(kw)
        req = api.CreateContainerRequest(container=api.Container(id=cid, **fields))
        return self.stub.Create(req, metadata=self.md(namespace)).container

    def update(self, c: api.Container, *paths: str, namespace: str = "default") -> api.Container:
        mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
        req = api.UpdateContainerRequest(container=c, update_mask=mask)
        return self.stub.Update(req, metadata=self.md(namespace)).container

    def event(self) -> tuple[str, str, str, dict[str, Any]]:
        envelope = self.events.get(2)
        assert envelope is not None, "no event"
        message = typeurl.unmarshal_any(envelope.event)
        fields = {f.name: v for f, v in message.ListFields()}
        fields = {k: dict(v) if k == "labels" else v for k, v in fields.items()}
        return envelope.namespace, envelope.topic, envelope.event.type_url, fields

    def no_event(self) -> None:
        assert self.events.get(0.05) is None


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture(self)

    def assertStatus(self, code: grpc.StatusCode, message: str, fn, *args, **kw):  # type: ignore[no-untyped-def]  # noqa: N802
        err = self.assertRaises(grpc.RpcError, fn, *args, **kw)
        self.assertEqual((err.code(), err.details()), (code, message))
        return err

    def test_create_get_and_event(self) -> None:
        options = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x0a\x04runc")
        before = time.time_ns()
        c = self.f.create(
            labels={"k": "v", "empty": ""},
            image="docker.io/library/busybox:latest",
            runtime=api.Container.Runtime(name=RUNC, options=options),
            snapshotter="overlayfs",
            snapshot_key="c1",
            extensions={"e": ext("1")},
        )
        self.assertEqual((c.id, dict(c.labels), c.image), ("c1", {"k": "v"}, "docker.io/library/busybox:latest"))
        self.assertEqual((c.runtime.name, c.runtime.options), (RUNC, options))
        self.assertEqual((c.spec, c.snapshotter, c.snapshot_key), (spec(), "overlayfs", "c1"))
        self.assertEqual(dict(c.extensions), {"e": ext("1")})
        self.assertEqual(c.created_at, c.updated_at)
        self.assertGreaterEqual(c.created_at.ToNanoseconds(), before)
        self.assertEqual(
            self.f.event(),
            (
                "default",
                "/containers/create",
                "containerd.events.ContainerCreate",
                {
                    "id": "c1",
                    "image": "docker.io/library/busybox:latest",
                    "runtime": self._event_runtime(RUNC, options),
                },
            ),
        )
        got = self.f.stub.Get(api.GetContainerRequest(id="c1"), metadata=self.f.md()).container
        self.assertEqual(got, c)
        # the runtime is always sent, options only when set; the spec only when set
        bare = self.f.create("c2")
        self.assertTrue(bare.HasField("runtime"))
        self.assertFalse(bare.runtime.HasField("options"))
        self.assertTrue(bare.HasField("created_at") and bare.HasField("updated_at"))
        ns, topic, _, fields = self.f.event()
        self.assertEqual((topic, fields["id"]), ("/containers/create", "c2"))
        self.assertFalse(fields["runtime"].HasField("options"))
        self.assertNotIn("image", fields)

    @staticmethod
    def _event_runtime(name: str, options: any_pb2.Any) -> Any:
        from cdtwist.api.events import container_pb2

        return container_pb2.ContainerCreate.Runtime(name=name, options=options)

    def test_create_errors(self) -> None:
        md = self.f.md
        prefix = "create container failed validation: "
        self.assertStatus(Code.FAILED_PRECONDITION, "namespace is required: failed precondition",
                          self.f.create, namespace=None)  # fmt: skip
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'namespace validation: identifier "Bad ns" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: '
            "invalid argument",
            self.f.create,
            namespace="Bad ns",
        )
        self.assertStatus(Code.INVALID_ARGUMENT, prefix + "container.Runtime.Name must be set: invalid argument",
                          self.f.create, runtime=None)  # fmt: skip
        self.assertStatus(Code.INVALID_ARGUMENT, prefix + "container.Spec must be set: invalid argument",
                          self.f.create, spec=None)  # fmt: skip
        # an empty spec is a spec
        self.assertEqual(self.f.create("empty-spec", spec=any_pb2.Any()).spec, any_pb2.Any())
        self.f.create("c1")
        self.assertStatus(Code.ALREADY_EXISTS, 'container "c1": already exists', self.f.create, "c1")
        self.assertStatus(Code.UNKNOWN, 'failed to write container "c3": failed to set label ""="v": key required',
                          self.f.create, "c3", labels={"": "v"})  # fmt: skip
        self.assertStatus(Code.NOT_FOUND, 'container "c9" in namespace "default": not found',
                          self.f.stub.Get, api.GetContainerRequest(id="c9"), metadata=md())  # fmt: skip
        self.assertStatus(Code.FAILED_PRECONDITION, "namespace is required: failed precondition",
                          self.f.stub.Get, api.GetContainerRequest(id="c1"))  # fmt: skip
        for topic in ("/containers/create", "/containers/create"):
            self.assertEqual(self.f.event()[1], topic)
        self.f.no_event()

    def test_list_and_list_stream(self) -> None:
        for i in range(5):
            self.f.create(f"c{i}", labels={"n": str(i)}, image="img" if i % 2 else "")
            self.f.event()
        self.f.create("other-ns", namespace="other")
        md = self.f.md()

        def ls(*filters: str) -> list[str]:
            req = api.ListContainersRequest(filters=list(filters))
            listed = [c.id for c in self.f.stub.List(req, metadata=md).containers]
            streamed = list(self.f.stub.ListStream(req, metadata=md))
            self.assertEqual([m.container.id for m in streamed], listed)
            return listed

        self.assertEqual(ls(), ["c0", "c1", "c2", "c3", "c4"])
        self.assertEqual(ls("image==img"), ["c1", "c3"])
        self.assertEqual(ls("labels.n==0", "labels.n==4"), ["c0", "c4"])
        self.assertEqual(ls(f"runtime.name=={RUNC},id~=^c[23]$"), ["c2", "c3"])
        self.assertEqual(ls("id==nope"), [])
        # one container per stream message, full records
        streamed = list(self.f.stub.ListStream(api.ListContainersRequest(), metadata=md))
        got = self.f.stub.Get(api.GetContainerRequest(id="c3"), metadata=md).container
        self.assertEqual(streamed[3].container, got)
        err = self.assertRaises(
            grpc.RpcError, self.f.stub.List, api.ListContainersRequest(filters=['labels."a']), metadata=md
        )
        self.assertEqual(err.code(), Code.INVALID_ARGUMENT)
        self.assertTrue(err.details().endswith(": invalid argument: invalid argument"), err.details())
        err2 = self.assertRaises(
            grpc.RpcError, list, self.f.stub.ListStream(api.ListContainersRequest(filters=['labels."a']), metadata=md)
        )
        self.assertEqual((err2.code(), err2.details()), (err.code(), err.details()))
        self.assertStatus(Code.FAILED_PRECONDITION, "namespace is required: failed precondition",
                          self.f.stub.List, api.ListContainersRequest())  # fmt: skip
        self.assertEqual(
            list(self.f.stub.ListStream(api.ListContainersRequest(), metadata=self.f.md("empty"))), []
        )

    def test_update_and_event(self) -> None:
        c = self.f.create(labels={"a": "1"}, image="i1", snapshotter="native", snapshot_key="k1")
        self.f.event()
        req = api.Container(id="c1", labels={"b": "2"}, image="ignored")
        u = self.f.update(req, "labels.b", "labels.a")
        self.assertEqual((dict(u.labels), u.image), ({"b": "2"}, "i1"))
        self.assertEqual(u.created_at, c.created_at)
        self.assertGreater(u.updated_at.ToNanoseconds(), c.updated_at.ToNanoseconds())
        self.assertEqual(
            self.f.event(),
            (
                "default",
                "/containers/update",
                "containerd.events.ContainerUpdate",
                {"id": "c1", "image": "i1", "labels": {"b": "2"}, "snapshot_key": "k1"},
            ),
        )
        u = self.f.update(api.Container(id="c1", snapshot_key="k2", image=""), "snapshotkey", "image")
        self.assertEqual((u.snapshot_key, u.image), ("k2", ""))
        self.assertEqual(self.f.event()[3], {"id": "c1", "labels": {"b": "2"}, "snapshot_key": "k2"})
        # a full replace needs the same runtime and snapshotter, and a spec
        full = api.Container(id="c1", runtime=api.Container.Runtime(name=RUNC), snapshotter="native", spec=spec(),
                             labels={"z": "9"})  # fmt: skip
        u = self.f.update(full)
        self.assertEqual((dict(u.labels), u.snapshot_key), ({"z": "9"}, ""))
        self.f.event()
        # an empty mask is a full replace too
        req2 = api.UpdateContainerRequest(container=full, update_mask=field_mask_pb2.FieldMask())
        self.f.stub.Update(req2, metadata=self.f.md())
        self.f.event()

        self.assertStatus(Code.INVALID_ARGUMENT, "Container.ID required", self.f.update, api.Container())
        self.assertStatus(Code.INVALID_ARGUMENT, "Container.ID required",
                          self.f.stub.Update, api.UpdateContainerRequest())  # fmt: skip
        self.assertStatus(Code.FAILED_PRECONDITION, "namespace is required: failed precondition",
                          self.f.stub.Update, api.UpdateContainerRequest(container=api.Container(id="c1")))  # fmt: skip
        self.assertStatus(Code.INVALID_ARGUMENT, "container.Snapshotter field is immutable: invalid argument",
                          self.f.update, api.Container(id="c1"))  # fmt: skip
        self.assertStatus(Code.INVALID_ARGUMENT, "container.Runtime.Name field is immutable: invalid argument",
                          self.f.update, api.Container(id="c1", snapshotter="native"))  # fmt: skip
        self.assertStatus(Code.INVALID_ARGUMENT, 'cannot update "runtime" field on "c1": invalid argument',
                          self.f.update, api.Container(id="c1"), "runtime")  # fmt: skip
        self.assertStatus(Code.NOT_FOUND, 'container "c2": not found',
                          self.f.update, api.Container(id="c2"), "labels")  # fmt: skip
        self.assertStatus(Code.NOT_FOUND, 'cannot update container "c1" in namespace "other": not found',
                          self.f.update, api.Container(id="c1"), "labels", namespace="other")  # fmt: skip
        self.f.no_event()

    def test_delete_and_event(self) -> None:
        self.f.create()
        self.f.event()
        md = self.f.md()
        self.f.stub.Delete(api.DeleteContainerRequest(id="c1"), metadata=md)
        self.assertEqual(self.f.event(), ("default", "/containers/delete", "containerd.events.ContainerDelete",
                                          {"id": "c1"}))  # fmt: skip
        self.assertTrue(self.f.collector.dirty)
        self.assertStatus(Code.NOT_FOUND, "container c1: not found",
                          self.f.stub.Delete, api.DeleteContainerRequest(id="c1"), metadata=md)  # fmt: skip
        self.assertStatus(Code.NOT_FOUND, 'cannot delete container "c1" in namespace "x": not found',
                          self.f.stub.Delete, api.DeleteContainerRequest(id="c1"), metadata=self.f.md("x"))  # fmt: skip
        self.assertStatus(Code.FAILED_PRECONDITION, "namespace is required: failed precondition",
                          self.f.stub.Delete, api.DeleteContainerRequest(id="c1"))  # fmt: skip
        self.f.no_event()

    def test_conversions_round_trip(self) -> None:
        c = Container(
            "x",
            labels={"a": "b"},
            image="i",
            runtime_name=RUNC,
            runtime_options=ext("o"),
            spec=spec(),
            snapshotter="s",
            snapshot_key="k",
            created_at=1_000_000_001,
            updated_at=2_000_000_002,
            extensions={"e": ext("1")},
        )
        msg = container_to_grpc(c)
        self.assertEqual((msg.created_at.seconds, msg.created_at.nanos), (1, 1))
        self.assertEqual(container_from_grpc(msg), replace(c, created_at=0, updated_at=0))
        # no runtime at all reads as an empty name without options
        self.assertEqual(container_from_grpc(api.Container(id="y")), Container("y"))


class RegistrationTests(SynchronousTestCase):
    def test_plugins_as_containerd_registers_them(self) -> None:
        service = registry.get(f"{SERVICE}.containers-service")
        grpc_plugin = registry.get(f"{GRPC}.containers")
        assert service is not None and grpc_plugin is not None
        self.assertEqual(service.requires, (EVENT, METADATA))
        self.assertEqual(grpc_plugin.requires, (SERVICE,))
        self.assertEqual(containers_service.SERVICE_ID, "containers-service")
        modules = list(loader.BUILTIN_MODULES)
        position = modules.index("cdtwist.containers.service")
        self.assertEqual(modules[position - 1], "cdtwist.introspection.service")
        self.assertEqual(modules[position + 1], "cdtwist.content.service")
