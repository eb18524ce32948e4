"""Namespaced snapshots in the metadata database (containerd's ``metadata/snapshot_test.go`` and more).

* containerd's snapshotter test suite (the port in :mod:`tests.test_snapshots_suite`)
  through the metadata layer, over native and over overlayfs, as
  containerd's ``TestMetadata`` runs it;
* ``TestSnapshotterWithRef`` with its in-memory snapshotter (remote
  snapshots found by their ``containerd.io/snapshot.ref`` target);
* what the metadata layer adds: namespaces kept apart, backend keys,
  inherited labels, leases, errors, the GC graph and the engine cleanup,
  namespace deletion refusals.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.metadata import leases as leasing
from cdtwist.metadata import namespaces
from cdtwist.metadata.content import NamespacedContentStore
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector
from cdtwist.metadata.snapshots import NamespacedSnapshotter, backend_key, snapshotters_for
from cdtwist.mount import Mount
from cdtwist.snapshots import LABEL_SNAPSHOT_REF, Info, Kind, Snapshotter, Usage, WalkFunc
from cdtwist.snapshots.native import NativeSnapshotter
from cdtwist.snapshots.overlay import OverlaySnapshotter
from tests.test_snapshots_suite import OPT, SnapshotterSuite

GC_ROOT = {"containerd.io/gc.root": "2023-01-01T00:00:00Z"}


class Bound(Snapshotter):
    """A namespaced snapshotter seen from one namespace: what the suite expects (``newTestSnapshotter``)."""

    def __init__(self, sn: NamespacedSnapshotter, namespace: str = "testsuite") -> None:
        self.sn = sn
        self.namespace = namespace

    def stat(self, key: str) -> Info:
        return self.sn.stat(self.namespace, key)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        return self.sn.update(self.namespace, info, *fieldpaths)

    def usage(self, key: str) -> Usage:
        return self.sn.usage(self.namespace, key)

    def mounts(self, key: str) -> list[Mount]:
        return self.sn.mounts(self.namespace, key)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self.sn.prepare(self.namespace, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self.sn.view(self.namespace, key, parent, labels)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.sn.commit(self.namespace, name, key, labels)

    def remove(self, key: str) -> None:
        self.sn.remove(self.namespace, key)

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        self.sn.walk(self.namespace, fn, *filters)

    def close(self) -> None:
        self.sn.close()

    def cleanup(self) -> None:
        """What frees the engine's disk behind a namespaced snapshotter: a collection."""
        self.sn.collector.garbage_collect()


class _MetadataSuite(SnapshotterSuite):
    def engine(self, root: str) -> Snapshotter:
        raise NotImplementedError

    def make_snapshotter(self, root: str) -> Snapshotter:
        db = DB(os.path.join(self.tmp, "meta.sqlite"))  # type: ignore[attr-defined]
        db.open()
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        return Bound(NamespacedSnapshotter(db, "engine", self.engine(root), Collector(db)))

    def test_close_twice(self) -> None:
        """containerd's CloseTwice: closing the engine twice is fine (the database stays open)."""
        self.sn.prepare("ct-prepare", "", OPT)
        self.sn.commit("ct", "ct-prepare", OPT)
        self.sn.remove("ct")
        self.sn.close()
        self.sn.close()


class MetadataNativeSuiteTests(_MetadataSuite, SynchronousTestCase):
    def engine(self, root: str) -> Snapshotter:
        return NativeSnapshotter(root)


class MetadataOverlaySuiteTests(_MetadataSuite, SynchronousTestCase):
    rename_skip = "rename test still fails on some kernels with overlay (skipped by containerd too)"

    def engine(self, root: str) -> Snapshotter:
        return OverlaySnapshotter(root, async_remove=True)


# -- an in-memory engine (metadata/snapshot_test.go's tmpSnapshotter) -----------------------


