# -*- test-case-name: tests.test_images -*-
"""Images in the metadata database (containerd's ``metadata/images.go``).

An image is a name in a namespace pointing at a target descriptor (digest,
media type, size, annotations), with labels and two timestamps.  Its
validation, field masks, filters and error texts are containerd's, so the
same requests fail the same way.  Every image is a garbage collection root:
it holds its target blob and whatever its ``containerd.io/gc.ref.*`` labels
name, and through the blobs' own labels the rest of the image.

The module functions take an open transaction; :class:`ImageStore` runs
them in one.  Everything blocks: call from pool threads.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cdtwist import filters
from cdtwist.errors import AlreadyExists, CdtwistError, InvalidArgument, NotFound
from cdtwist.filters import quote
from cdtwist.gc import Node
from cdtwist.log import get_logger
from cdtwist.metadata import gc
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector, ResourceKind, collector_for, register_kind

log = get_logger(__name__)

MAX_LABEL_SIZE = 4096
#: bolt's ``MaxKeySize``: a longer annotation key fails when written.
MAX_KEY_SIZE = 32768

# go-digest's Validate, with every algorithm containerd links in: an image
# target only names a digest, it need not be a blob this store can hold.
_ALGORITHMS = {"sha256": 32, "sha384": 48, "sha512": 64}
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX_RE = re.compile(r"[a-f0-9]+")


@dataclass
class Descriptor:
    """The parts of an OCI descriptor containerd stores for a target."""

    media_type: str = ""
    digest: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Image:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    target: Descriptor = field(default_factory=Descriptor)
    #: nanoseconds since the epoch
    created_at: int = 0
    updated_at: int = 0


# -- validation -------------------------------------------------------------------


def validate_digest(digest: str) -> None:
    """go-digest's ``Digest.Validate``; ValueError with its text."""
    i = digest.find(":")
    if i <= 0 or i + 1 == len(digest):
        raise ValueError("invalid checksum digest format")
    algorithm, encoded = digest[:i], digest[i + 1 :]
    size = _ALGORITHMS.get(algorithm)
    if size is None:
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError("invalid checksum digest format")
        raise ValueError("unsupported digest algorithm")
    if len(encoded) != size * 2:
        raise ValueError("invalid checksum digest length")
    if not _HEX_RE.fullmatch(encoded):
        raise ValueError("invalid checksum digest format")


def _validate_label(key: str, value: str) -> None:
    """``labels.Validate``: lengths in bytes, the key cut to 10 bytes in the message."""
    kb = key.encode("utf-8", "surrogateescape")
    if len(kb) + len(value.encode("utf-8", "surrogateescape")) > MAX_LABEL_SIZE:
        short = kb[:10].decode("utf-8", "surrogateescape")
        raise InvalidArgument(
            f"image.Labels: label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {short}"
        )


def validate_image(image: Image) -> None:
    """``validateImage``: name, labels, then only the target fields containerd stores."""
    if image.name == "":
        raise InvalidArgument("image name must not be empty")
    for key, value in image.labels.items():
        _validate_label(key, value)
    target = image.target
    try:
        validate_digest(target.digest)
    except ValueError as e:
        raise InvalidArgument(f"Target.Digest {quote(target.digest)} invalid: {e}") from None
    if target.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if target.media_type == "":
        raise InvalidArgument("Target.MediaType must be set")


# -- rows -------------------------------------------------------------------------------


def _map(tx: sqlite3.Connection, table: str, namespace: str, name: str) -> dict[str, str]:
    rows = tx.execute(
        f"SELECT key, value FROM {table} WHERE namespace = ? AND name = ? ORDER BY key",
        (namespace, name),
    )
    return dict(rows.fetchall())


def _write_map(
    tx: sqlite3.Connection, table: str, namespace: str, name: str, values: dict[str, str], what: str
) -> dict[str, str]:
    """Replace a map (bolt's ``writeMap``): empty values are dropped; returns what was kept."""
    tx.execute(f"DELETE FROM {table} WHERE namespace = ? AND name = ?", (namespace, name))
    kept: dict[str, str] = {}
    for key, value in values.items():
        if value == "":
            continue
        problem = None
        if key == "":
            problem = "key required"
        elif len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_SIZE:
            problem = "key too large"
        if problem is not None:
            raise CdtwistError(
                f"writing {what} for image {name}: failed to set label {quote(key)}={quote(value)}: {problem}"
            )
        tx.execute(
            f"INSERT INTO {table}(namespace, name, key, value) VALUES (?, ?, ?, ?)",
            (namespace, name, key, value),
        )
        kept[key] = value
    return kept


