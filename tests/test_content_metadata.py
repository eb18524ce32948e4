"""The namespaced content store (containerd's ``metadata/content.go``): namespaces, sharing, leases, GC."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.content.local import LocalStore
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdtwist.gc import Node
from cdtwist.metadata import gc as mgc
from cdtwist.metadata import leases as mleases
from cdtwist.metadata import namespaces
from cdtwist.metadata.content import (
    INGEST_EXPIRY_NS,
    NamespacedContentStore,
    RWLock,
    backend_ref,
    content_store_for,
)
from cdtwist.metadata.db import DB

EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def blob(size: int, seed: int) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


class _StoreCase(SynchronousTestCase):
    shared = True

    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()
        self.backend = LocalStore(self.mktemp(), lock_retries=1)
        self.collector = mgc.Collector(self.db)
        self.store = NamespacedContentStore(self.db, self.backend, shared=self.shared, collector=self.collector)

    def write(self, ns: str, ref: str, data: bytes, labels: dict[str, str] | None = None, **kw: object) -> str:
        with self.store.writer(ns, ref, **kw) as w:  # type: ignore[arg-type]
            w.write(data)
            w.commit(len(data), "", labels)
            return w.digest()

    def lease(self, ns: str, lid: str, labels: dict[str, str] | None = None) -> None:
        self.db.update(lambda tx: mleases.create(tx, ns, lid, labels))

    def resources(self, ns: str, lid: str) -> list[tuple[str, str]]:
        return [(r.type, r.id) for r in self.db.view(lambda tx: mleases.list_resources(tx, ns, lid))]


class NamespaceTests(_StoreCase):
    def test_commit_makes_visible_in_that_namespace_only(self) -> None:
        data, d = blob(100, 1)
        before = time.time_ns()
        self.assertEqual(self.write("a", "r", data, {"k": "v", "empty": ""}), d)
        after = time.time_ns()
        info = self.store.info("a", d)
        self.assertEqual((info.digest, info.size, info.labels), (d, 100, {"k": "v"}))
        self.assertTrue(before <= info.created_at == info.updated_at <= after)
        err = self.assertRaises(NotFound, self.store.info, "b", d)
        self.assertEqual(str(err), f"content digest {d}: not found")
        self.assertRaises(NotFound, self.store.reader, "b", d)
        with self.store.reader("a", d) as ra:
            self.assertEqual(ra.read_all(), data)

    def test_namespace_created_implicitly_and_kept_by_blobs(self) -> None:
        self.write("implicit", "r", b"x")
        self.assertIn("implicit", self.db.view(namespaces.list_names))
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "implicit"))
        self.assertEqual(str(err), 'namespace "implicit" must be empty, but it still has blobs: failed precondition')
        self.store.delete("implicit", self.store.walk("implicit")[0].digest)
        self.db.update(lambda tx: namespaces.delete(tx, "implicit"))

    def test_namespace_delete_takes_ingests_and_leases(self) -> None:
        self.lease("gone", "l")
        with self.store.writer("gone", "r", lease="l") as w:
            w.write(b"partial")
        self.db.update(lambda tx: namespaces.delete(tx, "gone"))
        self.assertEqual(self.store.list_statuses("gone"), [])
        self.assertEqual(self.db.view(lambda tx: mleases.list_leases(tx, "gone")), [])

    def test_walk_filters_and_order(self) -> None:
        digests = sorted(self.write("a", f"r{i}", bytes([i]), {"n": str(i % 2)}) for i in range(5))
        self.assertEqual([i.digest for i in self.store.walk("a")], digests)
        odd = [i.digest for i in self.store.walk("a", "labels.n==1")]
        self.assertEqual(len(odd), 2)
        self.assertEqual([i.digest for i in self.store.walk("a", f"digest=={digests[0]}")], digests[:1])
        self.assertEqual(len(self.store.walk("a", "labels.n==1", "labels.n==0")), 5)
        self.assertEqual(self.store.walk("a", "size==1"), [])
        self.assertEqual(self.store.walk("b"), [])
        err = self.assertRaises(InvalidArgument, self.store.walk, "a", "labels.n==")
        self.assertEqual(str(err), "filters: parse error: [labels.n==]: expected value or quoted: invalid argument")

    def test_delete(self) -> None:
        d = self.write("a", "r", b"x")
        self.write("b", "r", b"x")
        self.store.delete("a", d)
        self.assertRaises(NotFound, self.store.info, "a", d)
        self.assertEqual(self.store.info("b", d).size, 1)
        err = self.assertRaises(NotFound, self.store.delete, "a", d)
        self.assertEqual(str(err), f"content digest {d}: not found")
        self.assertTrue(self.collector.dirty)


class UpdateTests(_StoreCase):
    def setUp(self) -> None:
        super().setUp()
        self.digest = self.write("a", "r", b"data", {"k1": "v1", "k2": "v2"})

    def info(self, labels: dict[str, str]):  # type: ignore[no-untyped-def]
        from cdtwist.content.local import Info

        return Info(self.digest, labels=labels)

    def test_replace_all(self) -> None:
        created = self.store.info("a", self.digest).created_at
        before = time.time_ns()
        updated = self.store.update("a", self.info({"k3": "v3", "gone": ""}))
        self.assertEqual(updated.labels, {"k3": "v3"})
        self.assertEqual(updated.created_at, created)
        self.assertGreaterEqual(updated.updated_at, before)
        self.assertEqual(updated.size, 4)
        self.assertEqual(self.store.info("a", self.digest).labels, {"k3": "v3"})

    def test_field_paths(self) -> None:
        updated = self.store.update("a", self.info({"k1": "new", "k9": "ignored"}), "labels.k1", "labels.k2")
        self.assertEqual(updated.labels, {"k1": "new"})
        updated = self.store.update("a", self.info({"x": "y"}), "labels")
        self.assertEqual(updated.labels, {"x": "y"})

    def test_bad_field_path(self) -> None:
        err = self.assertRaises(InvalidArgument, self.store.update, "a", self.info({}), "size")
        self.assertEqual(str(err), f'cannot update "size" field on content info "{self.digest}": invalid argument')

    def test_missing(self) -> None:
        err = self.assertRaises(NotFound, self.store.update, "b", self.info({}))
        self.assertEqual(str(err), f"content digest {self.digest}: not found")

    def test_label_too_big(self) -> None:
        err = self.assertRaises(InvalidArgument, self.store.update, "a", self.info({"key-long-name": "x" * 4096}))
        self.assertEqual(
            str(err),
            "info.Labels: label key and value greater than maximum size (4096 bytes), "
            "key: key-long-n: invalid argument",
        )
        self.assertEqual(self.store.info("a", self.digest).labels, {"k1": "v1", "k2": "v2"})

    def test_empty_key(self) -> None:
        err = self.assertRaises(CdtwistError, self.store.update, "a", self.info({"": "v"}))
        self.assertEqual(str(err), f'writing labels for info {self.digest}: failed to set label ""="v": key required')


class WriterTests(_StoreCase):
    def test_empty_ref(self) -> None:
        err = self.assertRaises(InvalidArgument, self.store.writer, "a", "")
        self.assertEqual(str(err), "ref must not be empty: invalid argument")

    def test_status_resume_and_backend_ref(self) -> None:
        data, d = blob(300, 2)
        w = self.store.writer("a", "r/../../etc", total=300, expected=d)
        w.write(data[:100])
        w.close()
        st = self.store.status("a", "r/../../etc")
        self.assertEqual((st.ref, st.offset, st.total), ("r/../../etc", 100, 300))
        # the backend ingest is named by namespace and ref, hashed to a directory
        self.assertEqual(self.backend.status(backend_ref("a", "r/../../etc")).offset, 100)
        self.assertTrue(self.backend.ingest_root(backend_ref("a", "r/../../etc")).startswith(self.backend.root))
        err = self.assertRaises(NotFound, self.store.status, "b", "r/../../etc")
        self.assertEqual(str(err), "reference r/../../etc: not found")
        w = self.store.writer("a", "r/../../etc", total=300, expected=d)
        self.assertEqual(w.status().offset, 100)
        w.write(data[100:])
        w.commit(300, d)
        self.assertRaises(NotFound, self.store.status, "a", "r/../../etc")
        self.assertEqual(self.store.list_statuses("a"), [])

    def test_same_ref_two_namespaces_are_two_ingests(self) -> None:
        wa = self.store.writer("a", "ref")
        wb = self.store.writer("b", "ref")
        wa.write(b"aa")
        wb.write(b"b")
        wa.close()
        wb.close()
        self.assertEqual(self.store.status("a", "ref").offset, 2)
        self.assertEqual(self.store.status("b", "ref").offset, 1)

    def test_locked_ref(self) -> None:
        w = self.store.writer("a", "ref")
        self.addCleanup(w.close)
        self.assertRaises(Unavailable, self.store.writer, "a", "ref")
        self.store.writer("b", "ref").close()

    def test_list_statuses(self) -> None:
        for ref in ("x1", "x2", "y1"):
            with self.store.writer("a", ref) as w:
                w.write(b"123")
        self.assertEqual([s.ref for s in self.store.list_statuses("a")], ["x1", "x2", "y1"])
        self.assertEqual([s.ref for s in self.store.list_statuses("a", "ref~=^x")], ["x1", "x2"])
        self.assertEqual([s.offset for s in self.store.list_statuses("a")], [3, 3, 3])
        self.assertEqual(self.store.list_statuses("b"), [])

    def test_abort(self) -> None:
        with self.store.writer("a", "r") as w:
            w.write(b"abc")
        self.store.abort("a", "r")
        self.assertRaises(NotFound, self.store.status, "a", "r")
        self.assertRaises(NotFound, self.backend.status, backend_ref("a", "r"))
        err = self.assertRaises(NotFound, self.store.abort, "a", "r")
        self.assertEqual(str(err), "reference r: not found")

    def test_abort_of_removed_backend_ingest_succeeds(self) -> None:
        with self.store.writer("a", "r") as w:
            w.write(b"abc")
        self.backend.abort(backend_ref("a", "r"))
        self.store.abort("a", "r")

    def test_commit_exists(self) -> None:
        """checkCommitExists: committing content the namespace has is AlreadyExists, with or without expected."""
        data, d = blob(256, 3)
        self.write("a", "c1", data)
        err = self.assertRaises(AlreadyExists, self.store.writer, "a", "other", expected=d)
        self.assertEqual(str(err), f"content {d}: already exists")
        for i, expected in enumerate((d, "")):
            w = self.store.writer("a", f"c1-commitexists-{i}")
            w.write(data)
            err = self.assertRaises(AlreadyExists, w.commit, len(data), expected)
            w.close()
        # the ingest is gone either way
        self.assertEqual(self.store.list_statuses("a"), [])

    def test_commit_errors_keep_the_ingest(self) -> None:
        """checkCommitErrorState."""
        data, _ = blob(256, 4)
        _, other = blob(256, 5)
        w = self.store.writer("a", "ref")
        w.write(data + b"more")
        err = self.assertRaises(FailedPrecondition, w.commit, len(data) + 4, other)
        self.assertIn("unexpected commit digest", str(err))
        w.close()
        w = self.store.writer("a", "ref")
        self.assertEqual(w.status().offset, len(data) + 4)
        err = self.assertRaises(FailedPrecondition, w.commit, len(data), "")
        self.assertEqual(str(err), f'"ref" failed size validation: {len(data) + 4} != {len(data)}: failed precondition')
        w.close()
        w = self.store.writer("a", "ref")
        w.commit(len(data) + 4, "")
        w.close()
        self.assertEqual(self.store.info("a", w.digest()).size, len(data) + 4)

    def test_commit_label_errors(self) -> None:
        w = self.store.writer("a", "ref")
        w.write(b"x")
        self.assertRaises(InvalidArgument, w.commit, 0, "", {"k": "v" * 5000})
        w = self.store.writer("a", "ref")
        self.assertEqual(w.status().offset, 1)
        w.commit(0, "", {"k": "v"})

    def test_truncate_restarts(self) -> None:
        w = self.store.writer("a", "ref")
        w.write(b"garbage")
        w.truncate(0)
        w.write(b"good")
        w.commit(4, "sha256:" + hashlib.sha256(b"good").hexdigest())


class CrashWindowTests(_StoreCase):
    """The backend commit happens inside the metadata transaction; if that transaction is lost
    (a crash, a failure after the rename), the blob is on disk without a record: writing it again works."""

    def lose_record(self, data: bytes) -> str:
        w = self.store.writer("a", "ref")
        w.write(data)
        original = mleases.add_content

        def crash(*args: object) -> None:
            raise RuntimeError("power cut")

        mleases.add_content = crash  # type: ignore[assignment]
        try:
            self.assertRaises(RuntimeError, w.commit, len(data), "")
        finally:
            mleases.add_content = original
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.assertRaises(NotFound, self.store.info, "a", digest)
        self.assertEqual(self.backend.info(digest).size, len(data))
        return digest

    def test_again_with_expected_digest_adopts_the_blob(self) -> None:
        data, _ = blob(100, 20)
        digest = self.lose_record(data)
        w = self.store.writer("a", "ref", expected=digest)
        self.assertEqual(w.status().offset, 100)
        w.commit(100, digest)
        self.assertEqual(self.store.info("a", digest).size, 100)

    def test_again_without_expectations(self) -> None:
        data, _ = blob(100, 21)
        digest = self.lose_record(data)
        w = self.store.writer("a", "ref")
        self.assertEqual(w.status().offset, 0)  # the ingest was renamed away
        w.write(data)
        w.commit(100, "")
        self.assertEqual(self.store.info("a", digest).size, 100)

    def test_lost_record_blob_is_collected(self) -> None:
        data, _ = blob(100, 22)
        digest = self.lose_record(data)
        self.collector.mark_dirty(content=True)
        self.collector.garbage_collect()
        self.assertRaises(NotFound, self.backend.info, digest)


class SharedPolicyTests(_StoreCase):
    shared = True

    def test_cross_namespace_share(self) -> None:
        """checkCrossNSShare: naming a digest the store has is enough; no bytes sent."""
        data, d = blob(1000, 6)
        t1 = time.time_ns()
        self.write("a", "ref", data)
        w = self.store.writer("b", "ref", total=1000, expected=d)
        t2 = time.time_ns()
        st = w.status()
        self.assertEqual((st.ref, st.offset, st.total, st.expected), ("ref", 1000, 1000, d))
        self.assertTrue(t1 <= st.started_at <= t2)
        self.assertEqual(w.digest(), d)
        self.assertEqual(self.store.list_statuses("b"), [])  # nothing on disk for it
        w.commit(1000, d)
        t3 = time.time_ns()
        info = self.store.info("b", d)
        self.assertEqual(info.size, 1000)
        self.assertTrue(t1 <= info.created_at <= t3)
        with self.store.reader("b", d) as ra:
            self.assertEqual(ra.read_all(), data)

    def test_share_without_size(self) -> None:
        data, d = blob(10, 7)
        self.write("a", "r", data)
        w = self.store.writer("b", "r", expected=d)
        self.assertEqual(w.status().total, 10)
        w.commit(0, "")

    def test_size_mismatch_does_not_share(self) -> None:
        data, d = blob(10, 8)
        self.write("a", "r", data)
        w = self.store.writer("b", "r", total=11, expected=d)
        self.assertEqual(w.status().offset, 0)
        self.assertEqual(w.digest(), EMPTY)
        w.close()

    def test_shared_commit_checks(self) -> None:
        data, d = blob(10, 9)
        self.write("a", "r", data)
        w = self.store.writer("b", "r", expected=d)
        err = self.assertRaises(FailedPrecondition, w.commit, 5, "")
        self.assertEqual(str(err), '"r" failed size validation: 10 != 5: failed precondition')
        err = self.assertRaises(FailedPrecondition, w.commit, 0, EMPTY)
        self.assertEqual(str(err), '"r" unexpected digest: failed precondition')

    def test_cross_namespace_append(self) -> None:
        """checkCrossNSAppend: writing to a shared writer copies the blob first."""
        data, d = blob(1000, 10)
        self.write("a", "ref", data)
        extra = b"appended bytes"
        d2 = "sha256:" + hashlib.sha256(data + extra).hexdigest()
        w = self.store.writer("b", "ref", total=1000, expected=d)
        self.assertEqual(w.write(b""), 0)
        self.assertEqual(w.status().offset, 1000)
        w.write(extra)
        w.commit(1014, d2)
        self.assertEqual(self.store.info("a", d).size, 1000)
        self.assertEqual(self.store.info("b", d2).size, 1014)
        self.assertRaises(NotFound, self.store.info, "b", d)

    def test_truncate_of_shared_writer(self) -> None:
        data, d = blob(100, 11)
        self.write("a", "ref", data)
        w = self.store.writer("b", "ref", expected=d)
        w.truncate(0)
        self.assertEqual(w.status().offset, 0)
        w.write(b"fresh")
        w.commit(5, "")

    def test_abort_shared_keeps_the_blob(self) -> None:
        data, d = blob(100, 12)
        self.write("a", "ref", data)
        self.store.writer("b", "ref", expected=d)
        self.store.abort("b", "ref")
        self.assertEqual(self.store.info("a", d).size, 100)

    def test_gc_keeps_a_blob_an_ingest_expects(self) -> None:
        """A blob deleted from its namespace survives while another namespace's ingest borrows it."""
        data, d = blob(100, 13)
        self.write("a", "ref", data)
        self.store.writer("b", "ref", expected=d)
        self.store.delete("a", d)
        self.collector.garbage_collect()
        self.assertEqual(self.backend.info(d).size, 100)
        self.store.abort("b", "ref")
        self.collector.mark_dirty(content=True)
        self.collector.garbage_collect()
        self.assertRaises(NotFound, self.backend.info, d)


