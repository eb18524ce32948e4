"""Leases: the metadata lease manager and ``containerd.services.leases.v1.Leases``."""

from __future__ import annotations

import os
import time

import grpc
from twisted.trial.unittest import SynchronousTestCase

from cdtwist.api.services.content.v1 import content_pb2 as content_api
from cdtwist.api.services.leases.v1 import leases_pb2 as api
from cdtwist.errors import AlreadyExists, CdtwistError, InvalidArgument, NotFound, NotImplemented_
from cdtwist.metadata import gc as mgc
from cdtwist.metadata import leases as store
from cdtwist.metadata import namespaces
from cdtwist.metadata.db import DB
from tests.test_content_service import Fixture, digest_of

Code = grpc.StatusCode
DIGEST = digest_of(b"x")


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()

    def update(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.db.update(lambda tx: fn(tx, *args))

    def view(self, fn, *args):  # type: ignore[no-untyped-def]
        return self.db.view(lambda tx: fn(tx, *args))

    def test_create_list_delete(self) -> None:
        before = time.time_ns()
        lease = self.update(store.create, "ns", "b", {"x": "1", "empty": ""})
        self.assertEqual((lease.id, lease.labels), ("b", {"x": "1"}))
        self.assertGreaterEqual(lease.created_at, before)
        self.update(store.create, "ns", "a", None)
        self.assertIn("ns", self.view(namespaces.list_names))
        self.assertEqual([lease.id for lease in self.view(store.list_leases, "ns")], ["a", "b"])
        self.assertEqual(self.view(store.list_leases, "ns")[1].labels, {"x": "1"})
        self.assertEqual(self.view(store.list_leases, "other"), [])
        err = self.assertRaises(AlreadyExists, self.update, store.create, "ns", "a", None)
        self.assertEqual(str(err), 'lease "a": already exists')
        self.update(store.create, "other", "a", None)  # ids are per namespace
        collector = mgc.Collector(self.db)
        self.update(store.delete, "ns", "a", collector)
        self.assertTrue(collector.dirty)
        err = self.assertRaises(NotFound, self.update, store.delete, "ns", "a", None)
        self.assertEqual(str(err), 'lease "a": not found')

    def test_create_errors(self) -> None:
        err = self.assertRaises(CdtwistError, self.update, store.create, "ns", "", None)
        self.assertEqual(str(err), "lease id must be provided")
        err = self.assertRaises(CdtwistError, self.update, store.create, "ns", "l", {"": "v"})
        self.assertEqual(str(err), 'failed to set label ""="v": key required')
        self.assertEqual(self.view(store.list_leases, "ns"), [])

    def test_filters(self) -> None:
        self.update(store.create, "ns", "one", {"kind": "a"})
        self.update(store.create, "ns", "two", {"kind": "b"})
        self.update(store.create, "ns", "three", None)
        ids = lambda *f: [lease.id for lease in self.view(store.list_leases, "ns", *f)]  # noqa: E731
        self.assertEqual(ids("labels.kind==a"), ["one"])
        self.assertEqual(ids("labels.kind"), ["one", "two"])
        self.assertEqual(ids("id~=^t"), ["three", "two"])
        self.assertEqual(ids("id==one", "id==two"), ["one", "two"])
        err = self.assertRaises(InvalidArgument, self.view, store.list_leases, "ns", "id==")
        self.assertEqual(
            str(err), "filters: parse error: [id==]: expected value or quoted: invalid argument: invalid argument"
        )

    def test_resources(self) -> None:
        self.update(store.create, "ns", "l", None)
        for resource in (
            store.Resource("snap2", "snapshots/overlayfs"),
            store.Resource("ref", "ingests"),
            store.Resource(DIGEST, "content"),
            store.Resource("snap1", "snapshots/native"),
            store.Resource("ref", "ingests"),  # twice: once
        ):
            self.update(store.add_resource, "ns", "l", resource)
        self.assertEqual(
            self.view(store.list_resources, "ns", "l"),
            [
                store.Resource(DIGEST, "content"),
                store.Resource("ref", "ingests"),
                store.Resource("snap1", "snapshots/native"),
                store.Resource("snap2", "snapshots/overlayfs"),
            ],
        )
        collector = mgc.Collector(self.db)
        self.update(store.delete_resource, "ns", "l", store.Resource("ref", "ingests"), collector)
        self.update(store.delete_resource, "ns", "l", store.Resource("absent", "ingests"), None)
        self.assertTrue(collector.dirty)
        self.assertEqual(len(self.view(store.list_resources, "ns", "l")), 3)

    def test_resource_errors(self) -> None:
        self.update(store.create, "ns", "l", None)
        cases = [
            (
                store.Resource("x", "content"),
                InvalidArgument,
                "invalid content resource id x: invalid checksum digest format",
            ),
            (store.Resource("x", "content/a"), InvalidArgument, "invalid resource type content/a"),
            (store.Resource("x", "ingests/a"), InvalidArgument, "invalid resource type ingests/a"),
            (store.Resource("x", "snapshots"), InvalidArgument, "invalid snapshot resource type snapshots"),
            (store.Resource("x", "snapshots/a/b"), InvalidArgument, "invalid snapshot resource type snapshots/a/b"),
            (store.Resource("x", "images"), NotImplemented_, "resource type images not supported yet"),
            (store.Resource("x", ""), NotImplemented_, "resource type  not supported yet"),
        ]
        for resource, cls, message in cases:
            err = self.assertRaises(cls, self.update, store.add_resource, "ns", "l", resource)
            self.assertEqual(err.context, message)
        for fn in (store.add_resource, store.delete_resource):
            err = self.assertRaises(NotFound, self.update, fn, "ns", "nope", store.Resource(DIGEST, "content"))
            self.assertEqual(str(err), 'lease "nope": not found')
        err = self.assertRaises(NotFound, self.view, store.list_resources, "ns", "nope")
        self.assertEqual(str(err), 'lease "nope": not found')

    def test_random_id(self) -> None:
        lid = store.random_id(1_234_567_890_123)
        self.assertRegex(lid, r"^567890123-[A-Za-z0-9_-]{4}$")
        self.assertNotEqual(store.random_id(), store.random_id())

    def test_expiring_lease_roots(self) -> None:
        collector = mgc.Collector(self.db)
        past = "2001-02-03T04:05:06Z"
        self.update(store.create, "ns", "old", {mgc.LABEL_GC_EXPIRE: past})
        self.update(store.create, "ns", "new", {mgc.LABEL_GC_EXPIRE: "2999-01-01T00:00:00+01:00"})
        roots = self.view(collector.roots)
        self.assertEqual([n.key for n in roots], ["new"])
        collector.garbage_collect()
        self.assertEqual([lease.id for lease in self.view(store.list_leases, "ns")], ["new"])


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture(self)
        self.stub = self.f.lease_stub

    def test_create_with_and_without_id(self) -> None:
        lease = self.stub.Create(api.CreateRequest(id="mine", labels={"a": "b"}), metadata=self.f.md()).lease
        self.assertEqual((lease.id, dict(lease.labels)), ("mine", {"a": "b"}))
        self.assertGreater(lease.created_at.seconds, 0)
        generated = self.stub.Create(api.CreateRequest(), metadata=self.f.md()).lease
        self.assertRegex(generated.id, r"^\d+-[A-Za-z0-9_-]{4}$")
        err = self.assertRaises(grpc.RpcError, self.stub.Create, api.CreateRequest(id="mine"), metadata=self.f.md())
        self.assertEqual((err.code(), err.details()), (Code.ALREADY_EXISTS, 'lease "mine": already exists'))
        err = self.assertRaises(grpc.RpcError, self.stub.Create, api.CreateRequest(id="x"), metadata=self.f.md(None))
        self.assertEqual(
            (err.code(), err.details()), (Code.FAILED_PRECONDITION, "namespace is required: failed precondition")
        )

    def test_list(self) -> None:
        for lid in ("b", "a"):
            self.stub.Create(api.CreateRequest(id=lid, labels={"id": lid}), metadata=self.f.md())
        listed = self.stub.List(api.ListRequest(), metadata=self.f.md()).leases
        self.assertEqual([lease.id for lease in listed], ["a", "b"])
        listed = self.stub.List(api.ListRequest(filters=["labels.id==b"]), metadata=self.f.md()).leases
        self.assertEqual([lease.id for lease in listed], ["b"])
        err = self.assertRaises(grpc.RpcError, self.stub.List, api.ListRequest(filters=["=="]), metadata=self.f.md())
        self.assertEqual(err.code(), Code.INVALID_ARGUMENT)
        self.assertTrue(err.details().endswith(": invalid argument: invalid argument"), err.details())

    def test_resources(self) -> None:
        self.stub.Create(api.CreateRequest(id="l"), metadata=self.f.md())
        resource = api.Resource(id=DIGEST, type="content")
        self.stub.AddResource(api.AddResourceRequest(id="l", resource=resource), metadata=self.f.md())
        got = self.stub.ListResources(api.ListResourcesRequest(id="l"), metadata=self.f.md()).resources
        self.assertEqual([(r.id, r.type) for r in got], [(DIGEST, "content")])
        self.stub.DeleteResource(api.DeleteResourceRequest(id="l", resource=resource), metadata=self.f.md())
        self.assertEqual(
            len(self.stub.ListResources(api.ListResourcesRequest(id="l"), metadata=self.f.md()).resources), 0
        )
        err = self.assertRaises(
            grpc.RpcError,
            self.stub.AddResource,
            api.AddResourceRequest(id="l", resource=api.Resource(id="x", type="images")),
            metadata=self.f.md(),
        )
        self.assertEqual(
            (err.code(), err.details()), (Code.UNIMPLEMENTED, "resource type images not supported yet: not implemented")
        )
        err = self.assertRaises(
            grpc.RpcError, self.stub.ListResources, api.ListResourcesRequest(id="nope"), metadata=self.f.md()
        )
        self.assertEqual((err.code(), err.details()), (Code.NOT_FOUND, 'lease "nope": not found'))

    def test_delete_sync_collects(self) -> None:
        self.stub.Create(api.CreateRequest(id="l"), metadata=self.f.md())
        self.f.write([content_api.WriteContentRequest(action=content_api.COMMIT, ref="r", data=b"held")], lease="l")
        held = digest_of(b"held")
        self.assertEqual(self.f.backend.info(held).size, 4)
        self.stub.Delete(api.DeleteRequest(id="l"), metadata=self.f.md())
        self.assertEqual(self.f.scheduler.runs, 0)
        self.stub.Create(api.CreateRequest(id="l2"), metadata=self.f.md())
        self.stub.Delete(api.DeleteRequest(id="l2", sync=True), metadata=self.f.md())
        self.assertEqual(self.f.scheduler.runs, 1)
        self.assertRaises(NotFound, self.f.backend.info, held)
        err = self.assertRaises(grpc.RpcError, self.stub.Delete, api.DeleteRequest(id="l"), metadata=self.f.md())
        self.assertEqual((err.code(), err.details()), (Code.NOT_FOUND, 'lease "l": not found'))


class NoEventsTests(SynchronousTestCase):
    def test_leases_publish_nothing(self) -> None:
        f = Fixture(self)
        f.lease_stub.Create(api.CreateRequest(id="l"), metadata=f.md())
        f.lease_stub.Delete(api.DeleteRequest(id="l"), metadata=f.md())
        self.assertIsNone(f.events.get(0.05))
