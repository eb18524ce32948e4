# -*- test-case-name: tests.test_leases -*-
"""Leases in the metadata database (containerd's ``metadata/leases.go``).

A lease holds resources (blobs, ingests, snapshots) against garbage
collection until it is deleted or expires (``containerd.io/gc.expire``).
Stores that create resources while a call carries a lease (the
``containerd-lease`` header) add them with :func:`add_resource` in the same
transaction, and the GC sees every live lease as a root.

Every function takes an open transaction (``db.view``/``db.update``).
"""

from __future__ import annotations

import base64
import os
import sqlite3
import time
from dataclasses import dataclass, field

from cdtwist import filters
from cdtwist.content.local import validate_digest
from cdtwist.errors import AlreadyExists, CdtwistError, InvalidArgument, NotFound, NotImplemented_
from cdtwist.filters import quote
from cdtwist.gc import Node
from cdtwist.metadata import gc
from cdtwist.metadata.gc import ResourceKind, register_kind

#: Resource types as the API names them; snapshots are ``snapshots/<snapshotter>``.
CONTENT = "content"
INGESTS = "ingests"
SNAPSHOTS = "snapshots"


@dataclass
class Lease:
    id: str
    #: nanoseconds since the epoch
    created_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


def random_id(now_ns: int | None = None) -> str:
    """``leases.WithRandomID``: the nanosecond within the second, then 3 random bytes in URL base64."""
    now = time.time_ns() if now_ns is None else now_ns
    return f"{now % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def _ensure_namespace(tx: sqlite3.Connection, namespace: str) -> None:
    # bolt creates the namespace bucket on the way to any object in it.
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (namespace,))


def _exists(tx: sqlite3.Connection, namespace: str, lease_id: str) -> bool:
    row = tx.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone()
    return row is not None


def _labels(tx: sqlite3.Connection, namespace: str, lease_id: str) -> dict[str, str]:
    rows = tx.execute(
        "SELECT key, value FROM lease_labels WHERE namespace = ? AND id = ? ORDER BY key", (namespace, lease_id)
    )
    return dict(rows.fetchall())


# -- the lease manager ----------------------------------------------------------


def create(tx: sqlite3.Connection, namespace: str, lease_id: str, labels: dict[str, str] | None = None) -> Lease:
    """A new lease; AlreadyExists if the id is taken in ``namespace``.

    Labels with empty values are dropped (bolt's ``WriteLabels``); keys and
    ids are not validated, as in containerd.
    """
    if lease_id == "":
        raise CdtwistError("lease id must be provided")
    _ensure_namespace(tx, namespace)
    now = time.time_ns()
    try:
        tx.execute("INSERT INTO leases(namespace, id, created_at) VALUES (?, ?, ?)", (namespace, lease_id, now))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"lease {quote(lease_id)}") from None
    kept = {k: v for k, v in (labels or {}).items() if v != ""}
    for key, value in kept.items():
        if key == "":
            raise CdtwistError(f'failed to set label ""={quote(value)}: key required')
        tx.execute(
            "INSERT INTO lease_labels(namespace, id, key, value) VALUES (?, ?, ?, ?)", (namespace, lease_id, key, value)
        )
    return Lease(lease_id, now, kept)


def delete(tx: sqlite3.Connection, namespace: str, lease_id: str, collector: gc.Collector | None = None) -> None:
    """Remove a lease; what it held becomes collectable."""
    cur = tx.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id))
    if cur.rowcount == 0:
        raise NotFound(f"lease {quote(lease_id)}")
    if collector is not None:
        collector.mark_dirty()


def _adaptor(lease: Lease) -> filters.Adaptor:
    return filters.FieldsAdaptor({"id": lease.id, "labels": lease.labels})


def list_leases(tx: sqlite3.Connection, namespace: str, *filter_exprs: str) -> list[Lease]:
    """Leases of ``namespace`` matching the filters (fields ``id``, ``labels.<key>``), in id order."""
    try:
        flt = filters.parse_all(*filter_exprs)
    except InvalidArgument as e:
        # containerd wraps the already classified error once more.
        raise InvalidArgument(str(e)) from None
    out = []
    rows = tx.execute("SELECT id, created_at FROM leases WHERE namespace = ? ORDER BY id", (namespace,)).fetchall()
    for lease_id, created in rows:
        lease = Lease(lease_id, created, _labels(tx, namespace, lease_id))
        if flt.match(_adaptor(lease)):
            out.append(lease)
    return out


def get(tx: sqlite3.Connection, namespace: str, lease_id: str) -> Lease | None:
    row = tx.execute("SELECT created_at FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone()
    if row is None:
        return None
    return Lease(lease_id, row[0], _labels(tx, namespace, lease_id))


def parse_resource(resource: Resource) -> tuple[str, str]:
    """The stored (type, key) of an API resource (``parseLeaseResource``), with containerd's errors."""
    ref, typ = resource.id, resource.type
    keys = typ.split("/")
    kind = keys[0]
    if kind in (CONTENT, INGESTS):
        if len(keys) != 1:
            raise InvalidArgument(f"invalid resource type {typ}")
        if kind == CONTENT:
            try:
                validate_digest(ref)
            except ValueError as e:
                raise InvalidArgument(f"invalid content resource id {ref}: {e}") from None
    elif kind == SNAPSHOTS:
        if len(keys) != 2:
            raise InvalidArgument(f"invalid snapshot resource type {typ}")
    else:
        raise NotImplemented_(f"resource type {typ} not supported yet")
    return typ, ref


def add_resource(tx: sqlite3.Connection, namespace: str, lease_id: str, resource: Resource) -> None:
    if not _exists(tx, namespace, lease_id):
        raise NotFound(f"lease {quote(lease_id)}")
    typ, key = parse_resource(resource)
    tx.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, key) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, typ, key),
    )


