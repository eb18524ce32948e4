# -*- test-case-name: tests.test_snapshots_service_metadata -*-
"""Namespaced snapshots over each snapshotter (containerd's ``metadata/snapshot.go``).

Every snapshotter engine keeps one flat key space; the metadata database
gives each namespace its own.  A snapshot ``<key>`` of namespace ``<ns>`` is
recorded here with its parent, labels and times, and lives in the engine
under the backend key ``<ns>/<seq>/<key>``, where ``<seq>`` is the next
number of the namespace's sequence for that snapshotter (bolt's bucket
``NextSequence``).  So two namespaces never see each other's snapshots, and
a committed snapshot gets a fresh backend key.

Labels stay here; only ``containerd.io/snapshot/*`` and
``containerd.io/snapshot.ref`` are handed to the engine (inherited labels).
A call made under a lease (the ``containerd-lease`` header) adds what it
creates to the lease.  Removing a snapshot only drops its record: the
garbage collector's cleanup phase (:meth:`NamespacedSnapshotter.garbage_collect`)
removes engine snapshots no namespace references, children first, then lets
engines that implement ``Cleaner`` free their disk space.

Snapshots join the GC graph as containerd's do: ``containerd.io/gc.root``
snapshots are roots, a snapshot references its parent (children keep their
parents) and whatever its ``containerd.io/gc.ref.*`` labels name.

Each snapshot keeps a list of its children, as bolt keeps a ``children``
bucket, and exactly as in containerd the GC removing a child does not take
it off its parent's list: a parent whose unreferenced child was collected
can no longer be removed through the API ("cannot remove snapshot with
child"); it goes when the GC finds it unreferenced.  Kept on purpose, so
clients see what containerd 1.6 answers.

Every method blocks (database and engine): call from pool threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from cdtwist import filters
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound, NotImplemented_
from cdtwist.gc import Node
from cdtwist.log import get_logger
from cdtwist.metadata import gc
from cdtwist.metadata import leases as leasing
from cdtwist.metadata.content import RWLock
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector, ResourceKind, collector_for, register_kind
from cdtwist.mount import Mount
from cdtwist.snapshots import (
    LABEL_SNAPSHOT_REF,
    Cleaner,
    Info,
    Kind,
    Snapshotter,
    Usage,
    filter_inherited_labels,
    go_quote,
    wrap_error,
)
from cdtwist.snapshots.storage import adapt_snapshot

log = get_logger(__name__)

MAX_LABEL_SIZE = 4096
#: Walk reads records in batches this big, calling back between them (Go's ``batchSize``).
WALK_BATCH = 100

WalkFn = Callable[[Info], object]

#: bolt's ``ErrBucketNameRequired``: what an empty key or name fails with.
_BUCKET_NAME_REQUIRED = "bucket name required"


def backend_key(seq: int, namespace: str, key: str) -> str:
    """``createKey``: the engine's key of a namespaced snapshot."""
    return f"{namespace}/{seq}/{key}"


def validate_labels(labels: Mapping[str, str] | None) -> None:
    """``validateSnapshot``: each key and value together at most 4096 bytes."""
    for key, value in (labels or {}).items():
        kb = key.encode("utf-8", "surrogateescape")
        if len(kb) + len(value.encode("utf-8", "surrogateescape")) > MAX_LABEL_SIZE:
            short = kb[:10].decode("utf-8", "surrogateescape")
            raise InvalidArgument(
                f"info.Labels: label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {short}"
            )


def overlay_info(info: Info, local: Info) -> Info:
    """``overlayInfo``: the engine's info (kind, inherited labels) under the namespace's record."""
    labels = dict(info.labels or {})
    labels.update(local.labels or {})
    return replace(
        info, name=local.name, created=local.created, updated=local.updated, parent=local.parent, labels=labels
    )


# -- records (every function takes an open transaction) ------------------------------


