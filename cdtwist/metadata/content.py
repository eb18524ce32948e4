# -*- test-case-name: tests.test_content_metadata -*-
"""Namespaced content over the shared blob store (containerd's ``metadata/content.go``).

Blobs live once in the :class:`~cdtwist.content.local.LocalStore`; what a
namespace may see, its labels and timestamps live in the metadata database.
A blob becomes visible in a namespace when a writer commits it there.
Under the ``shared`` policy a writer that names an expected digest the
store already holds (in any namespace) gets it without sending the bytes;
under ``isolated`` it must send them all.

Ingests are recorded per namespace and ref; the backend ingest is named
``<namespace>/1/<ref>`` (containerd's ``createKey`` with the ref bucket's
first sequence number), so two namespaces never share one.  An ingest made
without a lease expires after 24 hours; one made under a lease lives as
long as the lease.

Every method blocks (database and disk): call from pool threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cdtwist import filters
from cdtwist.content.local import CANONICAL, Info, LocalStore, ReaderAt, Status
from cdtwist.content.local import Writer as LocalWriter
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.filters import quote
from cdtwist.gc import Node
from cdtwist.log import get_logger
from cdtwist.metadata import gc
from cdtwist.metadata import leases as leasing
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector, ResourceKind, collector_for, register_kind

log = get_logger(__name__)

MAX_LABEL_SIZE = 4096
#: Unleased ingests are collectable this long after their writer was opened.
INGEST_EXPIRY_NS = 24 * 3600 * 1_000_000_000
_COPY_CHUNK = 1 << 20


class RWLock:
    """Many readers or one writer; a waiting writer holds off new readers (Go's ``sync.RWMutex``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Guard:
        def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
            self._acquire, self._release = acquire, release

        def __enter__(self) -> None:
            self._acquire()

        def __exit__(self, *exc: object) -> None:
            self._release()

    def read(self) -> RWLock._Guard:
        return RWLock._Guard(self.acquire_read, self.release_read)

    def write(self) -> RWLock._Guard:
        return RWLock._Guard(self.acquire_write, self.release_write)


class _Removals:
    """Counts removals of blob records, process-wide: cached access checks older than the count are stale.

    A removal counts inside its transaction and again once it is committed
    (or, for the GC's sweep, when the content cleanup that follows starts),
    so a check that read the record just before the commit is never kept.
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self.count += 1


_removals = _Removals()
#: Access checks cached for Read; cleared when it grows past this.
_ACCESS_CACHE_LIMIT = 4096


def validate_labels(labels: dict[str, str]) -> None:
    """``validateInfo``: each key and value together at most 4096 bytes."""
    for key, value in labels.items():
        kb = key.encode("utf-8", "surrogateescape")
        if len(kb) + len(value.encode("utf-8", "surrogateescape")) > MAX_LABEL_SIZE:
            short = kb[:10].decode("utf-8", "surrogateescape")
            raise InvalidArgument(
                f"info.Labels: label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {short}"
            )


def backend_ref(namespace: str, ref: str) -> str:
    return f"{namespace}/1/{ref}"


def _ensure_namespace(tx: sqlite3.Connection, namespace: str) -> None:
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (namespace,))


def _blob_labels(tx: sqlite3.Connection, namespace: str, digest: str) -> dict[str, str]:
    rows = tx.execute(
        "SELECT key, value FROM content_blob_labels WHERE namespace = ? AND digest = ? ORDER BY key",
        (namespace, digest),
    )
    return dict(rows.fetchall())


def _read_info(tx: sqlite3.Connection, namespace: str, digest: str) -> Info | None:
    row = tx.execute(
        "SELECT size, created_at, updated_at FROM content_blobs WHERE namespace = ? AND digest = ?",
        (namespace, digest),
    ).fetchone()
    if row is None:
        return None
    return Info(digest, row[0], row[1], row[2], _blob_labels(tx, namespace, digest))


def _write_labels(
    tx: sqlite3.Connection, namespace: str, digest: str, labels: dict[str, str], context: str = ""
) -> dict[str, str]:
    """Replace the blob's labels (bolt's ``writeMap``): empty values are dropped; returns what was kept."""
    tx.execute("DELETE FROM content_blob_labels WHERE namespace = ? AND digest = ?", (namespace, digest))
    kept = {}
    for key, value in labels.items():
        if value == "":
            continue
        if key == "":
            raise CdtwistError(f'{context}failed to set label ""={quote(value)}: key required')
        tx.execute(
            "INSERT INTO content_blob_labels(namespace, digest, key, value) VALUES (?, ?, ?, ?)",
            (namespace, digest, key, value),
        )
        kept[key] = value
    return kept


@dataclass
class _Ingest:
    bref: str
    expected: str


def _get_ingest(tx: sqlite3.Connection, namespace: str, ref: str) -> _Ingest | None:
    row = tx.execute(
        "SELECT bref, expected FROM content_ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
    ).fetchone()
    return None if row is None else _Ingest(row[0], row[1])


class NamespacedContentStore:
    """The metadata content store: per-namespace blobs and ingests over one :class:`LocalStore`."""

    def __init__(self, db: DB, backend: LocalStore, shared: bool = True, collector: Collector | None = None) -> None:
        self.db = db
        self.backend = backend
        self.shared = shared
        self.collector = collector if collector is not None else collector_for(db)
        #: readers: every change that touches the backend; writer: the GC's backend cleanup.
        self.lock = RWLock()
        #: (namespace, digest) -> (removal count when checked, size): lets small
        #: reads skip the database until any blob record is removed.
        self._access: dict[tuple[str, str], tuple[int, int]] = {}
        self.collector.register_content(self)

    # -- blobs -------------------------------------------------------------

    def info(self, namespace: str, digest: str) -> Info:
        info = self.db.view(lambda tx: _read_info(tx, namespace, digest))
        if info is None:
            raise NotFound(f"content digest {digest}")
        return info

    def update(self, namespace: str, info: Info, *fieldpaths: str) -> Info:
        """Change labels: all of them, or only the ``labels``/``labels.<key>`` paths given."""

        def txn(tx: sqlite3.Connection) -> Info:
            updated = _read_info(tx, namespace, info.digest)
            if updated is None:
                raise NotFound(f"content digest {info.digest}")
            if fieldpaths:
                for path in fieldpaths:
                    if path.startswith("labels."):
                        key = path[len("labels.") :]
                        updated.labels[key] = info.labels.get(key, "")
                        continue
                    if path == "labels":
                        updated.labels = dict(info.labels)
                    else:
                        raise InvalidArgument(f"cannot update {quote(path)} field on content info {quote(info.digest)}")
            else:
                updated.labels = dict(info.labels)
            validate_labels(updated.labels)
            updated.updated_at = time.time_ns()
            tx.execute(
                "UPDATE content_blobs SET updated_at = ? WHERE namespace = ? AND digest = ?",
                (updated.updated_at, namespace, info.digest),
            )
            updated.labels = _write_labels(
                tx, namespace, info.digest, updated.labels, f"writing labels for info {info.digest}: "
            )
            return updated

        with self.lock.read():
            return self.db.update(txn)

    def walk(self, namespace: str, *filter_exprs: str) -> list[Info]:
        """Blobs of the namespace matching the filters (``digest``, ``labels.<key>``), in digest order."""
        flt = filters.parse_all(*filter_exprs)

        def read(tx: sqlite3.Connection) -> list[Info]:
            rows = tx.execute(
                "SELECT digest, size, created_at, updated_at FROM content_blobs WHERE namespace = ? ORDER BY digest",
                (namespace,),
            ).fetchall()
            labels: dict[str, dict[str, str]] = {}
            for digest, key, value in tx.execute(
                "SELECT digest, key, value FROM content_blob_labels WHERE namespace = ? ORDER BY digest, key",
                (namespace,),
            ):
                labels.setdefault(digest, {})[key] = value
            out = []
            for digest, size, created, updated in rows:
                info = Info(digest, size, created, updated, labels.get(digest, {}))
                adaptor = filters.FieldsAdaptor({"digest": digest, "labels": info.labels}, always_present=("digest",))
                if flt.match(adaptor):
                    out.append(info)
            return out

        return self.db.view(read)

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        """Remove the blob from the namespace; the GC removes the bytes once no namespace has them."""

        def txn(tx: sqlite3.Connection) -> None:
            _removals.bump()
            cur = tx.execute("DELETE FROM content_blobs WHERE namespace = ? AND digest = ?", (namespace, digest))
            if cur.rowcount == 0:
                raise NotFound(f"content digest {digest}")
            leasing.remove_content(tx, namespace, lease, digest)
            self.collector.mark_dirty(content=True)

        with self.lock.read():
            self.db.update(txn)
        _removals.bump()

    def reader(self, namespace: str, digest: str) -> ReaderAt:
        """Open a blob the namespace has (``ReaderAt`` after ``checkAccess``)."""
        return self.open(namespace, digest)[1]

    def open(self, namespace: str, digest: str) -> tuple[int, ReaderAt]:
        """The blob's recorded size and a reader (the Read RPC's hot path).

        Clients read in small pieces (``ctr content get``: 32 KiB per RPC),
        so the namespace check is cached until any blob record is removed;
        a removal racing a read orders the read first, as in containerd.
        """
        key = (namespace, digest)
        seen = _removals.count
        cached = self._access.get(key)
        if cached is not None and cached[0] == seen:
            size = cached[1]
        else:
            row = self.db.view(
                lambda tx: tx.execute(
                    "SELECT size FROM content_blobs WHERE namespace = ? AND digest = ?", (namespace, digest)
                ).fetchone()
            )
            if row is None:
                raise NotFound(f"content digest {digest}")
            size = row[0]
            if len(self._access) >= _ACCESS_CACHE_LIMIT:
                self._access.clear()
            self._access[key] = (seen, size)
        return size, self.backend.reader(digest)

    # -- ingests -----------------------------------------------------------

    def list_statuses(self, namespace: str, *filter_exprs: str) -> list[Status]:
        """Active ingests of the namespace (field ``ref``); those with nothing on disk are skipped."""
        flt = filters.parse_all(*filter_exprs)
        rows = self.db.view(
            lambda tx: tx.execute(
                "SELECT ref, bref FROM content_ingests WHERE namespace = ? ORDER BY ref", (namespace,)
            ).fetchall()
        )
        out = []
        for ref, bref in rows:
            try:
                status = self.backend.status(bref)
            except NotFound:
                continue
            status.ref = ref
            if flt.match(filters.FieldsAdaptor({"ref": ref}, always_present=("ref",))):
                out.append(status)
        return out

    def status(self, namespace: str, ref: str) -> Status:
        ingest = self.db.view(lambda tx: _get_ingest(tx, namespace, ref))
        if ingest is None or not ingest.bref:
            raise NotFound(f"reference {ref}")
        status = self.backend.status(ingest.bref)
        status.ref = ref
        return status

    def abort(self, namespace: str, ref: str, lease: str | None = None) -> None:
        """Forget the ingest; its bytes go too unless it only borrowed a shared blob."""

        def txn(tx: sqlite3.Connection) -> None:
            ingest = _get_ingest(tx, namespace, ref)
            if ingest is None or not ingest.bref:
                raise NotFound(f"reference {ref}")
            tx.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
            leasing.remove_ingest(tx, namespace, lease, ref)
            if ingest.expected == "":
                try:
                    self.backend.abort(ingest.bref)
                except NotFound:
                    pass  # Go's RemoveAll: nothing there is success

        with self.lock.read():
            self.db.update(txn)

    def writer(
        self, namespace: str, ref: str, total: int = 0, expected: str = "", lease: str | None = None
    ) -> NamespacedWriter:
        """Begin or resume the ingest ``ref`` in ``namespace``.

        :raises AlreadyExists: the namespace already has ``expected`` (the
            blob is added to the call's lease first, as containerd does).
        :raises Unavailable: another writer holds ``ref``.
        """
        if ref == "":
            raise InvalidArgument("ref must not be empty")
        size = total
        writer: LocalWriter | None = None
        exists = False
        bref = ""

        def txn(tx: sqlite3.Connection) -> None:
            nonlocal size, writer, exists, bref
            shared = False
            if expected:
                if _read_info(tx, namespace, expected) is not None:
                    try:
                        leasing.add_content(tx, namespace, lease, expected)
                    except CdtwistError as e:
                        raise type(e)(f"unable to lease content: {e.context}") from None
                    exists = True
                    return
                if self.shared:
                    try:
                        backend_info = self.backend.info(expected)
                    except (NotFound, InvalidArgument):
                        backend_info = None
                    if backend_info is not None and (size == 0 or size == backend_info.size):
                        shared = True
                        size = backend_info.size

            _ensure_namespace(tx, namespace)
            ingest = _get_ingest(tx, namespace, ref)
            if ingest is None:
                bref = backend_ref(namespace, ref)
                tx.execute("INSERT INTO content_ingests(namespace, ref, bref) VALUES (?, ?, ?)", (namespace, ref, bref))
            else:
                bref = ingest.bref
            leased = leasing.add_ingest(tx, namespace, lease, ref)
            if not leased:
                tx.execute(
                    "UPDATE content_ingests SET expire_at = ? WHERE namespace = ? AND ref = ?",
                    (time.time_ns() + INGEST_EXPIRY_NS, namespace, ref),
                )
            if shared:
                tx.execute(
                    "UPDATE content_ingests SET expected = ? WHERE namespace = ? AND ref = ?",
                    (expected, namespace, ref),
                )
            else:
                # The backend must not see the expected digest: it has to be
                # committed in this namespace before it counts as present.
                writer = self.backend.writer(bref, total=size)

        with self.lock.read():
            self.db.update(txn)
        if exists:
            raise AlreadyExists(f"content {expected}")
        return NamespacedWriter(self, namespace, ref, bref, writer, size, expected)

    # -- garbage collection ------------------------------------------------

    def garbage_collect(self) -> float:
        """Drop blobs and ingests from the backend that no namespace has (``contentStore.garbageCollect``)."""
        with self.lock.write():
            t0 = time.monotonic()
            _removals.bump()  # the sweep that led here has committed

            def seen(tx: sqlite3.Connection) -> tuple[set[str], set[str]]:
                content = {row[0] for row in tx.execute("SELECT DISTINCT digest FROM content_blobs")}
                ingests: set[str] = set()
                for bref, expected in tx.execute("SELECT bref, expected FROM content_ingests"):
                    # A borrowed blob may be gone from the namespace that had it.
                    if expected:
                        content.add(expected)
                    if bref:
                        ingests.add(bref)
                return content, ingests

            content_seen, ingest_seen = self.db.view(seen)
            unused: list[str] = []
            self.backend.walk(lambda info: unused.append(info.digest) if info.digest not in content_seen else None)
            for digest in unused:
                try:
                    self.backend.delete(digest)
                except NotFound:
                    continue
                log.debug("removed content", digest=digest)
            stale: list[str] = []
            self.backend.walk_status_refs(lambda ref: stale.append(ref) if ref not in ingest_seen else None)
            for ref in stale:
                try:
                    self.backend.abort(ref)
                except NotFound:
                    continue
                log.debug("cleanup aborting ingest", ref=ref)
            return time.monotonic() - t0


class NamespacedWriter:
    """A writer in one namespace (``namespacedWriter``).

    Without a backend writer it stands for a shared blob the namespace is
    about to adopt: status and digest are the blob's, and the first write
    (or a truncate) copies the blob into a real ingest first.
    """

    def __init__(
        self,
        store: NamespacedContentStore,
        namespace: str,
        ref: str,
        bref: str,
        writer: LocalWriter | None,
        size: int,
        expected: str,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.ref = ref
        self.bref = bref
        self.w = writer
        self.size = size
        self.expected = expected
        self.started = time.time_ns()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()

    def __enter__(self) -> NamespacedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.w is None:
            if len(data) == 0:
                return 0
            self._create_and_copy(self.size)
        assert self.w is not None
        return self.w.write(data)

    def digest(self) -> str:
        return self.w.digest() if self.w is not None else self.expected

    def truncate(self, size: int) -> None:
        if self.w is not None:
            self.w.truncate(size)
            return
        self._create_and_copy(size)

    def _create_and_copy(self, size: int) -> None:
        w = self.store.backend.writer(self.bref, total=size)
        try:
            if size > 0:
                with self.store.backend.reader(self.expected) as ra:
                    offset = w.status().offset
                    copied = 0
                    for chunk in ra.iter_chunks(offset, size, _COPY_CHUNK):
                        w.write(chunk)
                        copied += len(chunk)
                    if copied < size:
                        raise CdtwistError("failed to copy: failed to read expected number of bytes: unexpected EOF")
        except BaseException:
            w.close()
            raise
        self.w = w

    def status(self) -> Status:
        if self.w is not None:
            st = self.w.status()
        else:
            st = Status(
                ref=self.ref,
                offset=self.size,
                total=self.size,
                expected=self.expected,
                started_at=self.started,
                updated_at=self.started,
            )
        st.ref = self.ref
        return st

    def commit(
        self, size: int = 0, expected: str = "", labels: dict[str, str] | None = None, lease: str | None = None
    ) -> None:
        """Publish the blob in the namespace; AlreadyExists (after recording it) if it already was."""
        inner: AlreadyExists | None = None

        def txn(tx: sqlite3.Connection) -> None:
            nonlocal inner
            try:
                digest = self._commit(tx, size, expected, labels)
            except _Exists as e:
                digest, inner = e.digest, AlreadyExists(f"content {e.digest}")
            tx.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (self.namespace, self.ref))
            leasing.remove_ingest(tx, self.namespace, lease, self.ref)
            leasing.add_content(tx, self.namespace, lease, digest)

        with self.store.lock.read():
            self.store.db.update(txn)
        if inner is not None:
            raise inner

    def _commit(self, tx: sqlite3.Connection, size: int, expected: str, labels: dict[str, str] | None) -> str:
        labels = dict(labels or {})
        try:
            validate_labels(labels)
        except InvalidArgument:
            self.close()
            raise
        if self.w is None:
            if size != 0 and size != self.size:
                raise FailedPrecondition(f"{quote(self.ref)} failed size validation: {self.size} != {size}")
            if expected and expected != self.expected:
                raise FailedPrecondition(f"{quote(self.ref)} unexpected digest")
            size = self.size
            actual = self.expected
        else:
            offset = self.w.status().offset
            if size != 0 and size != offset:
                self.w.close()
                raise FailedPrecondition(f"{quote(self.ref)} failed size validation: {offset} != {size}")
            size = offset
            try:
                self.w.commit(size, expected)
            except AlreadyExists:
                pass
            actual = self.w.digest()
        now = time.time_ns()
        try:
            tx.execute(
                "INSERT INTO content_blobs(namespace, digest, size, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (self.namespace, actual, size, now, now),
            )
        except sqlite3.IntegrityError:
            raise _Exists(actual) from None
        _write_labels(tx, self.namespace, actual, labels)
        return actual


class _Exists(Exception):
    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


# -- the content part of the GC graph ---------------------------------------------------


def _roots(tx: sqlite3.Connection, now_ns: int, emit: gc.Emit) -> None:
    """Unexpired unleased ingests and blobs labelled ``containerd.io/gc.root``."""
    for namespace, ref in tx.execute(
        "SELECT namespace, ref FROM content_ingests WHERE expire_at IS NOT NULL AND expire_at >= ?", (now_ns,)
    ):
        emit(Node(gc.INGEST, namespace, ref))
    for namespace, digest in tx.execute(
        "SELECT namespace, digest FROM content_blob_labels WHERE key = ?", (gc.LABEL_GC_ROOT,)
    ):
        emit(Node(gc.CONTENT, namespace, digest))


def _content_refs(tx: sqlite3.Connection, node: Node, emit: gc.Emit) -> None:
    labels = tx.execute(
        "SELECT key, value FROM content_blob_labels WHERE namespace = ? AND digest = ? AND key >= ? AND key < ?",
        (node.namespace, node.key, gc.LABEL_REF_LOW, gc.LABEL_REF_HIGH),
    ).fetchall()
    gc.send_label_refs(node.namespace, labels, emit)


def _ingest_refs(tx: sqlite3.Connection, node: Node, emit: gc.Emit) -> None:
    row = tx.execute(
        "SELECT expected FROM content_ingests WHERE namespace = ? AND ref = ?", (node.namespace, node.key)
    ).fetchone()
    if row is not None and row[0]:
        emit(Node(gc.CONTENT, node.namespace, row[0]))


def _scan_all(tx: sqlite3.Connection, emit: gc.Emit) -> None:
    for namespace, ref in tx.execute("SELECT namespace, ref FROM content_ingests"):
        emit(Node(gc.INGEST, namespace, ref))
    for namespace, digest in tx.execute("SELECT namespace, digest FROM content_blobs"):
        emit(Node(gc.CONTENT, namespace, digest))


def _remove_blob(tx: sqlite3.Connection, node: Node) -> None:
    log.debug("remove content", key=node.key)
    _removals.bump()
    tx.execute("DELETE FROM content_blobs WHERE namespace = ? AND digest = ?", (node.namespace, node.key))


def _remove_ingest(tx: sqlite3.Connection, node: Node) -> None:
    log.debug("remove ingest", ref=node.key)
    tx.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (node.namespace, node.key))


KIND = register_kind(
    ResourceKind(
        "content",
        roots=_roots,
        scan_all=_scan_all,
        references={gc.CONTENT: _content_refs, gc.INGEST: _ingest_refs},
        remove={gc.CONTENT: _remove_blob, gc.INGEST: _remove_ingest},
    )
)


_stores_lock = threading.Lock()


def content_store_for(db: DB, backend: LocalStore, shared: bool) -> NamespacedContentStore:
    """The one namespaced content store of ``db`` (the content service and the GC share it)."""
    with _stores_lock:
        store: NamespacedContentStore | None = db.__dict__.get("_cdtwist_content_store")
        if store is None or store.backend is not backend:
            store = NamespacedContentStore(db, backend, shared)
            db.__dict__["_cdtwist_content_store"] = store
        return store


__all__ = ["CANONICAL", "NamespacedContentStore", "NamespacedWriter", "RWLock", "content_store_for"]
