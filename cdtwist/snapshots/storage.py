# -*- test-case-name: tests.test_snapshots_storage -*-
"""A snapshotter's own metadata (containerd's ``snapshots/storage``) on sqlite.

Each snapshotter keeps, under its root, which snapshots exist by key, their
kind, parent, numeric id (the name of their directory), times, labels and
the usage recorded at commit.  containerd keeps this in a bolt file
(``metadata.db``); cdtwist uses sqlite in WAL mode in ``metadata.sqlite``:
readers never wait for the writer, one writer at a time (as bolt), and
``synchronous=FULL`` so a committed change survives a crash.

The engines work as Go's do: open a :class:`Transaction`, call the
functions of the Go package (here its methods), do their disk work while
the transaction is open, then commit or roll back.  Errors keep Go's
classes and texts.  Everything blocks.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

from cdtwist import filters
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.snapshots import Info, Kind, Usage, go_quote

DB_FILE = "metadata.sqlite"

#: Schema versions, applied once each (``PRAGMA user_version``); append only.
MIGRATIONS: list[str] = [
    # 1: ``buckets`` holds "v1" once a snapshot was ever created: bolt's
    # version bucket, whose absence Go reports as "bucket does not exist".
    # Ids come from AUTOINCREMENT, which like bolt's NextSequence never
    # hands out an id twice.  Keys compare bytewise (bolt's order).
    """
    CREATE TABLE buckets (
        name TEXT PRIMARY KEY
    ) WITHOUT ROWID;
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        kind INTEGER NOT NULL,
        parent_id INTEGER REFERENCES snapshots(id),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        inodes INTEGER NOT NULL DEFAULT 0,
        size INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_by_parent ON snapshots(parent_id);
    CREATE TABLE snapshot_labels (
        id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (id, name)
    ) WITHOUT ROWID;
    """,
]


@dataclass
class Snapshot:
    """An active or view snapshot as an engine sees it (Go's ``storage.Snapshot``).

    ``parent_ids`` starts with the immediate parent and ends with the base
    layer: the order of overlay's ``lowerdir``.
    """

    kind: Kind
    id: str
    parent_ids: list[str] = field(default_factory=list)


def _kind(value: int) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        return Kind.UNKNOWN


def _kind_text(kind: int) -> str:
    return str(_kind(kind))


def adapt_snapshot(info: Info) -> filters.Adaptor:
    """The filter fields of a snapshot: ``name``, ``parent`` (always present), ``kind``, ``labels.*``."""
    kind = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}.get(info.kind, "")
    return filters.FieldsAdaptor(
        {"kind": kind, "name": info.name, "parent": info.parent, "labels": info.labels},
        always_present=("name", "parent"),
    )


class _Row:
    __slots__ = ("id", "key", "kind", "parent_id", "created", "updated", "inodes", "size")

    def __init__(self, row: tuple[int, str, int, int | None, int, int, int, int]) -> None:
        (self.id, self.key, self.kind, self.parent_id, self.created, self.updated, self.inodes, self.size) = row


_COLUMNS = "id, key, kind, parent_id, created_at, updated_at, inodes, size"


class Transaction:
    """One read or write transaction; the storage functions of Go are its methods.

    Use it as a context manager (commit on success when writable, else
    roll back) or call :meth:`commit`/:meth:`rollback` yourself, as the
    engines do around their disk work.  One thread at a time.
    """

    def __init__(self, store: MetaStore, conn: sqlite3.Connection, writable: bool) -> None:
        self._store = store
        self._conn = conn
        self.writable = writable
        self._done = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        if exc_type is None and self.writable:
            self.commit()
        else:
            self.rollback()

    def commit(self) -> None:
        """Make the changes durable; a read transaction cannot commit (bolt's ``ErrTxNotWritable``)."""
        if self._done:
            raise CdtwistError("tx closed")
        if not self.writable:
            self.rollback()
            raise CdtwistError("tx not writable")
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._finish(rollback=True)
            raise CdtwistError(f"commit failed: {e}") from e
        self._finish(rollback=False)

    def rollback(self) -> None:
        """Drop the changes; a no-op once finished."""
        if not self._done:
            self._finish(rollback=True)

    def _finish(self, rollback: bool) -> None:
        self._done = True
        if rollback:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # nothing open (a failed COMMIT may already have ended it)
        self._store._release(self._conn, self.writable)

    def _check(self, write: bool = False) -> sqlite3.Connection:
        if self._done:
            raise CdtwistError("tx closed")
        if write and not self.writable:
            raise CdtwistError("tx not writable")
        return self._conn

    # -- helpers -----------------------------------------------------------

    def _require_bucket(self) -> sqlite3.Connection:
        conn = self._check()
        if conn.execute("SELECT 1 FROM buckets WHERE name = 'v1'").fetchone() is None:
            raise NotFound("bucket does not exist")
        return conn

    def _row(self, key: str) -> _Row | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _Row(row) if row is not None else None

    def _labels(self, sid: int) -> dict[str, str]:
        return dict(self._conn.execute("SELECT name, value FROM snapshot_labels WHERE id = ?", (sid,)).fetchall())

    def _parent_key(self, row: _Row) -> str:
        if row.parent_id is None:
            return ""
        found = self._conn.execute("SELECT key FROM snapshots WHERE id = ?", (row.parent_id,)).fetchone()
        return found[0] if found else ""

    def _info(self, row: _Row, labels: dict[str, str] | None = None) -> Info:
        return Info(
            kind=_kind(row.kind),
            name=row.key,
            parent=self._parent_key(row),
            labels=self._labels(row.id) if labels is None else labels,
            created=row.created,
            updated=row.updated,
        )

    def _write_labels(self, sid: int, labels: Mapping[str, str] | None) -> dict[str, str]:
        """Replace the labels; empty values are dropped, as boltutil does."""
        self._conn.execute("DELETE FROM snapshot_labels WHERE id = ?", (sid,))
        kept = {k: v for k, v in (labels or {}).items() if v != ""}
        self._conn.executemany(
            "INSERT INTO snapshot_labels (id, name, value) VALUES (?, ?, ?)", [(sid, k, v) for k, v in kept.items()]
        )
        return kept

    def _parents(self, parent_id: int) -> list[str]:
        rows = self._conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
                UNION ALL
                SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
            )
            SELECT id FROM chain ORDER BY depth
            """,
            (parent_id,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    # -- Go's storage functions --------------------------------------------

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """``GetInfo``: ``(id, info, usage)`` of any snapshot."""
        self._require_bucket()
        row = self._row(key)
        if row is None:
            raise NotFound("snapshot does not exist")
        return str(row.id), self._info(row), Usage(inodes=row.inodes, size=row.size)

    def update_info(self, info: Info, *fieldpaths: str) -> Info:
        """``UpdateInfo``: only labels are mutable (all of them, ``labels`` or ``labels.<key>``)."""
        self._check(write=True)
        self._require_bucket()
        row = self._row(info.name)
        if row is None:
            raise NotFound("snapshot does not exist")
        updated = self._info(row)
        given = info.labels or {}
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    key = path[len("labels.") :]
                    updated.labels[key] = given.get(key, "")
                    continue
                if path == "labels":
                    updated.labels = dict(given)
                else:
                    raise InvalidArgument(f"cannot update {go_quote(path)} field on snapshot {go_quote(info.name)}")
        else:
            updated.labels = dict(given)
        updated.updated = time.time_ns()
        self._conn.execute("UPDATE snapshots SET updated_at = ? WHERE id = ?", (updated.updated, row.id))
        updated.labels = self._write_labels(row.id, updated.labels)
        return updated

    def walk_info(self, fn: Callable[[Info], object], *filter_exprs: str) -> None:
        """``WalkInfo``: ``fn`` for each snapshot matching any filter, in key order."""
        for info in self.list_info(*filter_exprs):
            fn(info)

    def list_info(self, *filter_exprs: str) -> list[Info]:
        """The snapshots :meth:`walk_info` would visit, so callbacks can run after the transaction."""
        selector = filters.parse_all(*filter_exprs)
        return [info for info in self._all_infos() if selector.match(adapt_snapshot(info))]

    def _all_infos(self) -> list[Info]:
        conn = self._require_bucket()
        labels: dict[int, dict[str, str]] = {}
        for sid, name, value in conn.execute("SELECT id, name, value FROM snapshot_labels"):
            labels.setdefault(sid, {})[name] = value
        rows = [_Row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY key")]
        keys = {r.id: r.key for r in rows}
        return [
            Info(
                kind=_kind(r.kind),
                name=r.key,
                parent=keys.get(r.parent_id, "") if r.parent_id is not None else "",
                labels=labels.get(r.id, {}),
                created=r.created,
                updated=r.updated,
            )
            for r in rows
        ]

    def get_snapshot(self, key: str) -> Snapshot:
        """``GetSnapshot``: id and parent ids of an active or view snapshot."""
        self._require_bucket()
        row = self._row(key)
        if row is None:
            raise NotFound("snapshot does not exist")
        if row.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        parents = self._parents(row.parent_id) if row.parent_id is not None else []
        return Snapshot(kind=Kind(row.kind), id=str(row.id), parent_ids=parents)

    def create_snapshot(
        self, kind: Kind, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> Snapshot:
        """``CreateSnapshot``: record an active or view snapshot on top of a committed parent."""
        conn = self._check(write=True)
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {_kind_text(kind)} invalid; only snapshots of type Active or View can be created"
            )
        conn.execute("INSERT OR IGNORE INTO buckets (name) VALUES ('v1')")
        prow = None
        if parent:
            prow = self._row(parent)
            if prow is None:
                raise NotFound(f"missing parent {go_quote(parent)} bucket")
            if prow.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {go_quote(parent)} is not committed snapshot")
        if self._row(key) is not None:
            raise AlreadyExists(f"snapshot {key}")
        now = time.time_ns()
        cur = conn.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (key, int(kind), prow.id if prow else None, now, now),
        )
        sid = cur.lastrowid
        assert sid is not None
        self._write_labels(sid, labels)
        return Snapshot(kind=Kind(kind), id=str(sid), parent_ids=self._parents(prow.id) if prow else [])

    def remove(self, key: str) -> tuple[str, Kind]:
        """``Remove``: ``(id, kind)`` of the removed snapshot; one with children cannot go."""
        self._check(write=True)
        conn = self._require_bucket()
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key}")
        if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row.id,)).fetchone():
            raise FailedPrecondition("cannot remove snapshot with child")
        conn.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        return str(row.id), _kind(row.kind)

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None = None) -> str:
        """``CommitActive``: the active ``key`` becomes the committed ``name``, keeping its id.

        Labels are replaced by ``labels``, not inherited; times are reset.
        """
        self._check(write=True)
        conn = self._require_bucket()
        if self._row(name) is not None:
            raise AlreadyExists(f"committed snapshot {name}")
        row = self._row(key)
        if row is None:
            raise NotFound(f"failed to get active snapshot {go_quote(key)}")
        if row.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {go_quote(key)} is not active")
        now = time.time_ns()
        conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_at = ?, updated_at = ?, inodes = ?, size = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.inodes, usage.size, row.id),
        )
        self._write_labels(row.id, labels)
        return str(row.id)

    def id_map(self) -> dict[str, str]:
        """``IDMap``: every id (as its directory name) to its key."""
        conn = self._require_bucket()
        return {str(sid): key for sid, key in conn.execute("SELECT id, key FROM snapshots")}


class MetaStore:
    """The database file of one snapshotter: pooled readers, one writer at a time.

    Opened on first use, as Go's ``MetaStore``; :meth:`close` waits for open
    transactions, and a closed store refuses new ones.
    """

    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._state = "new"  # -> "open" -> "closed"
        self._cond = threading.Condition()
        self._in_flight = 0
        self._idle_readers: list[sqlite3.Connection] = []
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()

    def transaction(self, writable: bool = False) -> Transaction:
        """Begin a transaction (Go's ``TransactionContext``); a write one waits for the writer slot."""
        with self._cond:
            if self._state == "closed":
                raise CdtwistError("failed to start transaction: database not open")
            if self._state == "new":
                self._open()
            self._in_flight += 1
        try:
            if writable:
                self._write_lock.acquire()
                try:
                    conn = self._writer_connection()
                    conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    self._write_lock.release()
                    raise
            else:
                conn = self._reader_connection()
                try:
                    conn.execute("BEGIN")
                except BaseException:
                    self._return_reader(conn)
                    raise
        except sqlite3.Error as e:
            self._done_one()
            raise CdtwistError(f"failed to start transaction: {e}") from e
        except BaseException:
            self._done_one()
            raise
        return Transaction(self, conn, writable)

    def view(self, fn: Callable[[Transaction], object]) -> object:
        """Run ``fn`` in a read transaction."""
        with self.transaction(False) as t:
            return fn(t)

    def update(self, fn: Callable[[Transaction], object]) -> object:
        """Run ``fn`` in a write transaction, committed when it returns."""
        with self.transaction(True) as t:
            return fn(t)

    def close(self) -> None:
        """Wait for open transactions, then close; closing twice (or unopened) is fine."""
        with self._cond:
            if self._state != "open":
                return
            self._state = "closed"
            while self._in_flight:
                self._cond.wait()
            conns = self._idle_readers
            self._idle_readers = []
            if self._writer is not None:
                conns.append(self._writer)
                self._writer = None
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- connections -------------------------------------------------------

    def _open(self) -> None:
        """Create the file (0600, as bolt) and bring the schema up to date."""
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CdtwistError(f"failed to open database file: {self.path}: cannot use WAL journal (got {mode})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise CdtwistError(
                    f"failed to open database file: {self.path}: schema version {version} is newer than"
                    f" this cdtwist knows ({len(MIGRATIONS)})"
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in (s.strip() for s in MIGRATIONS[number - 1].split(";")):
                        if statement:
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise
        self._writer = conn
        self._state = "open"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,  # used by one thread at a time, any thread
        )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = self._connect()
        return self._writer

    def _reader_connection(self) -> sqlite3.Connection:
        with self._cond:
            if self._idle_readers:
                return self._idle_readers.pop()
        return self._connect()

    def _return_reader(self, conn: sqlite3.Connection) -> None:
        with self._cond:
            if self._state == "open" and len(self._idle_readers) < 8:
                self._idle_readers.append(conn)
                return
        conn.close()

    def _release(self, conn: sqlite3.Connection, writable: bool) -> None:
        if writable:
            self._write_lock.release()
        else:
            self._return_reader(conn)
        self._done_one()

    def _done_one(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
