# -*- test-case-name: tests.test_containers -*-
"""Containers in the metadata database (containerd's ``metadata/containers.go``).

A container is a record only: an id in a namespace with labels, an image
name, the runtime (name and options), the OCI spec as an ``Any``, the
snapshotter and snapshot key of its root filesystem, extensions and two
timestamps.  Validation, field masks, filters and error texts are
containerd 1.6's, including its quirks, kept so clients see the same
answers:

* a namespace has a containers "bucket" from its first container on
  (bolt never removes it): until then Update and Delete say
  ``cannot update/delete container "x" in namespace "ns"``, after it
  ``container "x"``/``container x`` (``container_buckets`` keeps the fact);
* extensions are merged into what is stored, never removed (bolt's
  ``WriteExtensions`` only puts keys), while the record returned by Update
  holds exactly the requested map;
* labels with empty values are dropped, from the returned record too.

Every container is a garbage collection root: it holds the snapshot
``<snapshotter>/<snapshot_key>`` when it names a snapshotter, and whatever
its ``containerd.io/gc.ref.*`` labels name.

The module functions take an open transaction; :class:`ContainerStore`
runs them in one.  Everything blocks: call from pool threads.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from google.protobuf import any_pb2

from cdtwist import filters
from cdtwist.errors import AlreadyExists, CdtwistError, InvalidArgument, NotFound
from cdtwist.filters import quote
from cdtwist.gc import Node
from cdtwist.grpc.context import validate_identifier
from cdtwist.metadata import gc
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector, ResourceKind, collector_for, register_kind

MAX_LABEL_SIZE = 4096
#: bolt's ``MaxKeySize``: a longer extension key fails when written.
MAX_KEY_SIZE = 32768

#: What a full replace (an Update without field paths) may change, in containerd's order.
FULL_REPLACE_PATHS = ("labels", "spec", "extensions", "image", "snapshotkey")


@dataclass
class Container:
    """containerd's ``containers.Container`` (1.6 has no sandbox field)."""

    id: str
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime_name: str = ""
    runtime_options: any_pb2.Any | None = None
    spec: any_pb2.Any | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    #: nanoseconds since the epoch
    created_at: int = 0
    updated_at: int = 0
    extensions: dict[str, any_pb2.Any] = field(default_factory=dict)


# -- validation -------------------------------------------------------------------------


def validate_container(container: Container) -> None:
    """``validateContainer``: id, extension keys, labels, runtime name, spec, snapshotter."""
    try:
        validate_identifier(container.id)
    except InvalidArgument as e:
        raise InvalidArgument(f"container.ID: {e.context}") from None
    for key in container.extensions:
        if key == "":
            raise InvalidArgument("container.Extension keys must not be zero-length")
    for key, value in container.labels.items():
        kb = key.encode("utf-8", "surrogateescape")
        if len(kb) + len(value.encode("utf-8", "surrogateescape")) > MAX_LABEL_SIZE:
            short = kb[:10].decode("utf-8", "surrogateescape")
            raise InvalidArgument(
                f"containers.Labels: label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                f"key: {short}"
            )
    if container.runtime_name == "":
        raise InvalidArgument("container.Runtime.Name must be set")
    if container.spec is None:
        raise InvalidArgument("container.Spec must be set")
    if container.snapshot_key != "" and container.snapshotter == "":
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def _wrap(err: CdtwistError, prefix: str) -> CdtwistError:
    """``fmt.Errorf("<prefix>: %w", err)``: same class, context prefixed."""
    return type(err)(f"{prefix}: {err.context}")


# -- rows -------------------------------------------------------------------------------------


def _any_bytes(value: any_pb2.Any | None) -> bytes | None:
    return None if value is None else value.SerializeToString(deterministic=True)


def _any_from(data: bytes | None) -> any_pb2.Any | None:
    if data is None:
        return None
    value = any_pb2.Any()
    value.ParseFromString(data)
    return value