def _read(tx: sqlite3.Connection, namespace: str, name: str) -> Image | None:
    row = tx.execute(
        "SELECT target_media_type, target_digest, target_size, created_at, updated_at FROM images "
        "WHERE namespace = ? AND name = ?",
        (namespace, name),
    ).fetchone()
    if row is None:
        return None
    media_type, digest, size, created, updated = row
    target = Descriptor(media_type, digest, size, _map(tx, "image_annotations", namespace, name))
    return Image(name, _map(tx, "image_labels", namespace, name), target, created, updated)


def _write(tx: sqlite3.Connection, namespace: str, image: Image, insert: bool) -> None:
    """``writeImage``: the record, then labels, then annotations (the maps lose empty values)."""
    t = image.target
    if insert:
        tx.execute(
            "INSERT INTO images(namespace, name, target_media_type, target_digest, target_size, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, image.name, t.media_type, t.digest, t.size, image.created_at, image.updated_at),
        )
    else:
        tx.execute(
            "UPDATE images SET target_media_type = ?, target_digest = ?, target_size = ?, created_at = ?,"
            " updated_at = ? WHERE namespace = ? AND name = ?",
            (t.media_type, t.digest, t.size, image.created_at, image.updated_at, namespace, image.name),
        )
    image.labels = _write_map(tx, "image_labels", namespace, image.name, image.labels, "labels")
    t.annotations = _write_map(tx, "image_annotations", namespace, image.name, t.annotations, "Annotations")


def _adaptor(image: Image) -> filters.Adaptor:
    """``adaptImage``: name, target.digest, target.mediatype, labels.*, annotations.*."""

    def target(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "digest":
            return image.target.digest, bool(image.target.digest)
        if fieldpath[0] == "mediatype":
            return image.target.media_type, bool(image.target.media_type)
        return "", False

    return filters.FieldsAdaptor(
        {
            "name": image.name,
            "target": filters.AdaptorFunc(target),
            "labels": image.labels,
            "annotations": image.target.annotations,
        }
    )


# -- the store, call by call ----------------------------------------------------------


def get(tx: sqlite3.Connection, namespace: str, name: str) -> Image:
    image = _read(tx, namespace, name)
    if image is None:
        raise NotFound(f"image {quote(name)}")
    return image


def list_images(tx: sqlite3.Connection, namespace: str, *filter_exprs: str) -> list[Image]:
    """Images matching any of the filters, in name (bolt key) order."""
    try:
        flt = filters.parse_all(*filter_exprs)
    except InvalidArgument as e:
        # containerd wraps the already classified error once more.
        raise InvalidArgument(str(e)) from None
    rows = tx.execute(
        "SELECT name, target_media_type, target_digest, target_size, created_at, updated_at FROM images "
        "WHERE namespace = ? ORDER BY CAST(name AS BLOB)",
        (namespace,),
    ).fetchall()
    maps: dict[str, dict[str, dict[str, str]]] = {"image_labels": {}, "image_annotations": {}}
    for table, by_name in maps.items():
        for name, key, value in tx.execute(f"SELECT name, key, value FROM {table} WHERE namespace = ?", (namespace,)):
            by_name.setdefault(name, {})[key] = value
    out = []
    for name, media_type, digest, size, created, updated in rows:
        labels = dict(sorted(maps["image_labels"].get(name, {}).items()))
        annotations = dict(sorted(maps["image_annotations"].get(name, {}).items()))
        image = Image(name, labels, Descriptor(media_type, digest, size, annotations), created, updated)
        if flt.match(_adaptor(image)):
            out.append(image)
    return out


def create(tx: sqlite3.Connection, namespace: str, image: Image, now_ns: int | None = None) -> Image:
    """A new image, timestamped now; AlreadyExists if the name is taken."""
    image = _copy(image)
    validate_image(image)
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (namespace,))
    if tx.execute("SELECT 1 FROM images WHERE namespace = ? AND name = ?", (namespace, image.name)).fetchone():
        raise AlreadyExists(f"image {quote(image.name)}")
    image.created_at = image.updated_at = time.time_ns() if now_ns is None else now_ns
    _write(tx, namespace, image, insert=True)
    return image


