# -*- test-case-name: tests.test_metadata -*-
"""Namespaces and their labels, with containerd's quirks kept on purpose.

``labels`` of a namespace that does not exist is an empty map, and setting
a label creates the namespace, exactly as containerd's bolt store behaves;
clients (``ctr ns label``) rely on that.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from cdtwist.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.grpc.context import validate_identifier

MAX_LABEL_SIZE = 4096

#: What may still live in a namespace, in containerd's order and words:
#: each entry returns the description when the namespace holds such objects.
#: Later schema users (images, content, containers, snapshots) add theirs.
ObjectCheck = Callable[[sqlite3.Connection, str], list[str]]
OBJECT_CHECKS: list[ObjectCheck] = []


def validate_label(key: str, value: str) -> None:
    if len(key) + len(value) > MAX_LABEL_SIZE:
        raise InvalidArgument(
            f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {key[:10]}"
        )


def create(tx: sqlite3.Connection, name: str, labels: dict[str, str]) -> None:
    validate_identifier(name)
    for k, v in labels.items():
        try:
            validate_label(k, v)
        except InvalidArgument as e:
            raise InvalidArgument(f"namespace.Labels: {e.context}") from None
    try:
        tx.execute("INSERT INTO namespaces(name) VALUES (?)", (name,))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f'namespace "{name}"') from None
    for k, v in labels.items():
        set_label(tx, name, k, v)


def labels(tx: sqlite3.Connection, name: str) -> dict[str, str]:
    rows = tx.execute("SELECT key, value FROM namespace_labels WHERE namespace = ? ORDER BY key", (name,))
    return dict(rows.fetchall())


def set_label(tx: sqlite3.Connection, name: str, key: str, value: str) -> None:
    try:
        validate_label(key, value)
    except InvalidArgument as e:
        raise InvalidArgument(f"namespace.Labels: {e.context}") from None
    tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (name,))
    if value == "":
        tx.execute("DELETE FROM namespace_labels WHERE namespace = ? AND key = ?", (name, key))
    else:
        tx.execute(
            "INSERT INTO namespace_labels(namespace, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value",
            (name, key, value),
        )


def list_names(tx: sqlite3.Connection) -> list[str]:
    # bolt iterates keys in byte order.
    return [r[0] for r in tx.execute("SELECT name FROM namespaces ORDER BY CAST(name AS BLOB)")]


def exists(tx: sqlite3.Connection, name: str) -> bool:
    return tx.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is not None


def delete(tx: sqlite3.Connection, name: str) -> None:
    remaining: list[str] = []
    for check in OBJECT_CHECKS:
        remaining.extend(check(tx, name))
    if remaining:
        raise FailedPrecondition(
            f'namespace "{name}" must be empty, but it still has {", ".join(remaining)}'
        )
    if tx.execute("DELETE FROM namespaces WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f'namespace "{name}"')


def _has_images(tx: sqlite3.Connection, name: str) -> list[str]:
    row = tx.execute("SELECT 1 FROM images WHERE namespace = ? LIMIT 1", (name,)).fetchone()
    return ["images"] if row is not None else []


def _has_blobs(tx: sqlite3.Connection, name: str) -> list[str]:
    row = tx.execute("SELECT 1 FROM content_blobs WHERE namespace = ? LIMIT 1", (name,)).fetchone()
    return ["blobs"] if row is not None else []


# containerd lists images first, then blobs (``listNs``).
OBJECT_CHECKS.extend([_has_images, _has_blobs])


def _has_containers(tx: sqlite3.Connection, name: str) -> list[str]:
    row = tx.execute("SELECT 1 FROM containers WHERE namespace = ? LIMIT 1", (name,)).fetchone()
    return ["containers"] if row is not None else []


# Then containers, before the snapshots of each snapshotter.
OBJECT_CHECKS.append(_has_containers)


def _has_snapshots(tx: sqlite3.Connection, name: str) -> list[str]:
    rows = tx.execute("SELECT DISTINCT snapshotter FROM snapshots WHERE namespace = ? ORDER BY snapshotter", (name,))
    return [f'snapshots on "{r[0]}" snapshotter' for r in rows]


# After images, blobs and containers: one entry per snapshotter holding snapshots, in key order.
OBJECT_CHECKS.append(_has_snapshots)
