"""The sqlite metadata database and the namespace store on it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.metadata import namespaces as store
from cdtwist.metadata.db import DB, MIGRATIONS, DatabaseError


class DBTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "meta.sqlite")
        self.db = DB(self.path)
        self.addCleanup(self.db.close)
        self.db.open()

    def test_wal_and_schema_version(self) -> None:
        mode = self.db.view(lambda tx: tx.execute("PRAGMA journal_mode").fetchone()[0])
        self.assertEqual(mode, "wal")
        version = self.db.view(lambda tx: tx.execute("PRAGMA user_version").fetchone()[0])
        self.assertEqual(version, len(MIGRATIONS))

    def test_reopen_does_not_migrate_again(self) -> None:
        self.db.update(lambda tx: store.create(tx, "kept", {}))
        self.db.close()
        again = DB(self.path)
        self.addCleanup(again.close)
        self.assertEqual(again.open(), len(MIGRATIONS))
        self.assertEqual(again.view(store.list_names), ["kept"])

    def test_newer_schema_refused(self) -> None:
        self.db.update(lambda tx: tx.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}"))
        self.db.close()
        again = DB(self.path)
        self.addCleanup(again.close)
        self.assertRaises(DatabaseError, again.open)

    def test_failed_update_rolls_back(self) -> None:
        def half(tx: sqlite3.Connection) -> None:
            store.create(tx, "half", {})
            raise RuntimeError("boom")

        self.assertRaises(RuntimeError, self.db.update, half)
        self.assertEqual(self.db.view(store.list_names), [])

    def test_commit_hooks_run_after_commit(self) -> None:
        seen: list[list[str]] = []
        self.db.on_commit(lambda: seen.append(self.db.view(store.list_names)))
        self.db.update(lambda tx: store.create(tx, "a", {}))
        self.assertEqual(seen, [["a"]])

    def test_threads_write_concurrently_without_loss(self) -> None:
        def worker(i: int) -> None:
            for j in range(20):
                self.db.update(lambda tx, n=f"ns-{i}-{j}": store.create(tx, n, {"i": str(i)}))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(self.db.view(store.list_names)), 120)

    def test_committed_data_survives_kill_9(self) -> None:
        """A writer process killed right after its commit loses nothing."""
        self.db.close()
        script = (
            "import os, signal, sys\n"
            "from cdtwist.metadata.db import DB\n"
            "from cdtwist.metadata import namespaces as store\n"
            "db = DB(sys.argv[1]); db.open()\n"
            "db.update(lambda tx: store.create(tx, 'durable', {'k': 'v'}))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-c", script, self.path], env=env, capture_output=True)
        self.assertEqual(proc.returncode, -9, proc.stderr)
        again = DB(self.path)
        self.addCleanup(again.close)
        again.open()
        self.assertEqual(again.view(lambda tx: store.labels(tx, "durable")), {"k": "v"})
        self.assertEqual(again.view(lambda tx: tx.execute("PRAGMA integrity_check").fetchone()[0]), "ok")


class NamespaceStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()

    def test_create_and_labels(self) -> None:
        self.db.update(lambda tx: store.create(tx, "a", {"x": "1", "y": "2"}))
        self.assertEqual(self.db.view(lambda tx: store.labels(tx, "a")), {"x": "1", "y": "2"})

    def test_duplicate(self) -> None:
        self.db.update(lambda tx: store.create(tx, "a", {}))
        err = self.assertRaises(AlreadyExists, self.db.update, lambda tx: store.create(tx, "a", {}))
        self.assertEqual(str(err), 'namespace "a": already exists')

    def test_invalid_names(self) -> None:
        for name, message in [
            ("", "identifier must not be empty: invalid argument"),
            ("a b", 'identifier "a b" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: invalid argument'),
            ("x" * 77, f'identifier "{"x" * 77}" greater than maximum length (76 characters): invalid argument'),
        ]:
            err = self.assertRaises(InvalidArgument, self.db.update, lambda tx, n=name: store.create(tx, n, {}))
            self.assertEqual(str(err), message)

    def test_oversized_label(self) -> None:
        err = self.assertRaises(
            InvalidArgument, self.db.update, lambda tx: store.create(tx, "a", {"averylongkey": "v" * 4096})
        )
        self.assertEqual(
            str(err),
            "namespace.Labels: label key and value greater than maximum size (4096 bytes), key: averylongk: "
            "invalid argument",
        )
        self.assertEqual(self.db.view(store.list_names), [])

    def test_labels_of_missing_namespace_are_empty(self) -> None:
        self.assertEqual(self.db.view(lambda tx: store.labels(tx, "ghost")), {})

    def test_set_label_creates_and_empty_value_deletes(self) -> None:
        self.db.update(lambda tx: store.set_label(tx, "implicit", "k", "v"))
        self.assertEqual(self.db.view(store.list_names), ["implicit"])
        self.db.update(lambda tx: store.set_label(tx, "implicit", "k", ""))
        self.assertEqual(self.db.view(lambda tx: store.labels(tx, "implicit")), {})

    def test_list_in_byte_order(self) -> None:
        for name in ["b", "A", "a", "B1"]:
            self.db.update(lambda tx, n=name: store.create(tx, n, {}))
        self.assertEqual(self.db.view(store.list_names), ["A", "B1", "a", "b"])

    def test_delete(self) -> None:
        self.db.update(lambda tx: store.create(tx, "a", {"k": "v"}))
        self.db.update(lambda tx: store.delete(tx, "a"))
        self.assertEqual(self.db.view(store.list_names), [])
        self.assertEqual(self.db.view(lambda tx: store.labels(tx, "a")), {})
        err = self.assertRaises(NotFound, self.db.update, lambda tx: store.delete(tx, "a"))
        self.assertEqual(str(err), 'namespace "a": not found')

    def test_delete_non_empty(self) -> None:
        self.db.update(lambda tx: store.create(tx, "busy", {}))
        check = lambda tx, ns: ["images"] if ns == "busy" else []  # noqa: E731
        store.OBJECT_CHECKS.append(check)
        self.addCleanup(store.OBJECT_CHECKS.remove, check)
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: store.delete(tx, "busy"))
        self.assertEqual(str(err), 'namespace "busy" must be empty, but it still has images: failed precondition')
        self.assertEqual(self.db.view(store.list_names), ["busy"])


class IdentifierTests(SynchronousTestCase):
    def test_go_semantics(self) -> None:
        from cdtwist.grpc.context import validate_identifier

        validate_identifier("a.b-c_d9")
        # Go's $ does not match before a trailing newline.
        err = self.assertRaises(InvalidArgument, validate_identifier, "c1\n")
        self.assertIn('identifier "c1\\n" must match', str(err))
        # Length is in bytes.
        self.assertRaises(InvalidArgument, validate_identifier, "é" * 39)