def update(tx: sqlite3.Connection, namespace: str, image: Image, *fieldpaths: str) -> Image:
    """Change the fields named (``labels[.<key>]``, ``annotations[.<key>]``, ``target``), or all of them.

    The target is replaced as a whole; created_at is kept, updated_at is now.
    """
    if image.name == "":
        raise InvalidArgument("image name is required for update")
    image = _copy(image)
    updated = _read(tx, namespace, image.name)
    if updated is None:
        raise NotFound(f"image {quote(image.name)}")
    created = updated.created_at
    if fieldpaths:
        for path in fieldpaths:
            if path.startswith("labels."):
                key = path[len("labels.") :]
                updated.labels[key] = image.labels.get(key, "")
            elif path.startswith("annotations."):
                key = path[len("annotations.") :]
                updated.target.annotations[key] = image.target.annotations.get(key, "")
            elif path == "labels":
                updated.labels = image.labels
            elif path == "target":
                updated.target = image.target
            elif path == "annotations":
                updated.target.annotations = image.target.annotations
            else:
                raise InvalidArgument(f"cannot update {quote(path)} field on image {quote(image.name)}")
    else:
        updated = image
    validate_image(updated)
    updated.created_at = created
    updated.updated_at = time.time_ns()
    _write(tx, namespace, updated, insert=False)
    return updated


def delete(tx: sqlite3.Connection, namespace: str, name: str, collector: Collector | None = None) -> None:
    """Remove the image; what only it held becomes collectable."""
    cur = tx.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
    if cur.rowcount == 0:
        raise NotFound(f"image {quote(name)}")
    if collector is not None:
        collector.mark_dirty()


def _copy(image: Image) -> Image:
    """The caller's image is never changed (the maps are written as they are cleaned)."""
    target = replace(image.target, annotations=dict(image.target.annotations))
    return replace(image, labels=dict(image.labels), target=target)


class ImageStore:
    """The images of one metadata database, a transaction per call."""

    def __init__(self, db: DB, collector: Collector | None = None) -> None:
        self.db = db
        self.collector = collector if collector is not None else collector_for(db)

    def get(self, namespace: str, name: str) -> Image:
        return self.db.view(lambda tx: get(tx, namespace, name))

    def list(self, namespace: str, *filter_exprs: str) -> list[Image]:
        return self.db.view(lambda tx: list_images(tx, namespace, *filter_exprs))

    def create(self, namespace: str, image: Image) -> Image:
        return self.db.update(lambda tx: create(tx, namespace, image))

    def update(self, namespace: str, image: Image, *fieldpaths: str) -> Image:
        return self.db.update(lambda tx: update(tx, namespace, image, *fieldpaths))

    def delete(self, namespace: str, name: str) -> None:
        self.db.update(lambda tx: delete(tx, namespace, name, self.collector))


# -- the image part of the GC graph ------------------------------------------------------


def _roots(tx: sqlite3.Connection, now_ns: int, emit: gc.Emit) -> None:
    """Every image: its target blob and what its labels reference (no expiry for images in 1.6)."""
    for namespace, digest in tx.execute("SELECT namespace, target_digest FROM images"):
        emit(Node(gc.CONTENT, namespace, digest))
    refs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for namespace, name, key, value in tx.execute(
        "SELECT namespace, name, key, value FROM image_labels WHERE key >= ? AND key < ?",
        (gc.LABEL_REF_LOW, gc.LABEL_REF_HIGH),
    ):
        refs.setdefault((namespace, name), []).append((key, value))
    for (namespace, _), labels in refs.items():
        gc.send_label_refs(namespace, labels, emit)


KIND = register_kind(ResourceKind("images", roots=_roots))


__all__ = ["Descriptor", "Image", "ImageStore", "KIND", "create", "delete", "get", "list_images", "update"]