@dataclass
class _Record:
    key: str
    bkey: str
    parent: str
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)

    def local(self) -> Info:
        return Info(
            name=self.key, parent=self.parent, labels=dict(self.labels), created=self.created, updated=self.updated
        )


def _has_bucket(tx: sqlite3.Connection, namespace: str, snapshotter: str) -> bool:
    row = tx.execute(
        "SELECT 1 FROM snapshotters WHERE namespace = ? AND snapshotter = ?", (namespace, snapshotter)
    ).fetchone()
    return row is not None


def _ensure_bucket(tx: sqlite3.Connection, namespace: str, snapshotter: str) -> None:
    """``createSnapshotterBucket``: the namespace too, as bolt creates buckets on the way."""
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (namespace,))
    tx.execute(
        "INSERT OR IGNORE INTO snapshotters(namespace, snapshotter) VALUES (?, ?)", (namespace, snapshotter)
    )


def _next_sequence(tx: sqlite3.Connection, namespace: str, snapshotter: str) -> int:
    tx.execute(
        "UPDATE snapshotters SET sequence = sequence + 1 WHERE namespace = ? AND snapshotter = ?",
        (namespace, snapshotter),
    )
    row = tx.execute(
        "SELECT sequence FROM snapshotters WHERE namespace = ? AND snapshotter = ?", (namespace, snapshotter)
    ).fetchone()
    return int(row[0])