class IsolatedPolicyTests(_StoreCase):
    shared = False

    def test_cross_namespace_isolate(self) -> None:
        """checkCrossNSIsolate: another namespace must send every byte."""
        data, d = blob(1000, 14)
        self.write("a", "ref", data)
        t3 = time.time_ns()
        w = self.store.writer("b", "ref", total=1000, expected=d)
        t4 = time.time_ns()
        st = w.status()
        self.assertEqual(w.digest(), EMPTY)
        self.assertEqual(st.offset, 0)
        self.assertTrue(t3 <= st.started_at <= t4)
        w.write(data)
        w.commit(1000, d)  # the backend already has it: fine
        self.assertEqual(self.store.info("b", d).size, 1000)


class LeaseTests(_StoreCase):
    def test_ingest_and_content_follow_the_lease(self) -> None:
        self.lease("a", "l")
        with self.store.writer("a", "ref", lease="l") as w:
            w.write(b"leased")
            self.assertEqual(self.resources("a", "l"), [("ingests", "ref")])
            expire = self.db.view(lambda tx: tx.execute("SELECT expire_at FROM content_ingests").fetchone()[0])
            self.assertIsNone(expire)
            w.commit(0, "", lease="l")
        d = w.digest()
        self.assertEqual(self.resources("a", "l"), [("content", d)])
        self.store.delete("a", d, lease="l")
        self.assertEqual(self.resources("a", "l"), [])

    def test_unleased_ingest_expires_in_a_day(self) -> None:
        before = time.time_ns()
        self.store.writer("a", "ref").close()
        expire = self.db.view(lambda tx: tx.execute("SELECT expire_at FROM content_ingests").fetchone()[0])
        self.assertTrue(before + INGEST_EXPIRY_NS <= expire <= time.time_ns() + INGEST_EXPIRY_NS)

    def test_missing_lease(self) -> None:
        err = self.assertRaises(NotFound, self.store.writer, "a", "ref", lease="nope")
        self.assertEqual(str(err), "lease does not exist: not found")
        self.assertEqual(self.store.list_statuses("a"), [])
        self.lease("a", "l")
        w = self.store.writer("a", "ref", lease="l")
        w.write(b"x")
        self.db.update(lambda tx: mleases.delete(tx, "a", "l"))
        err = self.assertRaises(NotFound, w.commit, 0, "", None, "l")
        self.assertEqual(str(err), "lease does not exist: not found")

    def test_existing_content_is_added_to_the_lease(self) -> None:
        d = self.write("a", "ref", b"x")
        self.lease("a", "l")
        err = self.assertRaises(AlreadyExists, self.store.writer, "a", "r2", expected=d, lease="l")
        self.assertEqual(str(err), f"content {d}: already exists")
        self.assertEqual(self.resources("a", "l"), [("content", d)])
        err = self.assertRaises(NotFound, self.store.writer, "a", "r2", expected=d, lease="nope")
        self.assertEqual(str(err), "unable to lease content: lease does not exist: not found")

    def test_abort_removes_the_ingest_from_the_lease(self) -> None:
        self.lease("a", "l")
        self.store.writer("a", "ref", lease="l").close()
        self.store.abort("a", "ref", lease="l")
        self.assertEqual(self.resources("a", "l"), [])