def delete_resource(
    tx: sqlite3.Connection, namespace: str, lease_id: str, resource: Resource, collector: gc.Collector | None = None
) -> None:
    if not _exists(tx, namespace, lease_id):
        raise NotFound(f"lease {quote(lease_id)}")
    typ, key = parse_resource(resource)
    tx.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND key = ?",
        (namespace, lease_id, typ, key),
    )
    if collector is not None:
        collector.mark_dirty()


def list_resources(tx: sqlite3.Connection, namespace: str, lease_id: str) -> list[Resource]:
    """Content first, then ingests, then snapshots by snapshotter: bolt's bucket order."""
    if not _exists(tx, namespace, lease_id):
        raise NotFound(f"lease {quote(lease_id)}")
    rows = tx.execute(
        "SELECT type, key FROM lease_resources WHERE namespace = ? AND lease = ? "
        "ORDER BY CASE WHEN type = 'content' THEN 0 WHEN type = 'ingests' THEN 1 ELSE 2 END, type, key",
        (namespace, lease_id),
    ).fetchall()
    return [Resource(key, typ) for typ, key in rows]


# -- leasing from other stores (the call's lease, if any) --------------------------


def _lease_required(tx: sqlite3.Connection, namespace: str, lease_id: str) -> None:
    if not _exists(tx, namespace, lease_id):
        raise NotFound("lease does not exist")


def add_content(tx: sqlite3.Connection, namespace: str, lease_id: str | None, digest: str) -> None:
    """``addContentLease``: no-op without a lease; NotFound if the lease is gone."""
    if not lease_id:
        return
    _lease_required(tx, namespace, lease_id)
    tx.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, key) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, CONTENT, digest),
    )


def remove_content(tx: sqlite3.Connection, namespace: str, lease_id: str | None, digest: str) -> None:
    _remove(tx, namespace, lease_id, CONTENT, digest)


def add_ingest(tx: sqlite3.Connection, namespace: str, lease_id: str | None, ref: str) -> bool:
    """``addIngestLease``: True if the ingest is now held by the lease."""
    if not lease_id:
        return False
    _lease_required(tx, namespace, lease_id)
    tx.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, key) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, INGESTS, ref),
    )
    return True


def remove_ingest(tx: sqlite3.Connection, namespace: str, lease_id: str | None, ref: str) -> None:
    _remove(tx, namespace, lease_id, INGESTS, ref)


def add_snapshot(tx: sqlite3.Connection, namespace: str, lease_id: str | None, snapshotter: str, key: str) -> None:
    """``addSnapshotLease`` for the snapshot stores of issue 5."""
    if not lease_id:
        return
    _lease_required(tx, namespace, lease_id)
    tx.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, key) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, f"{SNAPSHOTS}/{snapshotter}", key),
    )


def remove_snapshot(tx: sqlite3.Connection, namespace: str, lease_id: str | None, snapshotter: str, key: str) -> None:
    _remove(tx, namespace, lease_id, f"{SNAPSHOTS}/{snapshotter}", key)


def _remove(tx: sqlite3.Connection, namespace: str, lease_id: str | None, typ: str, key: str) -> None:
    # A missing lease or resource is fine here (containerd returns nil).
    if not lease_id:
        return
    tx.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND key = ?",
        (namespace, lease_id, typ, key),
    )


# -- the lease part of the GC graph ---------------------------------------------------


def _roots(tx: sqlite3.Connection, now_ns: int, emit: gc.Emit) -> None:
    """Live leases and everything they hold (flat leases hold without following references)."""
    leases = tx.execute("SELECT namespace, id FROM leases ORDER BY namespace, id").fetchall()
    for namespace, lease_id in leases:
        labels = dict(
            tx.execute(
                "SELECT key, value FROM lease_labels WHERE namespace = ? AND id = ? AND key IN (?, ?)",
                (namespace, lease_id, gc.LABEL_GC_EXPIRE, gc.LABEL_GC_FLAT),
            ).fetchall()
        )
        if gc.expired(labels.get(gc.LABEL_GC_EXPIRE), now_ns, lease_id):
            continue
        flat = gc.LABEL_GC_FLAT in labels
        emit(Node(gc.LEASE, namespace, lease_id))
        rows = tx.execute(
            "SELECT type, key FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, key",
            (namespace, lease_id),
        )
        for typ, key in rows:
            if typ == CONTENT:
                emit(Node(gc.CONTENT_FLAT if flat else gc.CONTENT, namespace, key))
            elif typ == INGESTS:
                emit(Node(gc.INGEST, namespace, key))
            elif typ.startswith(SNAPSHOTS + "/"):
                snapshotter = typ[len(SNAPSHOTS) + 1 :]
                emit(Node(gc.SNAPSHOT_FLAT if flat else gc.SNAPSHOT, namespace, f"{snapshotter}/{key}"))


def _scan_all(tx: sqlite3.Connection, emit: gc.Emit) -> None:
    for namespace, lease_id in tx.execute("SELECT namespace, id FROM leases"):
        emit(Node(gc.LEASE, namespace, lease_id))


def _remove_lease(tx: sqlite3.Connection, node: Node) -> None:
    tx.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (node.namespace, node.key))


KIND = register_kind(ResourceKind("leases", roots=_roots, scan_all=_scan_all, remove={gc.LEASE: _remove_lease}))