def _labels(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> dict[str, str]:
    rows = tx.execute(
        "SELECT label, value FROM snapshot_labels WHERE namespace = ? AND snapshotter = ? AND key = ? ORDER BY label",
        (namespace, snapshotter, key),
    )
    return dict(rows.fetchall())


def _record(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> _Record | None:
    row = tx.execute(
        "SELECT bkey, parent, created_at, updated_at FROM snapshots "
        "WHERE namespace = ? AND snapshotter = ? AND key = ?",
        (namespace, snapshotter, key),
    ).fetchone()
    if row is None:
        return None
    return _Record(key, row[0], row[1], row[2], row[3], _labels(tx, namespace, snapshotter, key))


def _exists(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> bool:
    row = tx.execute(
        "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (namespace, snapshotter, key)
    ).fetchone()
    return row is not None


def _write_labels(
    tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str, labels: Mapping[str, str] | None
) -> dict[str, str]:
    """Replace the labels (bolt's ``writeMap``): empty values are dropped; returns what was kept."""
    tx.execute(
        "DELETE FROM snapshot_labels WHERE namespace = ? AND snapshotter = ? AND key = ?", (namespace, snapshotter, key)
    )
    kept: dict[str, str] = {}
    for label, value in (labels or {}).items():
        if value == "":
            continue
        if label == "":
            raise CdtwistError(f'failed to set label ""={go_quote(value)}: key required')
        tx.execute(
            "INSERT INTO snapshot_labels(namespace, snapshotter, key, label, value) VALUES (?, ?, ?, ?, ?)",
            (namespace, snapshotter, key, label, value),
        )
        kept[label] = value
    return kept


def _insert(
    tx: sqlite3.Connection,
    namespace: str,
    snapshotter: str,
    key: str,
    bkey: str,
    parent: str,
    created: int,
    updated: int,
) -> bool:
    """A new record; False if ``key`` is taken (bolt's ``ErrBucketExists``)."""
    try:
        tx.execute(
            "INSERT INTO snapshots(namespace, snapshotter, key, bkey, parent, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, snapshotter, key, bkey, parent, created, updated),
        )
    except sqlite3.IntegrityError:
        return False
    return True


def _delete(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> None:
    tx.execute(
        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (namespace, snapshotter, key)
    )


def _batch(tx: sqlite3.Connection, namespace: str, snapshotter: str, after: str) -> list[_Record]:
    """Up to :data:`WALK_BATCH` records with keys after ``after`` (every key is non-empty)."""
    rows = tx.execute(
        "SELECT key, bkey, parent, created_at, updated_at FROM snapshots "
        "WHERE namespace = ? AND snapshotter = ? AND key > ? ORDER BY key LIMIT ?",
        (namespace, snapshotter, after, WALK_BATCH),
    ).fetchall()
    return [_Record(k, b, p, c, u, _labels(tx, namespace, snapshotter, k)) for k, b, p, c, u in rows]


def _has_children(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> bool:
    row = tx.execute(
        "SELECT 1 FROM snapshot_children WHERE namespace = ? AND snapshotter = ? AND key = ? LIMIT 1",
        (namespace, snapshotter, key),
    ).fetchone()
    return row is not None


def _add_child(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str, child: str) -> None:
    tx.execute(
        "INSERT OR IGNORE INTO snapshot_children(namespace, snapshotter, key, child) VALUES (?, ?, ?, ?)",
        (namespace, snapshotter, key, child),
    )


def _remove_child(tx: sqlite3.Connection, namespace: str, snapshotter: str, key: str, child: str) -> None:
    tx.execute(
        "DELETE FROM snapshot_children WHERE namespace = ? AND snapshotter = ? AND key = ? AND child = ?",
        (namespace, snapshotter, key, child),
    )


def snapshotters_in_use(tx: sqlite3.Connection, namespace: str) -> list[str]:
    """Snapshotters holding snapshots of ``namespace``, in bolt's key order."""
    rows = tx.execute(
        "SELECT DISTINCT snapshotter FROM snapshots WHERE namespace = ? ORDER BY snapshotter", (namespace,)
    )
    return [r[0] for r in rows]


# -- the namespaced snapshotter -----------------------------------------------------------


def _required(namespace: str) -> str:
    if not namespace:
        raise FailedPrecondition("namespace is required")
    return namespace


class NamespacedSnapshotter:
    """One engine as every namespace sees it (``metadata.snapshotter``).

    Methods take the call's namespace (already validated by the caller)
    and, where containerd consults it, the call's lease.
    """

    def __init__(self, db: DB, name: str, backend: Snapshotter, collector: Collector | None = None) -> None:
        self.db = db
        self.name = name
        self.backend = backend
        self.collector = collector if collector is not None else collector_for(db)
        #: readers: changes that create or drop records; writer: the GC's engine cleanup.
        self.lock = RWLock()
        self.collector.register_snapshotter(name, self)

    # -- lookups -------------------------------------------------------------

    def _resolve(self, namespace: str, key: str) -> str:
        _required(namespace)

        def read(tx: sqlite3.Connection) -> str:
            row = tx.execute(
                "SELECT bkey FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                (namespace, self.name, key),
            ).fetchone()
            if row is None or not row[0]:
                raise NotFound(f"snapshot {key} does not exist")
            return str(row[0])

        return self.db.view(read)

    def stat(self, namespace: str, key: str) -> Info:
        _required(namespace)

        def read(tx: sqlite3.Connection) -> _Record:
            record = _record(tx, namespace, self.name, key)
            if record is None:
                raise NotFound(f"snapshot {key} does not exist")
            return record

        record = self.db.view(read)
        return overlay_info(self.backend.stat(record.bkey), record.local())

    def usage(self, namespace: str, key: str) -> Usage:
        return self.backend.usage(self._resolve(namespace, key))

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        return self.backend.mounts(self._resolve(namespace, key))

    # -- changes -------------------------------------------------------------

    def update(self, namespace: str, info: Info, *fieldpaths: str) -> Info:
        """Labels only: all of them, or the ``labels``/``labels.<key>`` paths given."""
        with self.lock.read():
            _required(namespace)
            if info.name == "":
                raise InvalidArgument()
            updated = False

            def txn(tx: sqlite3.Connection) -> Info:
                nonlocal updated
                record = _record(tx, namespace, self.name, info.name)
                if record is None:
                    raise NotFound(f"snapshot {info.name} does not exist")
                local = record.local()
                given = info.labels or {}
                if fieldpaths:
                    for path in fieldpaths:
                        if path.startswith("labels."):
                            label = path[len("labels.") :]
                            local.labels[label] = given.get(label, "")
                            continue
                        if path == "labels":
                            local.labels = dict(given)
                        else:
                            raise InvalidArgument(
                                f"cannot update {go_quote(path)} field on snapshot {go_quote(info.name)}"
                            )
                else:
                    local.labels = dict(given)
                validate_labels(local.labels)
                local.updated = time.time_ns()
                tx.execute(
                    "UPDATE snapshots SET updated_at = ? WHERE namespace = ? AND snapshotter = ? AND key = ?",
                    (local.updated, namespace, self.name, info.name),
                )
                local.labels = _write_labels(tx, namespace, self.name, info.name, local.labels)
                inner = Info(name=record.bkey, labels=filter_inherited_labels(local.labels) or {})
                # Inside the transaction, as containerd does, to keep the two in step.
                backend_info = self.backend.update(inner, *fieldpaths)
                updated = True
                return overlay_info(backend_info, local)

            try:
                return self.db.update(txn)
            except Exception as e:
                if updated:
                    log.error(
                        "transaction failed after updating snapshot backend",
                        snapshotter=self.name,
                        key=info.name,
                        error=str(e),
                    )
                raise

    def prepare(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        return self._create(namespace, key, parent, False, labels, lease)

    def view(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        return self._create(namespace, key, parent, True, labels, lease)

    def _create(
        self,
        namespace: str,
        key: str,
        parent: str,
        readonly: bool,
        labels: Mapping[str, str] | None,
        lease: str | None,
    ) -> list[Mount]:
        """``createSnapshot``: reserve a backend key, create it in the engine, then record it."""
        with self.lock.read():
            _required(namespace)
            base = Info(name=key, labels=dict(labels) if labels is not None else {})
            validate_labels(base.labels)
            target = base.labels.get(LABEL_SNAPSHOT_REF, "")
            bopts = filter_inherited_labels(base.labels) or {}

            def reserve(tx: sqlite3.Connection) -> tuple[str, str]:
                _ensure_bucket(tx, namespace, self.name)
                if target and _exists(tx, namespace, self.name, target):
                    raise AlreadyExists(f"target snapshot {go_quote(target)}")
                if _exists(tx, namespace, self.name, key):
                    raise AlreadyExists(f"snapshot {go_quote(key)}")
                bparent = ""
                if parent:
                    precord = _record(tx, namespace, self.name, parent)
                    if precord is None:
                        raise NotFound(f"parent snapshot {parent} does not exist")
                    bparent = precord.bkey
                return bparent, backend_key(_next_sequence(tx, namespace, self.name), namespace, key)

            bparent, bkey = self.db.update(reserve)

            mounts: list[Mount] = []
            created = ""
            rerr: BaseException | None = None
            try:
                if readonly:
                    mounts = self.backend.view(bkey, bparent, bopts)
                else:
                    mounts = self.backend.prepare(bkey, bparent, bopts)
            except AlreadyExists as e:
                # The engine found a snapshot for the target reference (remote snapshotters).
                if not target:
                    raise CdtwistError(f"unexpected error from snapshotter: {e}: unknown") from e
                tinfo = self._find_target(target, bparent)
                key = target
                bkey = tinfo.name
                bparent = tinfo.parent
                base.created, base.updated = tinfo.created, tinfo.updated
                for k, v in tinfo.labels.items():
                    base.labels.setdefault(k, v)
                rerr = AlreadyExists(f"target snapshot {go_quote(target)} from snapshotter")
            else:
                base.created = base.updated = time.time_ns()
                created = bkey

            def record(tx: sqlite3.Connection) -> None:
                nonlocal rerr
                if not _has_bucket(tx, namespace, self.name):
                    raise NotFound(f"can not find snapshotter {go_quote(self.name)}")
                leasing.add_snapshot(tx, namespace, lease, self.name, key)
                if key == "":
                    raise CdtwistError(_BUCKET_NAME_REQUIRED)
                if _exists(tx, namespace, self.name, key):
                    if rerr is None:
                        rerr = AlreadyExists(f"snapshot {go_quote(key)}")
                    return
                if parent:
                    precord = _record(tx, namespace, self.name, parent)
                    if precord is None:
                        raise NotFound(f"parent snapshot {parent} does not exist")
                    if bparent != precord.bkey:
                        raise InvalidArgument(f"mismatched parent {parent} from target {target}")
                _insert(tx, namespace, self.name, key, bkey, parent, base.created, base.updated)
                if parent:
                    _add_child(tx, namespace, self.name, parent, key)
                _write_labels(tx, namespace, self.name, key, base.labels)

            try:
                self.db.update(record)
            except Exception as e:
                rerr = e
            if rerr is not None:
                if created:
                    try:
                        self.backend.remove(created)
                    except Exception as e:
                        log.error(
                            "failed to cleanup unreferenced snapshot", snapshotter=self.name, key=created, error=str(e)
                        )
                raise rerr
            return mounts

    def _find_target(self, target: str, bparent: str) -> Info:
        found: list[Info] = []

        def pick(info: Info) -> None:
            if found or info.kind != Kind.COMMITTED:
                return
            # Engines that do not apply the filter are checked by hand.
            if (info.labels or {}).get(LABEL_SNAPSHOT_REF) != target or info.parent != bparent:
                return
            found.append(info)

        flt = f'labels."{LABEL_SNAPSHOT_REF}"=={target},parent=={go_quote(bparent)}'
        try:
            self.backend.walk(pick, flt)
        except Exception as e:
            raise wrap_error("failed walking backend snapshots", e) from e
        if not found:
            raise NotFound(f"target snapshot {go_quote(target)} in backend")
        return found[0]

    def commit(
        self,
        namespace: str,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> None:
        """Record ``name`` under a new backend key and commit the engine's active snapshot to it."""
        with self.lock.read():
            _required(namespace)
            base_labels = dict(labels) if labels is not None else {}
            validate_labels(base_labels)
            bname = ""

            def txn(tx: sqlite3.Connection) -> None:
                nonlocal bname
                if not _has_bucket(tx, namespace, self.name):
                    raise NotFound(f"can not find snapshotter {go_quote(self.name)}")
                if name == "":
                    raise CdtwistError(_BUCKET_NAME_REQUIRED)
                if _exists(tx, namespace, self.name, name):
                    raise AlreadyExists(f"snapshot {go_quote(name)}")
                leasing.add_snapshot(tx, namespace, lease, self.name, name)
                active = _record(tx, namespace, self.name, key)
                if active is None:
                    raise NotFound(f"snapshot {key} does not exist")
                name_key = backend_key(_next_sequence(tx, namespace, self.name), namespace, name)
                if active.parent and not _exists(tx, namespace, self.name, active.parent):
                    raise NotFound(f"parent snapshot {active.parent} does not exist")
                now = time.time_ns()
                _insert(tx, namespace, self.name, name, name_key, active.parent, now, now)
                if active.parent:
                    _remove_child(tx, namespace, self.name, active.parent, key)
                    _add_child(tx, namespace, self.name, active.parent, name)
                _delete(tx, namespace, self.name, key)
                _write_labels(tx, namespace, self.name, name, base_labels)
                leasing.remove_snapshot(tx, namespace, lease, self.name, key)
                # In the transaction, as containerd does: a failed engine commit rolls the records back.
                try:
                    self.backend.commit(name_key, active.bkey, filter_inherited_labels(base_labels) or {})
                except NotFound as e:
                    log.error(
                        "uncommittable snapshot: missing in backend, snapshot should be removed",
                        snapshotter=self.name,
                        key=key,
                        error=str(e),
                    )
                    raise
                bname = name_key

            try:
                self.db.update(txn)
            except Exception as e:
                if bname:
                    log.error(
                        "uncommittable snapshot: transaction failed after commit, snapshot should be removed",
                        snapshotter=self.name,
                        key=key,
                        bname=bname,
                        error=str(e),
                    )
                raise

    def remove(self, namespace: str, key: str, lease: str | None = None) -> None:
        """Drop the record; the engine's snapshot goes at the next garbage collection."""
        with self.lock.read():
            _required(namespace)

            def txn(tx: sqlite3.Connection) -> None:
                record = _record(tx, namespace, self.name, key)
                if record is None:
                    raise NotFound(f"snapshot {key} does not exist")
                if _has_children(tx, namespace, self.name, key):
                    raise FailedPrecondition("cannot remove snapshot with child")
                if record.parent:
                    if not _exists(tx, namespace, self.name, record.parent):
                        raise NotFound(f"parent snapshot {record.parent} does not exist")
                    _remove_child(tx, namespace, self.name, record.parent, key)
                _delete(tx, namespace, self.name, key)
                leasing.remove_snapshot(tx, namespace, lease, self.name, key)
                self.collector.mark_dirty(snapshotter=self.name)

            self.db.update(txn)

    def walk(self, namespace: str, fn: WalkFn, *filter_exprs: str) -> None:
        """``fn`` for each snapshot of the namespace matching any filter, in key order."""
        for info in self.infos(namespace, *filter_exprs):
            fn(info)

    def infos(self, namespace: str, *filter_exprs: str) -> Iterator[Info]:
        """The snapshots :meth:`walk` visits, as they are found (the List stream sends them on the way).

        Records are read in batches; the engine is asked for each one's kind
        between batches, outside any transaction.  Snapshots the engine no
        longer has are skipped.  Filters are parsed before anything is read.
        """
        _required(namespace)
        flt = filters.parse_all(*filter_exprs)
        return self._infos(namespace, flt)

    def _infos(self, namespace: str, flt: filters.Filter) -> Iterator[Info]:
        after = ""
        while True:
            batch = self.db.view(lambda tx, after=after: _batch(tx, namespace, self.name, after))  # type: ignore[misc]
            for record in batch:
                try:
                    info = self.backend.stat(record.bkey)
                except NotFound:
                    continue
                info = overlay_info(info, record.local())
                if flt.match(adapt_snapshot(info)):
                    yield info
            if len(batch) < WALK_BATCH:
                return
            after = batch[-1].key

    def close(self) -> None:
        """Closes the engine (never the database)."""
        self.backend.close()

    # -- garbage collection ----------------------------------------------------

    def garbage_collect(self) -> float:
        """Remove engine snapshots no namespace references, children first (``snapshotter.garbageCollect``).

        Holds the lock exclusively, so no snapshot is being created between
        reading what is referenced and removing the rest; the engine's own
        cleanup (``Cleaner``) runs after the lock is released.
        """
        t0 = time.monotonic()
        with self.lock.write():
            seen = set(
                self.db.view(
                    lambda tx: [
                        r[0] for r in tx.execute("SELECT bkey FROM snapshots WHERE snapshotter = ?", (self.name,))
                    ]
                )
            )
            for node in self._walk_tree(seen):
                self._prune_branch(node)
        if isinstance(self.backend, Cleaner):
            try:
                self.backend.cleanup()
            except NotImplemented_:
                pass
        return time.monotonic() - t0

    def _walk_tree(self, seen: set[str]) -> list[_TreeNode]:
        roots: list[_TreeNode] = []
        nodes: dict[str, _TreeNode] = {}

        def add(info: Info) -> None:
            node = nodes.setdefault(info.name, _TreeNode())
            node.remove = info.name not in seen
            node.info = info
            if info.parent == "":
                roots.append(node)
            else:
                nodes.setdefault(info.parent, _TreeNode()).children.append(node)

        self.backend.walk(add)
        return roots

    def _prune_branch(self, node: _TreeNode) -> None:
        for child in node.children:
            self._prune_branch(child)
        if node.remove and node.info is not None:
            try:
                self.backend.remove(node.info.name)
            except FailedPrecondition as e:
                log.warn("failed to remove snapshot", snapshotter=self.name, key=node.info.name, error=str(e))
            else:
                log.debug("removed snapshot", snapshotter=self.name, key=node.info.name)


@dataclass
class _TreeNode:
    info: Info | None = None
    remove: bool = False
    children: list[_TreeNode] = field(default_factory=list)


# -- the snapshot part of the GC graph ------------------------------------------------------


def _node(namespace: str, snapshotter: str, key: str, type_: int = gc.SNAPSHOT) -> Node:
    return Node(type_, namespace, f"{snapshotter}/{key}")


def _split(node: Node) -> tuple[str, str]:
    snapshotter, sep, key = node.key.partition("/")
    if not sep:
        raise CdtwistError(f"invalid snapshot gc key {node.key}")
    return snapshotter, key


def _roots(tx: sqlite3.Connection, now_ns: int, emit: gc.Emit) -> None:
    """Snapshots labelled ``containerd.io/gc.root``."""
    for namespace, snapshotter, key in tx.execute(
        "SELECT namespace, snapshotter, key FROM snapshot_labels WHERE label = ?", (gc.LABEL_GC_ROOT,)
    ):
        emit(_node(namespace, snapshotter, key))


def _references(tx: sqlite3.Connection, node: Node, emit: gc.Emit) -> None:
    """The parent (same node type), then label references unless the node is flat."""
    snapshotter, key = _split(node)
    row = tx.execute(
        "SELECT parent FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
        (node.namespace, snapshotter, key),
    ).fetchone()
    if row is None:
        return  # a dead edge
    if row[0]:
        emit(_node(node.namespace, snapshotter, row[0], node.type))
    if node.type == gc.SNAPSHOT_FLAT:
        return
    labels = tx.execute(
        "SELECT label, value FROM snapshot_labels WHERE namespace = ? AND snapshotter = ? AND key = ? "
        "AND label >= ? AND label < ?",
        (node.namespace, snapshotter, key, gc.LABEL_REF_LOW, gc.LABEL_REF_HIGH),
    ).fetchall()
    gc.send_label_refs(node.namespace, labels, emit)


def _scan_all(tx: sqlite3.Connection, emit: gc.Emit) -> None:
    for namespace, snapshotter, key in tx.execute("SELECT namespace, snapshotter, key FROM snapshots"):
        emit(_node(namespace, snapshotter, key))


def _remove(tx: sqlite3.Connection, node: Node) -> None:
    snapshotter, key = _split(node)
    log.debug("remove snapshot", key=key, snapshotter=snapshotter)
    _delete(tx, node.namespace, snapshotter, key)


KIND = register_kind(
    ResourceKind(
        "snapshots",
        roots=_roots,
        scan_all=_scan_all,
        references={gc.SNAPSHOT: _references, gc.SNAPSHOT_FLAT: _references},
        remove={gc.SNAPSHOT: _remove},
    )
)


_registry_lock = threading.Lock()


def snapshotters_for(db: DB, backends: Mapping[str, Snapshotter]) -> dict[str, NamespacedSnapshotter]:
    """The namespaced snapshotters of ``db``, one per engine, shared by every user of the database.

    Kept on the database object (as the content store is), so the GC, the
    snapshots service and anything else wrapping the same engine share one
    lock per snapshotter.
    """
    with _registry_lock:
        known: dict[str, NamespacedSnapshotter] = db.__dict__.setdefault("_cdtwist_snapshotters", {})
        for name, backend in backends.items():
            current = known.get(name)
            if current is None or current.backend is not backend:
                known[name] = NamespacedSnapshotter(db, name, backend)
        return {name: known[name] for name in backends}


__all__ = [
    "KIND",
    "NamespacedSnapshotter",
    "backend_key",
    "overlay_info",
    "snapshotters_for",
    "snapshotters_in_use",
    "validate_labels",
]