class GCTests(_StoreCase):
    """What the collector does to content, end to end through the store."""

    def blobs(self) -> list[str]:
        out: list[str] = []
        self.backend.walk(lambda info: out.append(info.digest))
        return sorted(out)

    def test_lease_holds_until_deleted(self) -> None:
        self.lease("a", "l")
        with self.store.writer("a", "held", lease="l") as w:
            w.write(b"held")
            w.commit(0, "", lease="l")
        held = w.digest()
        child = self.write("a", "child", b"child")
        root = self.write("a", "root", b"root", {mgc.LABEL_GC_ROOT: "x", mgc.LABEL_GC_CONTENT_REF + ".c": child})
        loose = self.write("a", "loose", b"loose")
        self.collector.garbage_collect()
        self.assertEqual(self.blobs(), sorted([held, child, root]))
        self.assertRaises(NotFound, self.store.info, "a", loose)
        self.db.update(lambda tx: mleases.delete(tx, "a", "l", self.collector))
        self.collector.garbage_collect()
        self.assertEqual(self.blobs(), sorted([child, root]))

    def test_blob_in_two_namespaces_stays_until_both_drop_it(self) -> None:
        d = self.write("a", "r", b"both", {mgc.LABEL_GC_ROOT: "x"})
        self.write("b", "r", b"both", {mgc.LABEL_GC_ROOT: "x"})
        self.store.delete("a", d)
        self.collector.garbage_collect()
        self.assertEqual(self.blobs(), [d])
        self.store.delete("b", d)
        self.collector.garbage_collect()
        self.assertEqual(self.blobs(), [])

    def test_expired_ingest_is_aborted(self) -> None:
        with self.store.writer("a", "old") as w:
            w.write(b"old")
        with self.store.writer("a", "new") as w:
            w.write(b"new")
        self.db.update(lambda tx: tx.execute("UPDATE content_ingests SET expire_at = 1 WHERE ref = 'old'"))
        self.collector.garbage_collect()
        self.assertEqual([s.ref for s in self.store.list_statuses("a")], ["new"])
        refs: list[str] = []
        self.backend.walk_status_refs(refs.append)
        self.assertEqual(refs, [backend_ref("a", "new")])

    def test_flat_lease_holds_without_references(self) -> None:
        child = self.write("a", "child", b"child")
        self.lease("a", "flat", {mgc.LABEL_GC_FLAT: "1"})
        self.lease("a", "deep")
        with self.store.writer("a", "parent", lease="flat") as w:
            w.write(b"parent")
            w.commit(0, "", {mgc.LABEL_GC_CONTENT_REF: child}, lease="flat")
        parent = w.digest()
        marked = self.db.view(self.collector.mark)
        self.assertIn(Node(mgc.CONTENT, "a", parent), marked)
        self.assertNotIn(Node(mgc.CONTENT, "a", child), marked)
        self.db.update(lambda tx: mleases.add_resource(tx, "a", "deep", mleases.Resource(parent, "content")))
        self.assertIn(Node(mgc.CONTENT, "a", child), self.db.view(self.collector.mark))

    def test_cleanup_excludes_writers(self) -> None:
        """The backend cleanup holds the store's lock exclusively; writers wait for it."""
        lock: RWLock = self.store.lock
        lock.acquire_write()
        started = threading.Event()
        done = threading.Event()

        def write() -> None:
            started.set()
            self.write("a", "r", b"x")
            done.set()

        t = threading.Thread(target=write)
        t.start()
        started.wait(5)
        self.assertFalse(done.wait(0.1))
        lock.release_write()
        t.join(5)
        self.assertTrue(done.is_set())


