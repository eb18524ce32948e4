# -*- test-case-name: tests.test_gc -*-
"""The metadata reference graph and its collector (containerd's ``metadata/gc.go`` and ``DB.GarbageCollect``).

Each kind of record (leases, blobs, ingests, images, snapshots; containers
join the same way) describes its part of the graph with a
:class:`ResourceKind`: which of its records are roots, what a record
references, how to list and remove them.  :class:`Collector` marks from
every root inside one write transaction, so nothing can gain a reference
between mark and sweep, removes the unreachable records, and then asks the
backing stores whose records went away (the content store, snapshotters)
to drop what no namespace references any more.

Resource types and label keys are containerd's, so the same labels keep
the same objects alive.

How images, containers and snapshots join (``tests/test_gc.py`` does it
with test tables):

* images: ``register_kind(ResourceKind("images", roots=...))`` emitting
  ``Node(CONTENT, ns, target_digest)`` and :func:`send_label_refs` of the
  image's labels, for every image;
* containers: roots emitting ``Node(SNAPSHOT, ns, "<snapshotter>/<key>")``
  and the label refs;
* snapshots: roots (``containerd.io/gc.root``), ``scan_all``,
  ``references`` for both ``SNAPSHOT`` and ``SNAPSHOT_FLAT`` (the parent
  with the same type; label refs only when not flat) and ``remove`` for
  ``SNAPSHOT``; each metadata-wrapped snapshotter registers itself with
  :meth:`Collector.register_snapshotter` (a :class:`BackendCleaner`) and
  holds snapshots for a call's lease with
  :func:`cdtwist.metadata.leases.add_snapshot`.  Deleting a snapshot record
  outside the GC calls ``collector.mark_dirty(snapshotter=name)``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cdtwist.content.local import go_duration, parse_timestamp
from cdtwist.errors import CdtwistError
from cdtwist.gc import Node, Stats, tricolor
from cdtwist.log import get_logger
from cdtwist.metadata.db import DB

log = get_logger(__name__)

# containerd's metadata resource types, same numbers.
UNKNOWN = 0
CONTENT = 1
SNAPSHOT = 2
CONTAINER = 3
TASK = 4
LEASE = 5
INGEST = 6
#: Flat variants (``containerd.io/gc.flat`` leases): held, but their references are not followed.
CONTENT_FLAT = CONTENT | 0x20
SNAPSHOT_FLAT = SNAPSHOT | 0x20

LABEL_GC_ROOT = "containerd.io/gc.root"
LABEL_GC_SNAP_REF = "containerd.io/gc.ref.snapshot."
LABEL_GC_CONTENT_REF = "containerd.io/gc.ref.content"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_GC_FLAT = "containerd.io/gc.flat"

#: Every ``containerd.io/gc.ref.*`` key sorts in [LABEL_REF_LOW, LABEL_REF_HIGH): a range scan on an index.
LABEL_REF_LOW = "containerd.io/gc.ref."
LABEL_REF_HIGH = "containerd.io/gc.ref/"

Emit = Callable[[Node], object]
RootsFn = Callable[[sqlite3.Connection, int, Emit], None]
ScanFn = Callable[[sqlite3.Connection, Emit], None]
RefsFn = Callable[[sqlite3.Connection, Node, Emit], None]
RemoveFn = Callable[[sqlite3.Connection, Node], None]


@dataclass(frozen=True)
class ResourceKind:
    """One kind of metadata record's part in the reference graph.

    :param roots: emits the kind's records that are roots; gets the time
        (ns since the epoch) against which expirations are judged.
    :param scan_all: emits every record of the kind (the sweep's candidates).
    :param references: per node type (flat variants included), what a node references.
    :param remove: per node type, deletes the node's record (inside the sweep's transaction).
    """

    name: str
    roots: RootsFn | None = None
    scan_all: ScanFn | None = None
    references: Mapping[int, RefsFn] = field(default_factory=dict)
    remove: Mapping[int, RemoveFn] = field(default_factory=dict)


#: The graph every collector walks; kinds add themselves when their module is imported.
KINDS: list[ResourceKind] = []


def register_kind(kind: ResourceKind) -> ResourceKind:
    """Add (or replace, by name) a kind of record to the graph."""
    for i, existing in enumerate(KINDS):
        if existing.name == kind.name:
            KINDS[i] = kind
            return kind
    KINDS.append(kind)
    return kind


def send_label_refs(namespace: str, labels: Iterable[tuple[str, str]], emit: Emit) -> None:
    """What an object's labels reference (``sendLabelRefs``).

    ``containerd.io/gc.ref.content`` (alone or followed by ``.`` or ``/`` and
    any name) references a blob; ``containerd.io/gc.ref.snapshot.<snapshotter>[/<name>]``
    a snapshot of that snapshotter.
    """
    items = sorted(labels)
    for key, value in items:
        if key.startswith(LABEL_GC_CONTENT_REF):
            if key != LABEL_GC_CONTENT_REF and key[len(LABEL_GC_CONTENT_REF)] not in "./":
                continue
            emit(Node(CONTENT, namespace, value))
    for key, value in items:
        if key.startswith(LABEL_GC_SNAP_REF):
            snapshotter = key[len(LABEL_GC_SNAP_REF) :].split("/", 1)[0]
            emit(Node(SNAPSHOT, namespace, f"{snapshotter}/{value}"))


def expired(value: str | None, now_ns: int, what: str) -> bool:
    """Whether a ``containerd.io/gc.expire`` value (RFC 3339) lies before ``now_ns``.

    An unparsable value is logged and ignored (the object stays), as containerd does.
    """
    if value is None:
        return False
    try:
        return parse_timestamp(value) < now_ns
    except ValueError as e:
        log.info("ignoring invalid expiration value {value!r}", value=value, lease=what, error=str(e))
        return False


class BackendCleaner(Protocol):
    """A backing store whose unreferenced objects the collector removes after a sweep.

    The content store implements it; a snapshotter wrapped by the metadata
    database (issue 5) implements it too and is registered with
    :meth:`Collector.register_snapshotter` under its name, so that removing a
    ``snapshot`` node ``<name>/<key>`` makes the collector call it.  It runs on
    the collector's thread after the metadata sweep committed, may block, and
    must itself keep new writers from racing with it (containerd holds the
    store's lock exclusively while it cleans).
    """

    def garbage_collect(self) -> float:
        """Remove what no namespace references; the seconds it took."""
        ...


class Collector:
    """Mark and sweep over one metadata database (containerd's ``DB.GarbageCollect``).

    Stores call :meth:`mark_dirty` inside transactions that remove
    references; the GC scheduler reads :attr:`dirty` after each commit.
    :meth:`garbage_collect` blocks (run it in a thread, never on the reactor).
    """

    def __init__(
        self,
        db: DB,
        kinds: Sequence[ResourceKind] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.db = db
        self._kinds = kinds
        self.clock = clock
        self._lock = threading.Lock()
        self._gc_lock = threading.Lock()
        self._dirty = 0
        self._dirty_content = False
        self._dirty_snapshotters: set[str] = set()
        self._content: BackendCleaner | None = None
        self._snapshotters: dict[str, BackendCleaner] = {}

    @property
    def kinds(self) -> Sequence[ResourceKind]:
        return KINDS if self._kinds is None else self._kinds

    # -- dirtiness ---------------------------------------------------------

    def mark_dirty(self, content: bool = False, snapshotter: str | None = None) -> None:
        """A reference was removed: the next collection has work (``db.dirty++``)."""
        with self._lock:
            self._dirty += 1
            if content:
                self._dirty_content = True
            if snapshotter is not None:
                self._dirty_snapshotters.add(snapshotter)

    @property
    def dirty(self) -> bool:
        with self._lock:
            return self._dirty > 0

    # -- backends ----------------------------------------------------------

    def register_content(self, store: BackendCleaner) -> None:
        self._content = store

    def register_snapshotter(self, name: str, store: BackendCleaner) -> None:
        self._snapshotters[name] = store

    # -- the graph ---------------------------------------------------------

    def roots(self, tx: sqlite3.Connection, now_ns: int | None = None) -> list[Node]:
        now = self.clock() if now_ns is None else now_ns
        out: list[Node] = []
        for kind in self.kinds:
            if kind.roots is not None:
                kind.roots(tx, now, out.append)
        return out

    def references(self, tx: sqlite3.Connection, node: Node) -> list[Node]:
        out: list[Node] = []
        for kind in self.kinds:
            fn = kind.references.get(node.type)
            if fn is not None:
                fn(tx, node, out.append)
        return out

    def mark(self, tx: sqlite3.Connection, now_ns: int | None = None) -> set[Node]:
        """Every node reachable from a root (``getMarked``)."""
        return tricolor(self.roots(tx, now_ns), lambda n: self.references(tx, n))

    def scan_all(self, tx: sqlite3.Connection) -> list[Node]:
        out: list[Node] = []
        for kind in self.kinds:
            if kind.scan_all is not None:
                kind.scan_all(tx, out.append)
        return out

    def remove(self, tx: sqlite3.Connection, node: Node) -> None:
        for kind in self.kinds:
            fn = kind.remove.get(node.type)
            if fn is not None:
                fn(tx, node)
                return

    # -- collection --------------------------------------------------------

    def garbage_collect(self) -> Stats:
        """Mark, sweep the records, then clean the backends that lost records; blocking."""
        with self._gc_lock:
            t0 = time.monotonic()

            def mark_and_sweep(tx: sqlite3.Connection) -> tuple[bool, set[str], int]:
                marked = self.mark(tx)
                content = False
                snapshotters: set[str] = set()
                removed = 0
                for node in self.scan_all(tx):
                    if node in marked:
                        continue
                    if node.type == SNAPSHOT:
                        name, sep, _ = node.key.partition("/")
                        if sep and name:
                            snapshotters.add(name)
                    elif node.type in (CONTENT, INGEST):
                        content = True
                    self.remove(tx, node)
                    removed += 1
                # Inside the write transaction: no other writer can dirty
                # anything between the sweep and this reset (Go's wlock).
                with self._lock:
                    self._dirty = 0
                return content, snapshotters, removed

            content, snapshotters, removed = self.db.update(mark_and_sweep)
            with self._lock:
                content = content or self._dirty_content
                snapshotters |= self._dirty_snapshotters
                self._dirty_content = False
                self._dirty_snapshotters = set()
            meta = time.monotonic() - t0
            log.debug("garbage collected metadata", removed=removed, d=go_duration(int(meta * 1e9)))

            content_d = 0.0
            if content and self._content is not None:
                content_d = self._cleanup("content", self._content)
            snapshot_d = []
            for name in sorted(snapshotters):
                store = self._snapshotters.get(name)
                if store is not None:
                    snapshot_d.append((name, self._cleanup(f"snapshotter {name}", store)))
            return Stats(meta=meta, content=content_d, snapshots=tuple(snapshot_d))

    @staticmethod
    def _cleanup(what: str, store: BackendCleaner) -> float:
        """A backend's cleanup failing is logged, not fatal (as in containerd)."""
        t0 = time.monotonic()
        try:
            store.garbage_collect()
        except CdtwistError as e:
            # An expected class (a proxy plugin's peer away: Unavailable): the message says it all.
            log.error(f"{what} garbage collection failed", error=str(e))
        except Exception:
            log.failure("{what} garbage collection failed", what=what)
        elapsed = time.monotonic() - t0
        log.debug(f"{what} garbage collected", d=go_duration(int(elapsed * 1e9)))
        return elapsed


_collectors_lock = threading.Lock()


def collector_for(db: DB) -> Collector:
    """The collector of ``db``, created on first use and kept on the database object.

    Kept on the object (not in a registry) so it goes away with the database.
    """
    with _collectors_lock:
        collector: Collector | None = db.__dict__.get("_cdtwist_collector")
        if collector is None:
            collector = Collector(db)
            db.__dict__["_cdtwist_collector"] = collector
        return collector