class TmpSnapshotter(Snapshotter):
    """Finds an existing committed snapshot for a ``containerd.io/snapshot.ref`` target, as remote snapshotters do."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snapshots: dict[str, Info] = {}
        self.targets: dict[str, list[str]] = {}
        self.closed = 0

    def stat(self, key: str) -> Info:
        with self.lock:
            if key not in self.snapshots:
                raise NotFound()
            return replace(self.snapshots[key], labels=dict(self.snapshots[key].labels))

    def update(self, info: Info, *fieldpaths: str) -> Info:
        with self.lock:
            if info.name not in self.snapshots:
                raise NotFound()
            current = self.snapshots[info.name]
            current.labels.update(info.labels)
            return replace(current, labels=dict(current.labels))

    def usage(self, key: str) -> Usage:
        with self.lock:
            if key not in self.snapshots:
                raise NotFound()
            return Usage()

    def mounts(self, key: str) -> list[Mount]:
        with self.lock:
            if key not in self.snapshots:
                raise NotFound()
            return []

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW, labels)

    def _create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str] | None) -> list[Mount]:
        with self.lock:
            base = Info(kind=kind, name=key, labels=dict(labels or {}))
            target = base.labels.get(LABEL_SNAPSHOT_REF, "")
            if target:
                for name in self.targets.get(target, []):
                    if self.snapshots[name].parent == parent:
                        raise AlreadyExists("found target")
            if parent:
                if parent not in self.snapshots:
                    raise NotFound()
                base.parent = parent
            base.created = base.updated = time.time_ns()
            self.snapshots[key] = base
            return []

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        with self.lock:
            base = Info(kind=Kind.COMMITTED, name=name, labels=dict(labels or {}))
            if name in self.snapshots:
                raise AlreadyExists("found name")
            src = self.snapshots.get(key)
            if src is None:
                raise NotFound()
            if src.kind == Kind.COMMITTED:
                raise InvalidArgument()
            base.parent = src.parent
            base.created = base.updated = time.time_ns()
            self.snapshots[name] = base
            del self.snapshots[key]
            target = base.labels.get(LABEL_SNAPSHOT_REF, "")
            if target:
                self.targets.setdefault(target, []).append(name)

    def remove(self, key: str) -> None:
        with self.lock:
            if key not in self.snapshots:
                raise NotFound()
            del self.snapshots[key]
            for ref, names in list(self.targets.items()):
                if key in names:
                    names.remove(key)
                    if not names:
                        del self.targets[ref]

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        with self.lock:
            infos = [replace(i, labels=dict(i.labels)) for i in self.snapshots.values()]
        for info in infos:
            fn(info)

    def close(self) -> None:
        self.closed += 1


class _DBCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cdtsm", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = DB(os.path.join(self.tmp, "meta.sqlite"))
        self.db.open()
        self.addCleanup(self.db.close)
        self.collector = Collector(self.db)

    def tmp_snapshotter(self, name: str = "tmp") -> tuple[NamespacedSnapshotter, TmpSnapshotter]:
        engine = TmpSnapshotter()
        return NamespacedSnapshotter(self.db, name, engine, self.collector), engine


class WithRefTests(_DBCase):
    """``TestSnapshotterWithRef``, step for step."""

    def test_with_ref(self) -> None:
        sn, _ = self.tmp_snapshotter()
        ns1, ns2, ns3 = "testing", "testing2", "testing3"
        test1 = {LABEL_SNAPSHOT_REF: "test1"}
        test2 = {LABEL_SNAPSHOT_REF: "test2"}

        sn.prepare(ns1, "test1-tmp", "", test1)
        sn.commit(ns1, "test1", "test1-tmp", test1)

        e = self.assertRaises(AlreadyExists, sn.prepare, ns2, "test1-tmp", "", test1)
        self.assertEqual(str(e), 'target snapshot "test1" from snapshotter: already exists')
        # test1 is now in the second namespace
        self.assertEqual(sn.stat(ns2, "test1").kind, Kind.COMMITTED)

        sn.prepare(ns2, "test2-tmp", "test1", test2)
        # in the original namespace, but not committed
        sn.prepare(ns1, "test2-tmp", "test1", test2)
        sn.commit(ns2, "test2", "test2-tmp", test2)
        # the engine maps the duplicate itself: no AlreadyExists here
        sn.commit(ns1, "test2", "test2-tmp", test2)

        # already in the namespace despite a mismatched parent
        e = self.assertRaises(AlreadyExists, sn.prepare, ns2, "test2-tmp-again", "", test2)
        self.assertEqual(str(e), 'target snapshot "test2": already exists')
        self.assertRaises(AlreadyExists, sn.prepare, ns1, "test2-tmp-again", "test1", test2)

        # a third namespace: no matching parent in the engine
        sn.prepare(ns3, "test2-tmp", "", test2)
        sn.remove(ns3, "test2-tmp")
        e = self.assertRaises(NotFound, sn.prepare, ns3, "test2-tmp", "test1", test2)
        self.assertEqual(str(e), "parent snapshot test1 does not exist: not found")
        self.assertRaises(AlreadyExists, sn.prepare, ns3, "test1-tmp", "", test1)
        self.assertRaises(AlreadyExists, sn.prepare, ns3, "test2-tmp", "test1", test2)

    def test_target_missing_in_engine(self) -> None:
        """The engine says the target exists but no committed snapshot carries it."""

        class Liar(TmpSnapshotter):
            def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
                raise AlreadyExists("found target")

        sn = NamespacedSnapshotter(self.db, "liar", Liar(), self.collector)
        e = self.assertRaises(NotFound, sn.prepare, "ns", "k", "", {LABEL_SNAPSHOT_REF: "t"})
        self.assertEqual(str(e), 'target snapshot "t" in backend: not found')
        e2 = self.assertRaises(CdtwistError, sn.prepare, "ns", "k", "")
        self.assertEqual(
            (type(e2), str(e2)),
            (CdtwistError, "unexpected error from snapshotter: found target: already exists: unknown"),
        )


class NamespacedTests(_DBCase):
    def test_namespaces_are_apart(self) -> None:
        sn, engine = self.tmp_snapshotter()
        sn.prepare("a", "k", "", GC_ROOT)
        sn.prepare("b", "k", "", GC_ROOT)
        self.assertEqual(sorted(engine.snapshots), ["a/1/k", "b/1/k"])
        sn.commit("a", "c", "k")
        # commit takes the next number of the namespace's sequence
        self.assertEqual(sorted(engine.snapshots), ["a/2/c", "b/1/k"])
        names: list[str] = []
        sn.walk("b", lambda i: names.append(i.name))
        self.assertEqual(names, ["k"])
        self.assertRaises(NotFound, sn.stat, "b", "c")
        self.assertRaises(NotFound, sn.mounts, "a", "k")
        # refused before a number is taken ...
        self.assertRaises(AlreadyExists, sn.prepare, "a", "c", "")
        # ... or failing after: the number is used, as bolt's NextSequence is
        self.assertRaises(NotFound, sn.prepare, "a", "k2", "c", lease="nope")
        sn.prepare("a", "k2", "c")
        self.assertEqual(sorted(engine.snapshots), ["a/2/c", "a/4/k2", "b/1/k"])
        self.assertEqual(backend_key(3, "ns", "x/y"), "ns/3/x/y")

    def test_inherited_labels_only_reach_the_engine(self) -> None:
        sn, engine = self.tmp_snapshotter()
        labels = {"a": "1", "containerd.io/snapshot/x": "2", LABEL_SNAPSHOT_REF: "r"}
        sn.prepare("ns", "k", "", labels)
        self.assertEqual(engine.snapshots["ns/1/k"].labels, {"containerd.io/snapshot/x": "2", LABEL_SNAPSHOT_REF: "r"})
        info = sn.stat("ns", "k")
        self.assertEqual((info.name, info.kind, info.labels), ("k", Kind.ACTIVE, labels))
        updated = sn.update("ns", Info(name="k", labels={"b": "3", "containerd.io/snapshot/y": "4"}))
        self.assertEqual(updated.labels["b"], "3")
        self.assertEqual(engine.snapshots["ns/1/k"].labels["containerd.io/snapshot/y"], "4")
        # labels given at commit replace, never inherit
        sn.commit("ns", "c", "k", {"z": "1"})
        self.assertEqual(sn.stat("ns", "c").labels, {"z": "1"})

    def test_errors(self) -> None:
        sn, _ = self.tmp_snapshotter()
        sn.prepare("ns", "base-a", "", GC_ROOT)
        sn.commit("ns", "base", "base-a", GC_ROOT)
        sn.prepare("ns", "child", "base", GC_ROOT)
        cases = [
            (NotFound, "snapshot nothing does not exist: not found", sn.stat, "ns", "nothing"),
            (NotFound, "snapshot nothing does not exist: not found", sn.usage, "ns", "nothing"),
            (NotFound, "parent snapshot nothing does not exist: not found", sn.prepare, "ns", "p", "nothing"),
            (AlreadyExists, 'snapshot "base": already exists', sn.prepare, "ns", "base", ""),
            (AlreadyExists, 'snapshot "base": already exists', sn.commit, "ns", "base", "child"),
            (NotFound, "snapshot nothing does not exist: not found", sn.commit, "ns", "x", "nothing"),
            (NotFound, 'can not find snapshotter "tmp": not found', sn.commit, "other", "x", "nothing"),
            (FailedPrecondition, "cannot remove snapshot with child: failed precondition", sn.remove, "ns", "base"),
            (NotFound, "snapshot nothing does not exist: not found", sn.remove, "ns", "nothing"),
            (FailedPrecondition, "namespace is required: failed precondition", sn.stat, "", "base"),
            (CdtwistError, "bucket name required", sn.prepare, "ns", ""),
            (CdtwistError, "bucket name required", sn.commit, "ns", "", "child"),
            (InvalidArgument, "invalid argument", sn.update, "ns", Info(name="")),
            (NotFound, "snapshot nothing does not exist: not found", sn.update, "ns", Info(name="nothing")),
            (
                InvalidArgument,
                'cannot update "parent" field on snapshot "base": invalid argument',
                sn.update,
                "ns",
                Info(name="base"),
                "parent",
            ),
            (
                InvalidArgument,
                "info.Labels: label key and value greater than maximum size (4096 bytes), "
                "key: aaaaaaaaaa: invalid argument",
                sn.prepare,
                "ns",
                "big",
                "",
                {"a" * 20: "v" * 4080},
            ),
            (CdtwistError, 'failed to set label ""="v": key required', sn.prepare, "ns", "empty-label", "", {"": "v"}),
        ]
        for cls, message, fn, *args in cases:
            e = self.assertRaises(CdtwistError, fn, *args)
            self.assertEqual((type(e), str(e)), (cls, message), args)
        # failed prepares leave nothing behind in the engine
        names: list[str] = []
        sn.walk("ns", lambda i: names.append(i.name))
        self.assertEqual(names, ["base", "child"])

    def test_update_field_paths(self) -> None:
        sn, _ = self.tmp_snapshotter()
        sn.prepare("ns", "k", "", {"a": "1", "b": "2"})
        info = sn.update("ns", Info(name="k", labels={"a": "x", "c": "3"}), "labels.a", "labels.b")
        self.assertEqual(info.labels, {"a": "x"})
        info = sn.update("ns", Info(name="k", labels={"d": "4"}), "labels")
        self.assertEqual(info.labels, {"d": "4"})
        before = sn.stat("ns", "k")
        info = sn.update("ns", Info(name="k", labels={"e": "5", "f": ""}))
        self.assertEqual(info.labels, {"e": "5"})
        self.assertEqual(info.created, before.created)
        self.assertGreater(info.updated, before.updated)

    def test_walk_in_batches_with_filters(self) -> None:
        sn, engine = self.tmp_snapshotter()
        for i in range(250):
            sn.prepare("ns", f"k{i:03d}", "", {"n": str(i % 3)})
        # a snapshot the engine lost is skipped
        del engine.snapshots["ns/5/k004"]
        names: list[str] = []
        sn.walk("ns", lambda i: names.append(i.name))
        self.assertEqual(len(names), 249)
        self.assertEqual(names, sorted(names))
        picked = [i.name for i in sn.infos("ns", "labels.n==1", "name==k000")]
        self.assertEqual(picked[:3], ["k000", "k001", "k007"])
        self.assertEqual(len(picked), 1 + 82)
        self.assertRaises(InvalidArgument, sn.infos, "ns", "name==")

    def test_snapshotters_for_shares_one_per_engine(self) -> None:
        engine = TmpSnapshotter()
        a = snapshotters_for(self.db, {"x": engine})
        b = snapshotters_for(self.db, {"x": engine})
        self.assertIs(a["x"], b["x"])
        c = snapshotters_for(self.db, {"x": TmpSnapshotter()})
        self.assertIsNot(a["x"], c["x"])

    def test_close_closes_the_engine_only(self) -> None:
        sn, engine = self.tmp_snapshotter()
        sn.close()
        self.assertEqual(engine.closed, 1)
        sn.prepare("ns", "k", "")

    def test_namespace_delete_lists_snapshotters(self) -> None:
        a, _ = self.tmp_snapshotter("zeta")
        b, _ = self.tmp_snapshotter("alpha")
        a.prepare("ns", "k", "")
        b.prepare("ns", "k", "")
        e = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "ns"))
        self.assertEqual(
            str(e),
            'namespace "ns" must be empty, but it still has snapshots on "alpha" snapshotter, '
            'snapshots on "zeta" snapshotter: failed precondition',
        )
        a.remove("ns", "k")
        b.remove("ns", "k")
        self.db.update(lambda tx: namespaces.delete(tx, "ns"))


class LeaseTests(_DBCase):
    def setUp(self) -> None:
        super().setUp()
        self.sn, self.engine = self.tmp_snapshotter()
        self.db.update(lambda tx: leasing.create(tx, "ns", "l1"))

    def resources(self) -> list[tuple[str, str]]:
        return [(r.type, r.id) for r in self.db.view(lambda tx: leasing.list_resources(tx, "ns", "l1"))]

    def test_created_snapshots_join_the_lease(self) -> None:
        self.sn.prepare("ns", "a", "", lease="l1")
        self.sn.view("ns", "v", "", lease="l1")
        self.assertEqual(self.resources(), [("snapshots/tmp", "a"), ("snapshots/tmp", "v")])
        self.sn.commit("ns", "c", "a", lease="l1")
        self.assertEqual(self.resources(), [("snapshots/tmp", "c"), ("snapshots/tmp", "v")])
        self.sn.remove("ns", "v", lease="l1")
        self.assertEqual(self.resources(), [("snapshots/tmp", "c")])

    def test_missing_lease(self) -> None:
        e = self.assertRaises(NotFound, self.sn.prepare, "ns", "a", "", lease="nope")
        self.assertEqual(str(e), "lease does not exist: not found")
        # the engine snapshot made before the record failed is removed again
        self.assertEqual(self.engine.snapshots, {})
        self.assertRaises(NotFound, self.sn.stat, "ns", "a")


class GarbageCollectionTests(_DBCase):
    def setUp(self) -> None:
        super().setUp()
        self.sn, self.engine = self.tmp_snapshotter()

    def collect(self) -> None:
        self.collector.garbage_collect()

    def keys(self, namespace: str = "ns") -> list[str]:
        return [i.name for i in self.sn.infos(namespace)]

    def test_roots_parents_and_leases(self) -> None:
        self.sn.prepare("ns", "base-a", "")
        self.sn.commit("ns", "base", "base-a")
        self.sn.prepare("ns", "kept", "base", GC_ROOT)
        self.sn.prepare("ns", "loose", "")
        self.db.update(lambda tx: leasing.create(tx, "ns", "l"))
        self.sn.prepare("ns", "leased", "", lease="l")
        self.collect()
        # the root keeps its parent; the lease keeps its snapshot; the rest goes
        self.assertEqual(self.keys(), ["base", "kept", "leased"])
        self.assertEqual(sorted(self.engine.snapshots), ["ns/2/base", "ns/3/kept", "ns/5/leased"])

    def test_label_references(self) -> None:
        self.sn.prepare("ns", "a", "")
        self.sn.commit("ns", "target", "a")
        self.sn.prepare("ns", "holder", "", {"containerd.io/gc.ref.snapshot.tmp": "target", **GC_ROOT})
        # from another kind of record: a blob naming the snapshot
        from cdtwist.content.local import LocalStore

        backend = LocalStore(os.path.join(self.tmp, "content"))
        content = NamespacedContentStore(self.db, backend, collector=self.collector)
        self.sn.prepare("ns", "b", "")
        self.sn.commit("ns", "by-blob", "b")
        w = content.writer("ns", "ref")
        w.write(b"data")
        w.commit(labels={"containerd.io/gc.ref.snapshot.tmp/x": "by-blob", **GC_ROOT})
        self.collect()
        self.assertEqual(self.keys(), ["by-blob", "holder", "target"])

    def test_flat_lease_holds_without_label_references(self) -> None:
        self.sn.prepare("ns", "p-a", "")
        self.sn.commit("ns", "p", "p-a")
        self.sn.prepare("ns", "x-a", "")
        self.sn.commit("ns", "x", "x-a")
        self.db.update(lambda tx: leasing.create(tx, "ns", "flat", {"containerd.io/gc.flat": "1"}))
        self.sn.prepare("ns", "child", "p", {"containerd.io/gc.ref.snapshot.tmp": "x"}, lease="flat")
        self.collect()
        self.assertEqual(self.keys(), ["child", "p"])

    def test_removed_snapshot_leaves_the_engine_children_first(self) -> None:
        self.sn.prepare("ns", "a", "", GC_ROOT)
        self.sn.commit("ns", "c", "a", GC_ROOT)
        self.sn.prepare("ns", "child", "c", GC_ROOT)
        self.sn.remove("ns", "child")
        self.assertTrue(self.collector.dirty)
        self.sn.remove("ns", "c")
        self.assertIn("ns/3/child", self.engine.snapshots)  # only the record went
        self.collect()
        self.assertEqual(self.engine.snapshots, {})

    def test_collected_child_stays_in_its_parents_list(self) -> None:
        """containerd's behaviour: a parent whose collected child it still lists cannot be removed."""
        self.sn.prepare("ns", "a", "", GC_ROOT)
        self.sn.commit("ns", "c", "a", GC_ROOT)
        self.sn.view("ns", "v", "c")
        self.sn.prepare("ns", "t", "")
        self.collect()
        self.assertEqual(self.keys(), ["c"])
        e = self.assertRaises(FailedPrecondition, self.sn.remove, "ns", "c")
        self.assertEqual(str(e), "cannot remove snapshot with child: failed precondition")
        self.sn.update("ns", Info(name="c", labels={}), "labels")
        self.collect()
        self.assertEqual(self.keys(), [])
        self.assertEqual(self.engine.snapshots, {})

    def test_other_namespaces_references_keep_engine_snapshots(self) -> None:
        self.sn.prepare("a", "k", "", GC_ROOT)
        self.sn.prepare("b", "k", "")
        self.collect()
        self.assertEqual(sorted(self.engine.snapshots), ["a/1/k"])

    def test_engine_cleanup_runs(self) -> None:
        root = os.path.join(self.tmp, "overlay")
        engine = OverlaySnapshotter(root, async_remove=True)
        self.addCleanup(engine.close)
        sn = NamespacedSnapshotter(self.db, "overlayfs", engine, self.collector)
        sn.prepare("ns", "a", "")
        sn.prepare("ns", "b", "", GC_ROOT)
        self.assertEqual(len(os.listdir(os.path.join(root, "snapshots"))), 2)
        self.collect()
        # removed from the engine, and its directory cleaned up
        self.assertEqual(os.listdir(os.path.join(root, "snapshots")), ["2"])
        self.assertEqual([i.name for i in sn.infos("ns")], ["b"])

    def test_engine_failures_are_contained(self) -> None:
        class Stubborn(TmpSnapshotter):
            def remove(self, key: str) -> None:
                raise FailedPrecondition("busy")

        sn = NamespacedSnapshotter(self.db, "stubborn", Stubborn(), self.collector)
        sn.prepare("ns", "k", "")
        sn.garbage_collect()  # logged, not raised
        self.assertIn("ns/1/k", sn.backend.snapshots)  # type: ignore[attr-defined]

    def test_collection_waits_for_changes_in_flight(self) -> None:
        """No engine snapshot being created can be taken: the collection holds the lock exclusively."""
        started = threading.Event()
        release = threading.Event()

        class Slow(TmpSnapshotter):
            def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
                out = super().prepare(key, parent, labels)
                started.set()
                release.wait(5)
                return out

        engine = Slow()
        sn = NamespacedSnapshotter(self.db, "slow", engine, self.collector)
        t = threading.Thread(target=sn.prepare, args=("ns", "k", "", GC_ROOT))
        t.start()
        self.assertTrue(started.wait(5))
        gc_done = threading.Event()
        g = threading.Thread(target=lambda: (sn.garbage_collect(), gc_done.set()))
        g.start()
        time.sleep(0.1)
        self.assertFalse(gc_done.is_set())
        release.set()
        t.join(5)
        g.join(5)
        self.assertTrue(gc_done.is_set())
        self.assertEqual(list(engine.snapshots), ["ns/1/k"])