_COLUMNS = "id, image, runtime_name, runtime_options, spec, snapshotter, snapshot_key, created_at, updated_at"


def _from_row(row: Sequence[object], labels: dict[str, str], extensions: dict[str, any_pb2.Any]) -> Container:
    cid, image, runtime_name, options, spec, snapshotter, snapshot_key, created, updated = row
    return Container(
        id=str(cid),
        labels=labels,
        image=str(image),
        runtime_name=str(runtime_name),
        runtime_options=_any_from(options),  # type: ignore[arg-type]
        spec=_any_from(spec),  # type: ignore[arg-type]
        snapshotter=str(snapshotter),
        snapshot_key=str(snapshot_key),
        created_at=int(created),  # type: ignore[call-overload]
        updated_at=int(updated),  # type: ignore[call-overload]
        extensions=extensions,
    )


def _read(tx: sqlite3.Connection, namespace: str, cid: str) -> Container | None:
    row = tx.execute(f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? AND id = ?", (namespace, cid)).fetchone()
    if row is None:
        return None
    labels = dict(
        tx.execute(
            "SELECT key, value FROM container_labels WHERE namespace = ? AND id = ? ORDER BY key", (namespace, cid)
        ).fetchall()
    )
    extensions = {
        name: _any_from(value) or any_pb2.Any()
        for name, value in tx.execute(
            "SELECT name, value FROM container_extensions WHERE namespace = ? AND id = ? ORDER BY name",
            (namespace, cid),
        )
    }
    return _from_row(row, labels, extensions)


def _has_bucket(tx: sqlite3.Connection, namespace: str) -> bool:
    row = tx.execute("SELECT 1 FROM container_buckets WHERE namespace = ?", (namespace,)).fetchone()
    return row is not None


def _write(tx: sqlite3.Connection, namespace: str, container: Container, insert: bool) -> None:
    """``writeContainer``: the record, extensions (merged), then labels (replaced, empty values dropped).

    ``container.labels`` loses its empty values here, as Go's ``writeMap``
    deletes them from the map it is given.
    """
    c = container
    values = (
        c.image, c.runtime_name, _any_bytes(c.runtime_options), _any_bytes(c.spec),
        c.snapshotter, c.snapshot_key, c.created_at, c.updated_at,
    )  # fmt: skip
    if insert:
        tx.execute(
            f"INSERT INTO containers(namespace, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, c.id, *values),
        )
    else:
        tx.execute(
            "UPDATE containers SET image = ?, runtime_name = ?, runtime_options = ?, spec = ?, snapshotter = ?,"
            " snapshot_key = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND id = ?",
            (*values, namespace, c.id),
        )
    for name, ext in c.extensions.items():
        if len(name.encode("utf-8", "surrogateescape")) > MAX_KEY_SIZE:
            raise CdtwistError(f"failed to write container {quote(c.id)}: key too large")
        tx.execute(
            "INSERT INTO container_extensions(namespace, id, name, value) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(namespace, id, name) DO UPDATE SET value = excluded.value",
            (namespace, c.id, name, _any_bytes(ext)),
        )
    tx.execute("DELETE FROM container_labels WHERE namespace = ? AND id = ?", (namespace, c.id))
    for key, value in list(c.labels.items()):
        if value == "":
            del c.labels[key]
            continue
        if key == "":
            problem = f"failed to set label {quote(key)}={quote(value)}: key required"
            raise CdtwistError(f"failed to write container {quote(c.id)}: {problem}")
        tx.execute(
            "INSERT INTO container_labels(namespace, id, key, value) VALUES (?, ?, ?, ?)",
            (namespace, c.id, key, value),
        )


def _adaptor(container: Container) -> filters.Adaptor:
    """``adaptContainer``: id, runtime.name, image, labels.* (nothing else filters)."""
    return filters.FieldsAdaptor(
        {
            "id": container.id,
            "runtime": filters.FieldsAdaptor({"name": container.runtime_name}),
            "image": container.image,
            "labels": container.labels,
        }
    )


def _copy(container: Container) -> Container:
    """The caller's container is never changed (its label map is cleaned as it is written)."""
    return replace(container, labels=dict(container.labels), extensions=dict(container.extensions))


# -- the store, call by call ----------------------------------------------------------------


def get(tx: sqlite3.Connection, namespace: str, id: str) -> Container:
    """The container, or NotFound ``container "<id>" in namespace "<ns>": not found``."""
    container = _read(tx, namespace, id)
    if container is None:
        raise NotFound(f"container {quote(id)} in namespace {quote(namespace)}")
    return container


def list_(tx: sqlite3.Connection, namespace: str, *filter_exprs: str) -> list[Container]:
    """Containers matching any of the filters, in id (bolt key) order."""
    try:
        flt = filters.parse_all(*filter_exprs)
    except InvalidArgument as e:
        # containerd wraps the already classified error once more.
        raise InvalidArgument(str(e)) from None
    rows = tx.execute(
        f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? ORDER BY CAST(id AS BLOB)", (namespace,)
    ).fetchall()
    labels: dict[str, dict[str, str]] = {}
    for cid, key, value in tx.execute(
        "SELECT id, key, value FROM container_labels WHERE namespace = ? ORDER BY key", (namespace,)
    ):
        labels.setdefault(cid, {})[key] = value
    extensions: dict[str, dict[str, any_pb2.Any]] = {}
    for cid, name, value in tx.execute(
        "SELECT id, name, value FROM container_extensions WHERE namespace = ? ORDER BY name", (namespace,)
    ):
        extensions.setdefault(cid, {})[name] = _any_from(value) or any_pb2.Any()
    out = []
    for row in rows:
        container = _from_row(row, labels.get(row[0], {}), extensions.get(row[0], {}))
        if flt.match(_adaptor(container)):
            out.append(container)
    return out


def create(tx: sqlite3.Connection, namespace: str, container: Container, now_ns: int | None = None) -> Container:
    """A new container, timestamped now; AlreadyExists if the id is taken in ``namespace``."""
    container = _copy(container)
    try:
        validate_container(container)
    except CdtwistError as e:
        raise _wrap(e, "create container failed validation") from None
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (namespace,))
    tx.execute("INSERT OR IGNORE INTO container_buckets(namespace) VALUES (?)", (namespace,))
    if tx.execute("SELECT 1 FROM containers WHERE namespace = ? AND id = ?", (namespace, container.id)).fetchone():
        raise AlreadyExists(f"container {quote(container.id)}")
    container.created_at = container.updated_at = time.time_ns() if now_ns is None else now_ns
    _write(tx, namespace, container, insert=True)
    return container