class RWLockTests(SynchronousTestCase):
    def test_readers_share_writer_excludes_and_goes_first(self) -> None:
        lock = RWLock()
        lock.acquire_read()
        lock.acquire_read()
        got_write = threading.Event()
        t = threading.Thread(target=lambda: (lock.acquire_write(), got_write.set()))
        t.start()
        time.sleep(0.05)
        self.assertFalse(got_write.is_set())
        got_read = threading.Event()
        r = threading.Thread(target=lambda: (lock.acquire_read(), got_read.set()))
        r.start()
        time.sleep(0.05)
        self.assertFalse(got_read.is_set())  # a waiting writer holds off new readers
        lock.release_read()
        lock.release_read()
        t.join(5)
        self.assertTrue(got_write.is_set())
        self.assertFalse(got_read.wait(0.05))
        lock.release_write()
        r.join(5)
        self.assertTrue(got_read.is_set())


class SharedInstanceTests(SynchronousTestCase):
    def test_one_store_per_database(self) -> None:
        db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(db.close)
        db.open()
        backend = LocalStore(self.mktemp())
        store = content_store_for(db, backend, True)
        self.assertIs(content_store_for(db, backend, True), store)
        self.assertIs(store.collector, mgc.collector_for(db))
        self.assertIs(mgc.collector_for(db)._content, store)

    def test_schema(self) -> None:
        db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(db.close)
        db.open()
        tables = db.view(lambda tx: {r[0] for r in tx.execute("SELECT name FROM sqlite_master WHERE type = 'table'")})
        self.assertLessEqual(
            {"content_blobs", "content_blob_labels", "content_ingests", "leases", "lease_labels", "lease_resources"},
            tables,
        )

    def test_foreign_keys_cascade(self) -> None:
        db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(db.close)
        db.open()

        def fill(tx: sqlite3.Connection) -> None:
            mleases.create(tx, "ns", "l", {"a": "b"})
            mleases.add_resource(tx, "ns", "l", mleases.Resource("ref", "ingests"))

        db.update(fill)
        db.update(lambda tx: mleases.delete(tx, "ns", "l"))
        counts = db.view(
            lambda tx: [
                tx.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("lease_labels", "lease_resources")
            ]
        )
        self.assertEqual(counts, [0, 0])
