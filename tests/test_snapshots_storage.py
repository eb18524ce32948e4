"""Tests for :mod:`cdtwist.snapshots.storage`.

``MetaStoreSuiteTests`` ports containerd's ``snapshots/storage/metastore_test.go``;
the other classes pin Go's exact error texts, label and update rules, the
sqlite file (WAL, mode, persistence), closing, and concurrent use.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.snapshots import Info, Kind, Usage
from cdtwist.snapshots.storage import DB_FILE, MetaStore, Snapshot, Transaction

BASE_INFO = {
    "committed-1": Info(name="committed-1", parent="", kind=Kind.COMMITTED),
    "committed-2": Info(name="committed-2", parent="committed-1", kind=Kind.COMMITTED),
    "active-1": Info(name="active-1", parent="", kind=Kind.ACTIVE),
    "active-2": Info(name="active-2", parent="committed-1", kind=Kind.ACTIVE),
    "active-3": Info(name="active-3", parent="committed-2", kind=Kind.ACTIVE),
    "view-1": Info(name="view-1", parent="", kind=Kind.VIEW),
    "view-2": Info(name="view-2", parent="committed-2", kind=Kind.VIEW),
}


def base_populate(t: Transaction) -> None:
    t.create_snapshot(Kind.ACTIVE, "committed-tmp-1", "")
    t.commit_active("committed-tmp-1", "committed-1", Usage(size=1))
    t.create_snapshot(Kind.ACTIVE, "committed-tmp-2", "committed-1")
    t.commit_active("committed-tmp-2", "committed-2", Usage(size=2))
    t.create_snapshot(Kind.ACTIVE, "active-1", "")
    t.create_snapshot(Kind.ACTIVE, "active-2", "committed-1")
    t.create_snapshot(Kind.ACTIVE, "active-3", "committed-2")
    t.create_snapshot(Kind.VIEW, "view-1", "")
    t.create_snapshot(Kind.VIEW, "view-2", "committed-2")


class _StoreCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, DB_FILE)
        self.ms = MetaStore(self.path)
        self.addCleanup(self.ms.close)

    def populate(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)

    def assertInfoLike(self, expected: Info, actual: Info) -> None:  # noqa: N802
        """Equal but for times, which must be recent (Go's cmpSnapshotInfo)."""
        now = time.time_ns()
        for ts in (actual.created, actual.updated):
            self.assertLess(abs(now - ts), 30 * 10**9)
        self.assertEqual((expected.kind, expected.name, expected.parent), (actual.kind, actual.name, actual.parent))
        self.assertEqual(expected.labels, actual.labels)


class MetaStoreSuiteTests(_StoreCase):
    """metastore_test.go's MetaStoreSuite."""

    def test_get_info(self) -> None:
        self.populate()
        with self.ms.transaction(False) as t:
            for key, expected in BASE_INFO.items():
                _, info, _ = t.get_info(key)
                self.assertInfoLike(expected, info)

    def test_get_info_not_exist(self) -> None:
        self.populate()
        with self.ms.transaction(False) as t:
            self.assertRaises(NotFound, t.get_info, "active-not-exist")

    def test_get_info_empty_db(self) -> None:
        with self.ms.transaction(False) as t:
            e = self.assertRaises(NotFound, t.get_info, "active-not-exist")
        self.assertEqual(str(e), "bucket does not exist: not found")

    def test_walk(self) -> None:
        self.populate()
        found: dict[str, Info] = {}

        def fn(info: Info) -> None:
            self.assertNotIn(info.name, found, "entry already encountered")
            found[info.name] = info

        with self.ms.transaction(False) as t:
            t.walk_info(fn)
        self.assertEqual(sorted(found), sorted(BASE_INFO))
        for key, info in found.items():
            self.assertInfoLike(BASE_INFO[key], info)

    def test_get_snapshot(self) -> None:
        expected: dict[str, Snapshot] = {}
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "committed-tmp-1", "")
            t.commit_active("committed-tmp-1", "committed-1", Usage())
            for kind, name, parent in [
                (Kind.ACTIVE, "active-1", ""),
                (Kind.ACTIVE, "active-2", "committed-1"),
                (Kind.VIEW, "view-1", ""),
                (Kind.VIEW, "view-2", "committed-1"),
            ]:
                expected[name] = t.create_snapshot(kind, name, parent)
        with self.ms.transaction(False) as t:
            for key, s in expected.items():
                self.assertEqual(t.get_snapshot(key), s)

    def test_get_snapshot_not_exist(self) -> None:
        self.populate()
        with self.ms.transaction(False) as t:
            self.assertRaises(NotFound, t.get_snapshot, "active-not-exist")

    def test_get_snapshot_committed(self) -> None:
        self.populate()
        with self.ms.transaction(False) as t:
            e = self.assertRaises(FailedPrecondition, t.get_snapshot, "committed-1")
        self.assertEqual(str(e), "requested snapshot committed-1 not active or view: failed precondition")

    def test_create_active(self) -> None:
        with self.ms.transaction(True) as t:
            a1 = t.create_snapshot(Kind.ACTIVE, "active-1", "")
            self.assertEqual(a1.kind, Kind.ACTIVE)
            a2 = t.create_snapshot(Kind.VIEW, "view-1", "")
            self.assertNotEqual(a2.id, a1.id)
            self.assertEqual(a2.kind, Kind.VIEW)
            commit_id = t.commit_active("active-1", "committed-1", Usage())
            self.assertEqual(commit_id, a1.id, "Snapshot identifier must not change on commit")
            a3 = t.create_snapshot(Kind.ACTIVE, "active-3", "committed-1")
            self.assertNotEqual(a3.id, a1.id)
            self.assertEqual(a3.parent_ids, [commit_id])
            self.assertEqual(a3.kind, Kind.ACTIVE)
            a4 = t.create_snapshot(Kind.VIEW, "view-2", "committed-1")
            self.assertNotEqual(a4.id, a1.id)
            self.assertEqual(a4.parent_ids, [commit_id])
            self.assertEqual(a4.kind, Kind.VIEW)

    def test_create_active_not_exist(self) -> None:
        with self.ms.transaction(True) as t:
            e = self.assertRaises(NotFound, t.create_snapshot, Kind.ACTIVE, "active-1", "does-not-exist")
        self.assertEqual(str(e), 'missing parent "does-not-exist" bucket: not found')

    def test_create_active_exist(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(AlreadyExists, t.create_snapshot, Kind.ACTIVE, "active-1", "")
            self.assertEqual(str(e), "snapshot active-1: already exists")
            self.assertRaises(AlreadyExists, t.create_snapshot, Kind.ACTIVE, "committed-1", "")

    def test_create_active_from_active(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(InvalidArgument, t.create_snapshot, Kind.ACTIVE, "active-new", "active-1")
        self.assertEqual(str(e), 'parent "active-1" is not committed snapshot: invalid argument')

    def test_commit(self) -> None:
        with self.ms.transaction(True) as t:
            a1 = t.create_snapshot(Kind.ACTIVE, "active-1", "")
            self.assertEqual(t.commit_active("active-1", "committed-1", Usage()), a1.id)
            self.assertRaises(NotFound, t.get_snapshot, "active-1")
            self.assertRaises(FailedPrecondition, t.get_snapshot, "committed-1")

    def test_commit_not_exist(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(NotFound, t.commit_active, "active-x", "committed-x", Usage())
        self.assertEqual(str(e), 'failed to get active snapshot "active-x": not found')

    def test_commit_exist(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(AlreadyExists, t.commit_active, "active-1", "committed-1", Usage())
        self.assertEqual(str(e), "committed snapshot committed-1: already exists")

    def test_commit_committed(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(FailedPrecondition, t.commit_active, "committed-1", "committed-3", Usage())
        self.assertEqual(str(e), 'snapshot "committed-1" is not active: failed precondition')

    def test_commit_view_fails(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            self.assertRaises(FailedPrecondition, t.commit_active, "view-1", "committed-3", Usage())

    def test_remove(self) -> None:
        with self.ms.transaction(True) as t:
            a1 = t.create_snapshot(Kind.ACTIVE, "active-1", "")
            commit_id = t.commit_active("active-1", "committed-1", Usage())
            self.assertEqual(commit_id, a1.id)
            a2 = t.create_snapshot(Kind.VIEW, "view-1", "committed-1")
            a3 = t.create_snapshot(Kind.VIEW, "view-2", "committed-1")
            self.assertRaises(NotFound, t.remove, "active-1")
            self.assertEqual(t.remove("view-2"), (a3.id, Kind.VIEW))
            self.assertEqual(t.remove("view-1"), (a2.id, Kind.VIEW))
            self.assertEqual(t.remove("committed-1"), (commit_id, Kind.COMMITTED))

    def test_remove_not_exist(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "x", "")
            e = self.assertRaises(NotFound, t.remove, "does-not-exist")
        self.assertEqual(str(e), "snapshot does-not-exist: not found")

    def test_remove_with_children(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            e = self.assertRaises(FailedPrecondition, t.remove, "committed-1")
            self.assertEqual(str(e), "cannot remove snapshot with child: failed precondition")
            self.assertRaises(FailedPrecondition, t.remove, "committed-1")

    def test_parent_ids(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
            for tc_name, n_parents in [
                ("committed-1", 0),
                ("committed-2", 1),
                ("active-1", 0),
                ("active-2", 1),
                ("active-3", 2),
                ("view-1", 0),
                ("view-2", 2),
            ]:
                name = tc_name
                expected_id = ""
                expected_parents: list[str] = []
                for i in range(n_parents, -1, -1):
                    sid, info, _ = t.get_info(name)
                    if info.kind == Kind.COMMITTED:
                        s = t.create_snapshot(Kind.VIEW, f"test-{tc_name}-{i}", name)
                        self.assertEqual(len(s.parent_ids), i + 1)
                        sid2, parents = s.parent_ids[0], s.parent_ids[1:]
                    else:
                        s = t.get_snapshot(name)
                        self.assertEqual(len(s.parent_ids), i)
                        sid2, parents = s.id, s.parent_ids
                    self.assertEqual(sid, sid2)
                    if expected_id:
                        self.assertEqual(sid2, expected_id)
                    self.assertEqual(parents[: len(expected_parents)], expected_parents)
                    if i > 0:
                        name = info.parent
                        expected_id = parents[0]
                        expected_parents = parents[1:]


class StorageRulesTests(_StoreCase):
    """Go's details beyond the suite: messages, labels, updates, usage, filters."""

    def test_empty_store(self) -> None:
        """Before any snapshot was created Go has no buckets: everything but create is "not found"."""
        with self.ms.transaction(True) as t:
            for fn, args in [
                (t.get_snapshot, ("x",)),
                (t.remove, ("x",)),
                (t.id_map, ()),
                (t.walk_info, (lambda i: None,)),
                (t.update_info, (Info(name="x"),)),
                (t.commit_active, ("x", "y", Usage())),
            ]:
                e = self.assertRaises(NotFound, fn, *args)
                self.assertEqual(str(e), "bucket does not exist: not found")
            # Filters are parsed first.
            self.assertRaises(InvalidArgument, t.walk_info, lambda i: None, "name==")

    def test_missing_snapshot_messages(self) -> None:
        self.populate()
        with self.ms.transaction(True) as t:
            self.assertEqual(str(self.assertRaises(NotFound, t.get_info, "x")), "snapshot does not exist: not found")
            self.assertEqual(
                str(self.assertRaises(NotFound, t.get_snapshot, "x")), "snapshot does not exist: not found"
            )
            e = self.assertRaises(NotFound, t.update_info, Info(name="x"))
            self.assertEqual(str(e), "snapshot does not exist: not found")

    def test_create_kind_invalid(self) -> None:
        with self.ms.transaction(True) as t:
            e = self.assertRaises(InvalidArgument, t.create_snapshot, Kind.COMMITTED, "x", "")
            self.assertEqual(
                str(e),
                "snapshot type Committed invalid; only snapshots of type Active or View can be created:"
                " invalid argument",
            )
            e = self.assertRaises(InvalidArgument, t.create_snapshot, Kind.UNKNOWN, "x", "")
            self.assertIn("snapshot type Unknown invalid", str(e))

    def test_parent_checked_before_key(self) -> None:
        """Go looks the parent up before creating the key's bucket."""
        self.populate()
        with self.ms.transaction(True) as t:
            self.assertRaises(NotFound, t.create_snapshot, Kind.ACTIVE, "active-1", "nope")

    def test_commit_name_checked_first(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
            e = self.assertRaises(AlreadyExists, t.commit_active, "a", "a", Usage())
            self.assertEqual(str(e), "committed snapshot a: already exists")

    def test_labels(self) -> None:
        """Labels with empty values are not stored; commit replaces labels, never inherits."""
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "", {"x": "1", "empty": ""})
            self.assertEqual(t.get_info("a")[1].labels, {"x": "1"})
            t.commit_active("a", "c", Usage(inodes=3, size=4096), {"y": "2"})
            _, info, usage = t.get_info("c")
            self.assertEqual(info.labels, {"y": "2"})
            self.assertEqual(usage, Usage(inodes=3, size=4096))
            t.commit_active(t.create_snapshot(Kind.ACTIVE, "b", "c") and "b", "d", Usage())
            self.assertEqual(t.get_info("d")[1].labels, {})

    def test_commit_resets_times(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
            created = t.get_info("a")[1].created
        with self.ms.transaction(True) as t:
            t.commit_active("a", "c", Usage())
            info = t.get_info("c")[1]
        self.assertGreater(info.created, created)
        self.assertEqual(info.created, info.updated)

    def test_update_info(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "", {"keep": "1", "drop": "2"})
        with self.ms.transaction(True) as t:
            before = t.get_info("a")[1]
            # No fieldpaths: all labels replaced; other fields are ignored.
            u = t.update_info(Info(name="a", kind=Kind.VIEW, parent="p", labels={"n": "1"}))
            self.assertEqual((u.kind, u.parent, u.created, u.labels), (Kind.ACTIVE, "", before.created, {"n": "1"}))
            self.assertGreater(u.updated, before.updated)
            # labels.<key>: a key missing from the given labels is removed.
            u = t.update_info(Info(name="a", labels={"m": "2"}), "labels.m", "labels.n")
            self.assertEqual(u.labels, {"m": "2"})
            # Label keys may contain dots.
            u = t.update_info(Info(name="a", labels={"a.b.c": "3"}), "labels.a.b.c")
            self.assertEqual(u.labels, {"m": "2", "a.b.c": "3"})
            e = self.assertRaises(InvalidArgument, t.update_info, Info(name="a"), "labels.x", "kind")
            self.assertEqual(str(e), 'cannot update "kind" field on snapshot "a": invalid argument')
            self.assertEqual(t.get_info("a")[1], u)

    def test_walk_filters(self) -> None:
        self.populate()
        with self.ms.transaction(True) as t:
            t.update_info(Info(name="view-1", labels={"a.b": "x"}))
        with self.ms.transaction(False) as t:

            def names(*f: str) -> list[str]:
                return [i.name for i in t.list_info(*f)]

            self.assertEqual(names(), sorted(BASE_INFO))  # key order
            self.assertEqual(names("kind==view"), ["view-1", "view-2"])
            self.assertEqual(names("parent==committed-2"), ["active-3", "view-2"])
            self.assertEqual(names('parent==""'), ["active-1", "committed-1", "view-1"])
            self.assertEqual(names("parent"), sorted(BASE_INFO))  # always present, as in Go
            self.assertEqual(names("labels.a.b==x"), ["view-1"])
            self.assertEqual(names('labels."a.b"'), ["view-1"])
            self.assertEqual(
                names("name~=^committed-", "kind==view"), ["committed-1", "committed-2", "view-1", "view-2"]
            )

    def test_id_map_and_ids_never_reused(self) -> None:
        with self.ms.transaction(True) as t:
            a = t.create_snapshot(Kind.ACTIVE, "a", "")
            b = t.create_snapshot(Kind.ACTIVE, "b", "")
            self.assertEqual(t.id_map(), {a.id: "a", b.id: "b"})
            t.remove("b")
            c = t.create_snapshot(Kind.ACTIVE, "c", "")
        self.assertEqual((a.id, b.id, c.id), ("1", "2", "3"))

    def test_rollback(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
        t = self.ms.transaction(True)
        t.create_snapshot(Kind.ACTIVE, "b", "")
        t.rollback()
        t.rollback()  # no-op once done
        with self.ms.transaction(False) as t:
            self.assertEqual(t.id_map(), {"1": "a"})

    def test_exception_rolls_back(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
        with self.assertRaises(RuntimeError):
            with self.ms.transaction(True) as t:
                t.create_snapshot(Kind.ACTIVE, "b", "")
                raise RuntimeError("boom")
        with self.ms.transaction(False) as t:
            self.assertEqual(list(t.id_map().values()), ["a"])

    def test_read_transaction_cannot_write(self) -> None:
        with self.ms.transaction(False) as t:
            e = self.assertRaises(CdtwistError, t.create_snapshot, Kind.ACTIVE, "a", "")
            self.assertEqual(str(e), "tx not writable")
            self.assertRaises(CdtwistError, t.commit)

    def test_closed_transaction(self) -> None:
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
        self.assertRaises(CdtwistError, t.get_info, "a")


class StorageFileTests(_StoreCase):
    def test_lazy_open_and_file(self) -> None:
        """Like bolt's, the file appears on first use, 0600, in WAL mode, with the schema version."""
        self.assertFalse(os.path.exists(self.path))
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        conn = sqlite3.connect(self.path)
        try:
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 1)
        finally:
            conn.close()

    def test_persistence(self) -> None:
        with self.ms.transaction(True) as t:
            base_populate(t)
        self.ms.close()
        ms = MetaStore(self.path)
        self.addCleanup(ms.close)
        with ms.transaction(False) as t:
            _, info, usage = t.get_info("committed-2")
            self.assertEqual((info.parent, usage.size), ("committed-1", 2))
            self.assertEqual(t.get_snapshot("active-3").parent_ids, ["2", "1"])

    def test_close(self) -> None:
        """Close waits for open transactions; afterwards Go's "database not open"."""
        self.ms.close()  # never opened: nothing to do (and the store stays usable, as in Go)
        with self.ms.transaction(True) as t:
            t.create_snapshot(Kind.ACTIVE, "a", "")
        reader = self.ms.transaction(False)
        closed = threading.Event()
        thread = threading.Thread(target=lambda: (self.ms.close(), closed.set()))
        thread.start()
        self.assertFalse(closed.wait(0.2))
        self.assertEqual(reader.get_info("a")[1].name, "a")
        reader.rollback()
        self.assertTrue(closed.wait(5))
        thread.join()
        e = self.assertRaises(CdtwistError, self.ms.transaction, False)
        self.assertEqual(str(e), "failed to start transaction: database not open")
        self.ms.close()

    def test_newer_schema_refused(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        e = self.assertRaises(CdtwistError, self.ms.transaction, False)
        self.assertIn("schema version 99 is newer", str(e))

    def test_concurrent_writers_and_readers(self) -> None:
        """Writers take turns, readers see committed states only, ids stay unique."""
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for i in range(20):
                    with self.ms.transaction(True) as t:
                        t.create_snapshot(Kind.ACTIVE, f"w{n}-{i}", "")
            except BaseException as e:
                errors.append(e)

        def reader() -> None:
            try:
                for _ in range(50):
                    try:
                        with self.ms.transaction(False) as t:
                            ids = t.id_map()
                    except NotFound:
                        continue  # nothing created yet
                    self.assertEqual(len(set(ids.values())), len(ids))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=reader) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.assertEqual(errors, [])
        with self.ms.transaction(False) as t:
            ids = t.id_map()
        self.assertEqual(len(ids), 80)
        self.assertEqual(sorted(int(i) for i in ids), list(range(1, 81)))