def update(tx: sqlite3.Connection, namespace: str, container: Container, *fieldpaths: str) -> Container:
    """Change the fields named, or (no paths) labels, spec, extensions, image and snapshot key.

    Paths are ``labels``, ``labels.<key>``, ``spec``, ``extensions``,
    ``extensions.<key>``, ``image`` and ``snapshotkey``; the runtime and the
    snapshotter cannot change (a full replace that differs there fails).
    created_at is kept, updated_at is now.
    """
    if container.id == "":
        raise InvalidArgument("must specify a container id")
    container = _copy(container)
    if not _has_bucket(tx, namespace):
        raise NotFound(f"cannot update container {quote(container.id)} in namespace {quote(namespace)}")
    updated = _read(tx, namespace, container.id)
    if updated is None:
        raise NotFound(f"container {quote(container.id)}")
    created = updated.created_at
    paths: Sequence[str] = fieldpaths
    if not paths:
        paths = FULL_REPLACE_PATHS
        if updated.snapshotter != container.snapshotter:
            raise InvalidArgument("container.Snapshotter field is immutable")
        if updated.runtime_name != container.runtime_name:
            raise InvalidArgument("container.Runtime.Name field is immutable")
    for path in paths:
        if path.startswith("labels."):
            key = path[len("labels.") :]
            updated.labels[key] = container.labels.get(key, "")
        elif path.startswith("extensions."):
            key = path[len("extensions.") :]
            ext = container.extensions.get(key)
            updated.extensions[key] = any_pb2.Any() if ext is None else ext
        elif path == "labels":
            updated.labels = container.labels
        elif path == "spec":
            updated.spec = container.spec
        elif path == "extensions":
            updated.extensions = container.extensions
        elif path == "image":
            updated.image = container.image
        elif path == "snapshotkey":
            updated.snapshot_key = container.snapshot_key
        else:
            raise InvalidArgument(f"cannot update {quote(path)} field on {quote(container.id)}")
    try:
        validate_container(updated)
    except CdtwistError as e:
        raise _wrap(e, "update failed validation") from None
    updated.created_at = created
    updated.updated_at = time.time_ns()
    _write(tx, namespace, updated, insert=False)
    return updated


