# -*- test-case-name: tests.test_metadata -*-
"""An embedded transactional store in the role of containerd's bolt DB.

sqlite in WAL mode: readers never wait for the writer, one writer at a
time (a lock in front of ``BEGIN IMMEDIATE``, as bolt has one writer), and
``synchronous=FULL`` so a committed transaction survives ``kill -9`` and
power loss.  Every call blocks: use it from pool threads, never the
reactor.  The schema is versioned with ``PRAGMA user_version``; each
migration runs once, in its own transaction.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar

from cdtwist.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

#: Migrations in order; index + 1 is the schema version they bring.
#: Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    # 1: namespaces and their labels (``v1/<namespace>/labels`` in bolt).
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY
    ) WITHOUT ROWID;
    CREATE TABLE namespace_labels (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    """,
    # 2: content blobs and ingests per namespace, leases and what they hold
    # (``v1/<ns>/content/{blob,ingest}`` and ``v1/<ns>/leases`` in bolt).
    # Times are nanoseconds since the epoch; text compares bytewise, so
    # ORDER BY gives bolt's key order.
    """
    CREATE TABLE content_blobs (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    ) WITHOUT ROWID;
    CREATE TABLE content_blob_labels (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, digest, key),
        FOREIGN KEY (namespace, digest) REFERENCES content_blobs(namespace, digest) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX content_blob_labels_by_key ON content_blob_labels(key, namespace, digest);
    CREATE TABLE content_ingests (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        ref TEXT NOT NULL,
        bref TEXT NOT NULL,
        expected TEXT NOT NULL DEFAULT '',
        expire_at INTEGER,
        PRIMARY KEY (namespace, ref)
    ) WITHOUT ROWID;
    CREATE TABLE leases (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    ) WITHOUT ROWID;
    CREATE TABLE lease_labels (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, id, key),
        FOREIGN KEY (namespace, id) REFERENCES leases(namespace, id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        key TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, key),
        FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
    # 3: images per namespace with their labels and target descriptor
    # (``v1/<ns>/images/<name>`` in bolt: labels, annotations, target).
    # Names order bytewise, as bolt's keys do; times are nanoseconds.
    """
    CREATE TABLE images (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        target_media_type TEXT NOT NULL,
        target_digest TEXT NOT NULL,
        target_size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    ) WITHOUT ROWID;
    CREATE TABLE image_labels (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, name, key),
        FOREIGN KEY (namespace, name) REFERENCES images(namespace, name) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX image_labels_by_key ON image_labels(key, namespace, name);
    CREATE TABLE image_annotations (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, name, key),
        FOREIGN KEY (namespace, name) REFERENCES images(namespace, name) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
    # 4: namespaced snapshots per snapshotter (``v1/<ns>/snapshots/<snapshotter>/<key>``
    # in bolt): the snapshotter bucket with its sequence (backend keys are
    # ``<ns>/<seq>/<key>``), each snapshot's backend key, parent and times,
    # its labels and its children bucket (kept as bolt keeps it: the GC
    # removing a child does not touch its parent's list).
    """
    CREATE TABLE snapshotters (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        snapshotter TEXT NOT NULL,
        sequence INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, snapshotter)
    ) WITHOUT ROWID;
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL,
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        bkey TEXT NOT NULL,
        parent TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key),
        FOREIGN KEY (namespace, snapshotter) REFERENCES snapshotters(namespace, snapshotter) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX snapshots_by_bkey ON snapshots(snapshotter, bkey);
    CREATE TABLE snapshot_children (
        namespace TEXT NOT NULL,
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        child TEXT NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key, child),
        FOREIGN KEY (namespace, snapshotter, key) REFERENCES snapshots(namespace, snapshotter, key) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE snapshot_labels (
        namespace TEXT NOT NULL,
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        label TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key, label),
        FOREIGN KEY (namespace, snapshotter, key) REFERENCES snapshots(namespace, snapshotter, key) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX snapshot_labels_by_label ON snapshot_labels(label, namespace, snapshotter, key);
    """,
    # 5: containers per namespace (``v1/<ns>/containers/<id>`` in bolt): the
    # record with runtime options and spec as serialized Any (NULL when
    # absent), labels, extensions, and whether the namespace has its
    # containers bucket (created with the first container, never removed).
    """
    CREATE TABLE container_buckets (
        namespace TEXT PRIMARY KEY REFERENCES namespaces(name) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES container_buckets(namespace) ON DELETE CASCADE,
        id TEXT NOT NULL,
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options BLOB,
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    ) WITHOUT ROWID;
    CREATE TABLE container_labels (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, id, key),
        FOREIGN KEY (namespace, id) REFERENCES containers(namespace, id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX container_labels_by_key ON container_labels(key, namespace, id);
    CREATE TABLE container_extensions (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (namespace, id, name),
        FOREIGN KEY (namespace, id) REFERENCES containers(namespace, id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
]


class DatabaseError(Exception):
    pass


class DB:
    """One database file: a few pooled readers, one writer at a time.

    Connections are pooled rather than kept per thread: grpcio may run a
    hundred workers, and a connection each would cost memory for nothing.
    A transaction started inside another on the same thread joins it.
    """

    def __init__(self, path: str, busy_timeout: float = 30.0, max_readers: int = 8) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.max_readers = max_readers
        self._local = threading.local()
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._reader_slots = threading.BoundedSemaphore(max_readers)
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._closed = False
        self._commit_hooks: list[Callable[[], None]] = []

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> int:
        """Create or migrate the schema; returns the schema version."""
        os.makedirs(os.path.dirname(self.path) or ".", 0o711, exist_ok=True)
        with self._write_lock:
            conn = self._writer_connection()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DatabaseError(f"{self.path}: cannot use WAL journal (got {mode})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise DatabaseError(
                    f"{self.path}: schema version {version} is newer than this cdtwist knows ({len(MIGRATIONS)})"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[number - 1]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                log.info("migrated metadata schema", path=self.path, version=number)
        return len(MIGRATIONS)

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.ProgrammingError:
                pass

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise DatabaseError(f"{self.path}: database is closed")
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # pooled: used by one thread at a time, any thread
        )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        """Only with ``_write_lock`` held."""
        if self._writer is None:
            self._writer = self._connect()
        if self._closed:
            raise DatabaseError(f"{self.path}: database is closed")
        return self._writer

    # -- transactions ------------------------------------------------------

    def view(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a read transaction: a consistent snapshot."""
        current: sqlite3.Connection | None = getattr(self._local, "tx", None)
        if current is not None:
            return fn(current)
        self._reader_slots.acquire()
        try:
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                conn = self._connect()
            self._local.tx = conn
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")
            finally:
                self._local.tx = None
                if not self._closed:
                    self._readers.put(conn)
        finally:
            self._reader_slots.release()

    def update(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the write transaction; any exception rolls it back."""
        current: sqlite3.Connection | None = getattr(self._local, "tx", None)
        if current is not None:
            if current is not self._writer:
                raise DatabaseError("cannot write inside a read transaction")
            return fn(current)
        with self._write_lock:
            conn = self._writer_connection()
            self._local.tx = conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                self._local.tx = None
        for hook in list(self._commit_hooks):
            hook()
        return result

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Called after every committed update (the GC's mutation signal)."""
        self._commit_hooks.append(hook)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