def delete(tx: sqlite3.Connection, namespace: str, id: str, collector: Collector | None = None) -> None:
    """Remove the record; the snapshot and content it alone held become collectable."""
    if not _has_bucket(tx, namespace):
        raise NotFound(f"cannot delete container {quote(id)} in namespace {quote(namespace)}")
    if tx.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, id)).rowcount == 0:
        raise NotFound(f"container {id}")
    if collector is not None:
        collector.mark_dirty()


class ContainerStore:
    """The containers of one metadata database, a transaction per call."""

    def __init__(self, db: DB, collector: Collector | None = None) -> None:
        self.db = db
        self.collector = collector if collector is not None else collector_for(db)

    def get(self, namespace: str, id: str) -> Container:
        return self.db.view(lambda tx: get(tx, namespace, id))

    def list(self, namespace: str, *filter_exprs: str) -> list[Container]:
        return self.db.view(lambda tx: list_(tx, namespace, *filter_exprs))

    def create(self, namespace: str, container: Container) -> Container:
        return self.db.update(lambda tx: create(tx, namespace, container))

    def update(self, namespace: str, container: Container, *fieldpaths: str) -> Container:
        return self.db.update(lambda tx: update(tx, namespace, container, *fieldpaths))

    def delete(self, namespace: str, id: str) -> None:
        self.db.update(lambda tx: delete(tx, namespace, id, self.collector))


# -- the container part of the GC graph ------------------------------------------------------


def _roots(tx: sqlite3.Connection, now_ns: int, emit: gc.Emit) -> None:
    """Every container: its snapshot (when it names a snapshotter) and what its labels reference.

    The snapshot node is ``(SNAPSHOT, ns, "<snapshotter>/<key>")``, the
    convention of :mod:`cdtwist.metadata.snapshots`, which follows it from there.
    """
    for namespace, snapshotter, key in tx.execute(
        "SELECT namespace, snapshotter, snapshot_key FROM containers WHERE snapshotter != ''"
    ):
        emit(Node(gc.SNAPSHOT, namespace, f"{snapshotter}/{key}"))
    refs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for namespace, cid, key, value in tx.execute(
        "SELECT namespace, id, key, value FROM container_labels WHERE key >= ? AND key < ?",
        (gc.LABEL_REF_LOW, gc.LABEL_REF_HIGH),
    ):
        refs.setdefault((namespace, cid), []).append((key, value))
    for (namespace, _), labels in refs.items():
        gc.send_label_refs(namespace, labels, emit)


KIND = register_kind(ResourceKind("containers", roots=_roots))


__all__ = [
    "KIND",
    "Container",
    "ContainerStore",
    "create",
    "delete",
    "get",
    "list_",
    "update",
    "validate_container",
]
