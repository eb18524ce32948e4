"""Garbage collection: tricolor marking and the metadata reference graph.

``GraphTests`` ports containerd's ``metadata/gc_test.go`` (TestGCRoots,
TestGCRemove, TestGCRefs).  Images, containers and snapshots arrive with
later issues, so the tests define them as small test-local kinds registered
the way those issues will: the port checks the graph and the registration
design at once.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.content.local import LocalStore, format_timestamp
from cdtwist.gc import RESOURCE_MAX, Node, sweep, tricolor
from cdtwist.metadata import content as mcontent
from cdtwist.metadata import gc as mgc
from cdtwist.metadata import leases as mleases
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import (
    CONTENT,
    CONTENT_FLAT,
    INGEST,
    LABEL_GC_CONTENT_REF,
    LABEL_GC_EXPIRE,
    LABEL_GC_FLAT,
    LABEL_GC_ROOT,
    LABEL_GC_SNAP_REF,
    LEASE,
    SNAPSHOT,
    SNAPSHOT_FLAT,
    Collector,
    ResourceKind,
)


def dgst(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def rfc3339(offset_seconds: float) -> str:
    return format_timestamp(int((time.time() + offset_seconds) * 1e9) // 1_000_000_000 * 1_000_000_000)


class TricolorTests(SynchronousTestCase):
    def test_reachable_from_roots(self) -> None:
        a, b, c, d = (Node(1, "ns", k) for k in "abcd")
        graph = {a: [b], b: [c, a], c: [], d: [a]}
        self.assertEqual(tricolor([a], lambda n: graph[n]), {a, b, c})
        self.assertEqual(tricolor([], lambda n: graph[n]), set())

    def test_flat_bits_stripped_but_looked_up(self) -> None:
        flat = Node(1 | 0x20, "ns", "x")
        looked: list[Node] = []

        def refs(node: Node) -> list[Node]:
            looked.append(node)
            return []

        self.assertEqual(tricolor([flat], refs), {Node(1, "ns", "x")})
        self.assertEqual(looked, [flat])
        self.assertEqual(RESOURCE_MAX, 0x1F)

    def test_sweep_removes_unreachable(self) -> None:
        nodes = [Node(1, "ns", str(i)) for i in range(4)]
        removed: list[Node] = []
        sweep({nodes[1], nodes[3]}, nodes, removed.append)
        self.assertEqual(removed, [nodes[0], nodes[2]])


# -- test-local kinds standing in for images, containers and snapshots ---------------

TEST_SCHEMA = """
CREATE TABLE t_images (namespace TEXT, name TEXT, target TEXT);
CREATE TABLE t_image_labels (namespace TEXT, name TEXT, key TEXT, value TEXT);
CREATE TABLE t_containers (namespace TEXT, id TEXT, snapshotter TEXT, snapshot_key TEXT);
CREATE TABLE t_container_labels (namespace TEXT, id TEXT, key TEXT, value TEXT);
CREATE TABLE t_snapshots (namespace TEXT, snapshotter TEXT, name TEXT, parent TEXT);
CREATE TABLE t_snapshot_labels (namespace TEXT, snapshotter TEXT, name TEXT, key TEXT, value TEXT)
"""


def _labels(tx: sqlite3.Connection, table: str, where: str, args: tuple[str, ...]) -> list[tuple[str, str]]:
    return tx.execute(f"SELECT key, value FROM {table} WHERE {where}", args).fetchall()


def _image_roots(tx: sqlite3.Connection, now: int, emit: mgc.Emit) -> None:
    for ns, name, target in tx.execute("SELECT namespace, name, target FROM t_images").fetchall():
        if target:
            emit(Node(CONTENT, ns, target))
        mgc.send_label_refs(ns, _labels(tx, "t_image_labels", "namespace = ? AND name = ?", (ns, name)), emit)


def _container_roots(tx: sqlite3.Connection, now: int, emit: mgc.Emit) -> None:
    for ns, cid, ss, key in tx.execute("SELECT * FROM t_containers").fetchall():
        if ss:
            emit(Node(SNAPSHOT, ns, f"{ss}/{key}"))
        mgc.send_label_refs(ns, _labels(tx, "t_container_labels", "namespace = ? AND id = ?", (ns, cid)), emit)


def _snapshot_roots(tx: sqlite3.Connection, now: int, emit: mgc.Emit) -> None:
    for ns, ss, name in tx.execute(
        "SELECT namespace, snapshotter, name FROM t_snapshot_labels WHERE key = ?", (LABEL_GC_ROOT,)
    ).fetchall():
        emit(Node(SNAPSHOT, ns, f"{ss}/{name}"))


def _snapshot_refs(tx: sqlite3.Connection, node: Node, emit: mgc.Emit) -> None:
    ss, name = node.key.split("/", 1)
    row = tx.execute(
        "SELECT parent FROM t_snapshots WHERE namespace = ? AND snapshotter = ? AND name = ?",
        (node.namespace, ss, name),
    ).fetchone()
    if row is None:
        return
    if row[0]:
        emit(Node(node.type, node.namespace, f"{ss}/{row[0]}"))
    if node.type == SNAPSHOT_FLAT:
        return
    labels = _labels(
        tx, "t_snapshot_labels", "namespace = ? AND snapshotter = ? AND name = ?", (node.namespace, ss, name)
    )
    mgc.send_label_refs(node.namespace, labels, emit)


def _snapshot_all(tx: sqlite3.Connection, emit: mgc.Emit) -> None:
    for ns, ss, name in tx.execute("SELECT namespace, snapshotter, name FROM t_snapshots").fetchall():
        emit(Node(SNAPSHOT, ns, f"{ss}/{name}"))


def _snapshot_remove(tx: sqlite3.Connection, node: Node) -> None:
    ss, name = node.key.split("/", 1)
    tx.execute(
        "DELETE FROM t_snapshots WHERE namespace = ? AND snapshotter = ? AND name = ?", (node.namespace, ss, name)
    )


TEST_KINDS = [
    ResourceKind("images", roots=_image_roots),
    ResourceKind("containers", roots=_container_roots),
    ResourceKind(
        "snapshots",
        roots=_snapshot_roots,
        scan_all=_snapshot_all,
        references={SNAPSHOT: _snapshot_refs, SNAPSHOT_FLAT: _snapshot_refs},
        remove={SNAPSHOT: _snapshot_remove},
    ),
]


class Fixture:
    """The Go test's alter functions, on the real schema plus the test-local tables."""

    def __init__(self, tx: sqlite3.Connection) -> None:
        self.tx = tx

    def ns(self, ns: str) -> None:
        self.tx.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?)", (ns,))

    def image(self, ns: str, name: str, target: str, labels: dict[str, str] | None = None) -> None:
        self.tx.execute("INSERT INTO t_images VALUES (?, ?, ?)", (ns, name, target))
        for k, v in (labels or {}).items():
            self.tx.execute("INSERT INTO t_image_labels VALUES (?, ?, ?, ?)", (ns, name, k, v))

    def container(self, ns: str, cid: str, ss: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.tx.execute("INSERT INTO t_containers VALUES (?, ?, ?, ?)", (ns, cid, ss, key))
        for k, v in (labels or {}).items():
            self.tx.execute("INSERT INTO t_container_labels VALUES (?, ?, ?, ?)", (ns, cid, k, v))

    def snapshot(self, ns: str, ss: str, name: str, parent: str, labels: dict[str, str] | None = None) -> None:
        self.tx.execute("INSERT INTO t_snapshots VALUES (?, ?, ?, ?)", (ns, ss, name, parent))
        for k, v in (labels or {}).items():
            self.tx.execute("INSERT INTO t_snapshot_labels VALUES (?, ?, ?, ?, ?)", (ns, ss, name, k, v))

    def content(self, ns: str, digest: str, labels: dict[str, str] | None = None) -> None:
        self.ns(ns)
        self.tx.execute(
            "INSERT INTO content_blobs(namespace, digest, size, created_at, updated_at) VALUES (?, ?, 0, 0, 0)",
            (ns, digest),
        )
        for k, v in (labels or {}).items():
            self.tx.execute("INSERT INTO content_blob_labels VALUES (?, ?, ?, ?)", (ns, digest, k, v))

    def ingest(self, ns: str, ref: str, expected: str = "", expires_in: float | None = None) -> None:
        self.ns(ns)
        expire = None if expires_in is None else int((time.time() + expires_in) * 1e9)
        self.tx.execute(
            "INSERT INTO content_ingests(namespace, ref, bref, expected, expire_at) VALUES (?, ?, ?, ?, ?)",
            (ns, ref, mcontent.backend_ref(ns, ref), expected, expire),
        )

    def lease(self, ns: str, lid: str, labels: dict[str, str] | None = None) -> None:
        self.ns(ns)
        self.tx.execute("INSERT OR IGNORE INTO leases(namespace, id, created_at) VALUES (?, ?, 0)", (ns, lid))
        for k, v in (labels or {}).items():
            self.tx.execute("INSERT INTO lease_labels VALUES (?, ?, ?, ?)", (ns, lid, k, v))

    def lease_resource(self, ns: str, lid: str, typ: str, key: str) -> None:
        self.lease(ns, lid)
        self.tx.execute("INSERT INTO lease_resources VALUES (?, ?, ?, ?)", (ns, lid, typ, key))

    def lease_content(self, ns: str, lid: str, digest: str) -> None:
        self.lease_resource(ns, lid, "content", digest)

    def lease_snapshot(self, ns: str, lid: str, ss: str, key: str) -> None:
        self.lease_resource(ns, lid, f"snapshots/{ss}", key)

    def lease_ingest(self, ns: str, lid: str, ref: str) -> None:
        self.lease_resource(ns, lid, "ingests", ref)


class _DBCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()

        def schema(tx: sqlite3.Connection) -> None:
            for statement in TEST_SCHEMA.split(";"):
                tx.execute(statement)

        self.db.update(schema)
        self.collector = Collector(self.db, kinds=[mleases.KIND, mcontent.KIND, *TEST_KINDS])

    def alter(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.db.update(lambda tx: fn(Fixture(tx)))


class GraphTests(_DBCase):
    def test_roots(self) -> None:
        """TestGCRoots."""

        def alters(f: Fixture) -> None:
            f.image("ns1", "image1", dgst(1))
            f.image("ns1", "image2", dgst(2), {LABEL_GC_SNAP_REF + "overlay": "sn2"})
            f.image("ns2", "image3", dgst(10), {LABEL_GC_CONTENT_REF: dgst(11)})
            f.container("ns1", "container1", "overlay", "sn4")
            f.container("ns1", "container2", "overlay", "sn5", {LABEL_GC_SNAP_REF + "overlay": "sn6"})
            f.container(
                "ns1",
                "container3",
                "overlay",
                "sn7",
                {
                    LABEL_GC_SNAP_REF + "overlay/anything-1": "sn8",
                    LABEL_GC_SNAP_REF + "overlay/anything-2": "sn9",
                    LABEL_GC_CONTENT_REF: dgst(7),
                },
            )
            f.container(
                "ns1",
                "container4",
                "",
                "",
                {LABEL_GC_CONTENT_REF + ".0": dgst(8), LABEL_GC_CONTENT_REF + ".1": dgst(9)},
            )
            f.content("ns1", dgst(1))
            f.content("ns1", dgst(2))
            f.content("ns1", dgst(3))
            f.content("ns2", dgst(1))
            f.content("ns2", dgst(2), {LABEL_GC_ROOT: "always"})
            f.content("ns2", dgst(8))
            f.content("ns2", dgst(9))
            f.ingest("ns1", "ingest-1")  # no expiry: leased, or seen as expired
            f.ingest("ns1", "ingest-2", expires_in=0)  # expired
            f.ingest("ns1", "ingest-3", expires_in=3600)
            f.ingest("ns2", "ingest-4")
            f.ingest("ns2", "ingest-5", dgst(8))
            f.ingest("ns2", "ingest-6")  # added to expired lease
            f.ingest("ns2", "ingest-7", dgst(9))  # added to expired lease
            for name in ("sn1", "sn2", "sn4", "sn5", "sn6", "sn7", "sn8", "sn9"):
                f.snapshot("ns1", "overlay", name, "")
            f.snapshot("ns1", "overlay", "sn3", "", {LABEL_GC_ROOT: "always"})
            f.lease_snapshot("ns2", "l1", "overlay", "sn5")
            f.lease_snapshot("ns2", "l2", "overlay", "sn6")
            f.lease_content("ns2", "l1", dgst(4))
            f.lease_content("ns2", "l2", dgst(5))
            f.lease("ns2", "l3", {LABEL_GC_EXPIRE: rfc3339(3600)})
            f.lease_content("ns2", "l3", dgst(6))
            f.lease_snapshot("ns2", "l3", "overlay", "sn7")
            f.lease_ingest("ns2", "l3", "ingest-4")
            f.lease_ingest("ns2", "l3", "ingest-5")
            f.lease("ns2", "l4", {LABEL_GC_EXPIRE: rfc3339(-1)})
            f.lease_content("ns2", "l4", dgst(7))
            f.lease_snapshot("ns2", "l4", "overlay", "sn8")
            f.lease_ingest("ns2", "l4", "ingest-6")
            f.lease_ingest("ns2", "l4", "ingest-7")
            f.lease("ns3", "l1", {LABEL_GC_FLAT: rfc3339(3600)})
            f.lease_content("ns3", "l1", dgst(1))
            f.lease_snapshot("ns3", "l1", "overlay", "sn1")
            f.lease_ingest("ns3", "l1", "ingest-1")

        self.alter(alters)
        expected = {
            Node(CONTENT, "ns1", dgst(1)),
            Node(CONTENT, "ns1", dgst(2)),
            Node(CONTENT, "ns1", dgst(7)),
            Node(CONTENT, "ns1", dgst(8)),
            Node(CONTENT, "ns1", dgst(9)),
            Node(CONTENT, "ns2", dgst(2)),
            Node(CONTENT, "ns2", dgst(4)),
            Node(CONTENT, "ns2", dgst(5)),
            Node(CONTENT, "ns2", dgst(6)),
            Node(CONTENT, "ns2", dgst(10)),
            Node(CONTENT, "ns2", dgst(11)),
            Node(SNAPSHOT, "ns1", "overlay/sn2"),
            Node(SNAPSHOT, "ns1", "overlay/sn3"),
            Node(SNAPSHOT, "ns1", "overlay/sn4"),
            Node(SNAPSHOT, "ns1", "overlay/sn5"),
            Node(SNAPSHOT, "ns1", "overlay/sn6"),
            Node(SNAPSHOT, "ns1", "overlay/sn7"),
            Node(SNAPSHOT, "ns1", "overlay/sn8"),
            Node(SNAPSHOT, "ns1", "overlay/sn9"),
            Node(SNAPSHOT, "ns2", "overlay/sn5"),
            Node(SNAPSHOT, "ns2", "overlay/sn6"),
            Node(SNAPSHOT, "ns2", "overlay/sn7"),
            Node(LEASE, "ns2", "l1"),
            Node(LEASE, "ns2", "l2"),
            Node(LEASE, "ns2", "l3"),
            Node(INGEST, "ns1", "ingest-3"),
            Node(INGEST, "ns2", "ingest-4"),
            Node(INGEST, "ns2", "ingest-5"),
            Node(LEASE, "ns3", "l1"),
            Node(INGEST, "ns3", "ingest-1"),
            Node(CONTENT_FLAT, "ns3", dgst(1)),
            Node(SNAPSHOT_FLAT, "ns3", "overlay/sn1"),
        }
        roots = self.db.view(self.collector.roots)
        self.assertEqual(len(roots), len(set(roots)))
        self.assertEqual(set(roots), expected)

    def test_remove(self) -> None:
        """TestGCRemove: scan_all sees every record, remove deletes exactly the node."""

        def alters(f: Fixture) -> None:
            f.image("ns1", "image1", dgst(1))
            f.image("ns1", "image2", dgst(2), {LABEL_GC_SNAP_REF + "overlay": "sn2"})
            f.container("ns1", "container1", "overlay", "sn4")
            f.content("ns1", dgst(1))
            f.content("ns1", dgst(2))
            f.content("ns1", dgst(3))
            f.content("ns2", dgst(1))
            f.content("ns2", dgst(2), {LABEL_GC_ROOT: "always"})
            f.ingest("ns1", "ingest-1")
            f.ingest("ns2", "ingest-2", expires_in=0)
            f.snapshot("ns1", "overlay", "sn1", "")
            f.snapshot("ns1", "overlay", "sn2", "")
            f.snapshot("ns1", "overlay", "sn3", "", {LABEL_GC_ROOT: "always"})
            f.snapshot("ns1", "overlay", "sn4", "")
            f.snapshot("ns2", "overlay", "sn1", "")
            f.lease("ns1", "l1", {LABEL_GC_EXPIRE: rfc3339(3600)})
            f.lease("ns2", "l2", {LABEL_GC_EXPIRE: rfc3339(0)})

        self.alter(alters)
        everything = [
            Node(CONTENT, "ns1", dgst(1)),
            Node(CONTENT, "ns1", dgst(2)),
            Node(CONTENT, "ns1", dgst(3)),
            Node(CONTENT, "ns2", dgst(1)),
            Node(CONTENT, "ns2", dgst(2)),
            Node(SNAPSHOT, "ns1", "overlay/sn1"),
            Node(SNAPSHOT, "ns1", "overlay/sn2"),
            Node(SNAPSHOT, "ns1", "overlay/sn3"),
            Node(SNAPSHOT, "ns1", "overlay/sn4"),
            Node(SNAPSHOT, "ns2", "overlay/sn1"),
            Node(LEASE, "ns1", "l1"),
            Node(LEASE, "ns2", "l2"),
            Node(INGEST, "ns1", "ingest-1"),
            Node(INGEST, "ns2", "ingest-2"),
        ]
        deleted, remaining = everything[::2], everything[1::2]
        scanned = self.db.view(self.collector.scan_all)
        self.assertEqual(len(scanned), len(set(scanned)))
        self.assertEqual(set(scanned), set(everything))

        def remove(tx: sqlite3.Connection) -> None:
            for node in deleted:
                self.collector.remove(tx, node)

        self.db.update(remove)
        self.assertEqual(set(self.db.view(self.collector.scan_all)), set(remaining))

    def test_refs(self) -> None:
        """TestGCRefs."""

        def alters(f: Fixture) -> None:
            f.content("ns1", dgst(1))
            f.content("ns1", dgst(2))
            f.content("ns1", dgst(3))
            f.content("ns1", dgst(4), {LABEL_GC_CONTENT_REF: dgst(1)})
            f.content(
                "ns1",
                dgst(5),
                {LABEL_GC_CONTENT_REF + ".anything-1": dgst(2), LABEL_GC_CONTENT_REF + ".anything-2": dgst(3)},
            )
            f.content("ns1", dgst(6), {LABEL_GC_CONTENT_REF + "bad": dgst(1)})
            f.content(
                "ns1",
                dgst(7),
                {LABEL_GC_CONTENT_REF + "/anything-1": dgst(2), LABEL_GC_CONTENT_REF + "/anything-2": dgst(3)},
            )
            f.content("ns2", dgst(1))
            f.content("ns2", dgst(2))
            f.ingest("ns1", "ingest-1")
            f.ingest("ns2", "ingest-2", dgst(8))
            f.snapshot("ns1", "overlay", "sn1", "")
            f.snapshot("ns1", "overlay", "sn2", "sn1")
            f.snapshot("ns1", "overlay", "sn3", "sn2")
            f.snapshot(
                "ns1", "overlay", "sn4", "", {LABEL_GC_SNAP_REF + "btrfs": "sn1", LABEL_GC_SNAP_REF + "overlay": "sn1"}
            )
            f.snapshot(
                "ns1",
                "overlay",
                "sn5",
                "",
                {LABEL_GC_SNAP_REF + "overlay/anything-1": "sn1", LABEL_GC_SNAP_REF + "overlay/anything-2": "sn2"},
            )
            f.snapshot("ns1", "btrfs", "sn1", "")
            f.snapshot("ns2", "overlay", "sn1", "")
            f.snapshot("ns2", "overlay", "sn2", "sn1")
            f.snapshot(
                "ns2", "overlay", "sn3", "", {LABEL_GC_CONTENT_REF: dgst(1), LABEL_GC_CONTENT_REF + ".keep-me": dgst(6)}
            )
            # flat references don't follow label references
            f.content("ns3", dgst(1))
            f.content("ns3", dgst(2), {LABEL_GC_CONTENT_REF + ".0": dgst(1)})
            f.snapshot("ns3", "overlay", "sn1", "")
            f.snapshot("ns3", "overlay", "sn2", "sn1")
            f.snapshot(
                "ns3", "overlay", "sn3", "", {LABEL_GC_SNAP_REF + "btrfs": "sn1", LABEL_GC_SNAP_REF + "overlay": "sn1"}
            )

        self.alter(alters)
        refs = {
            Node(CONTENT, "ns1", dgst(1)): [],
            Node(CONTENT, "ns1", dgst(2)): [],
            Node(CONTENT, "ns1", dgst(3)): [],
            Node(CONTENT, "ns1", dgst(4)): [Node(CONTENT, "ns1", dgst(1))],
            Node(CONTENT, "ns1", dgst(5)): [Node(CONTENT, "ns1", dgst(2)), Node(CONTENT, "ns1", dgst(3))],
            Node(CONTENT, "ns1", dgst(6)): [],
            Node(CONTENT, "ns1", dgst(7)): [Node(CONTENT, "ns1", dgst(2)), Node(CONTENT, "ns1", dgst(3))],
            Node(CONTENT, "ns2", dgst(1)): [],
            Node(CONTENT, "ns2", dgst(2)): [],
            Node(SNAPSHOT, "ns1", "overlay/sn1"): [],
            Node(SNAPSHOT, "ns1", "overlay/sn2"): [Node(SNAPSHOT, "ns1", "overlay/sn1")],
            Node(SNAPSHOT, "ns1", "overlay/sn3"): [Node(SNAPSHOT, "ns1", "overlay/sn2")],
            Node(SNAPSHOT, "ns1", "overlay/sn4"): [
                Node(SNAPSHOT, "ns1", "btrfs/sn1"),
                Node(SNAPSHOT, "ns1", "overlay/sn1"),
            ],
            Node(SNAPSHOT, "ns1", "overlay/sn5"): [
                Node(SNAPSHOT, "ns1", "overlay/sn1"),
                Node(SNAPSHOT, "ns1", "overlay/sn2"),
            ],
            Node(SNAPSHOT, "ns1", "btrfs/sn1"): [],
            Node(SNAPSHOT, "ns2", "overlay/sn1"): [],
            Node(SNAPSHOT, "ns2", "overlay/sn2"): [Node(SNAPSHOT, "ns2", "overlay/sn1")],
            Node(SNAPSHOT, "ns2", "overlay/sn3"): [Node(CONTENT, "ns2", dgst(1)), Node(CONTENT, "ns2", dgst(6))],
            Node(INGEST, "ns1", "ingest-1"): [],
            Node(INGEST, "ns2", "ingest-2"): [Node(CONTENT, "ns2", dgst(8))],
            Node(SNAPSHOT_FLAT, "ns3", "overlay/sn2"): [Node(SNAPSHOT_FLAT, "ns3", "overlay/sn1")],
            Node(SNAPSHOT, "ns3", "overlay/sn2"): [Node(SNAPSHOT, "ns3", "overlay/sn1")],
            Node(SNAPSHOT_FLAT, "ns3", "overlay/sn1"): [],
            Node(SNAPSHOT_FLAT, "ns3", "overlay/sn3"): [],
            Node(SNAPSHOT, "ns3", "overlay/sn3"): [
                Node(SNAPSHOT, "ns3", "btrfs/sn1"),
                Node(SNAPSHOT, "ns3", "overlay/sn1"),
            ],
            # a flat blob's labels are not followed either
            Node(CONTENT_FLAT, "ns3", dgst(2)): [],
            Node(CONTENT, "ns3", dgst(2)): [Node(CONTENT, "ns3", dgst(1))],
        }
        for node, expected in refs.items():
            got = self.db.view(lambda tx, n=node: self.collector.references(tx, n))
            self.assertEqual(sorted(got), sorted(expected), node)

    def test_send_label_refs(self) -> None:
        out: list[Node] = []
        mgc.send_label_refs(
            "ns",
            [
                (LABEL_GC_CONTENT_REF, dgst(1)),
                (LABEL_GC_CONTENT_REF + ".x", dgst(2)),
                (LABEL_GC_CONTENT_REF + "/y", dgst(3)),
                (LABEL_GC_CONTENT_REF + "x", dgst(4)),
                (LABEL_GC_SNAP_REF + "overlay", "a"),
                (LABEL_GC_SNAP_REF + "overlay/1", "b"),
                ("other", "c"),
            ],
            out.append,
        )
        self.assertEqual(
            out,
            [
                Node(CONTENT, "ns", dgst(1)),
                Node(CONTENT, "ns", dgst(2)),
                Node(CONTENT, "ns", dgst(3)),
                Node(SNAPSHOT, "ns", "overlay/a"),
                Node(SNAPSHOT, "ns", "overlay/b"),
            ],
        )

    def test_invalid_expiry_keeps_lease(self) -> None:
        self.alter(lambda f: f.lease("ns", "l", {LABEL_GC_EXPIRE: "tomorrow"}))
        self.assertEqual(self.db.view(self.collector.roots), [Node(LEASE, "ns", "l")])

    def test_kinds_register_by_name(self) -> None:
        before = list(mgc.KINDS)
        self.addCleanup(lambda: mgc.KINDS.__setitem__(slice(None), before))
        names = [k.name for k in mgc.KINDS]
        self.assertIn("leases", names)
        self.assertIn("content", names)
        replacement = ResourceKind("content")
        mgc.register_kind(replacement)
        self.assertEqual([k.name for k in mgc.KINDS], names)
        self.assertIs(mgc.KINDS[names.index("content")], replacement)
        mgc.register_kind(ResourceKind("images-test"))
        self.assertEqual(mgc.KINDS[-1].name, "images-test")


class FakeCleaner:
    def __init__(self) -> None:
        self.calls = 0

    def garbage_collect(self) -> float:
        self.calls += 1
        return 0.0


class CollectTests(_DBCase):
    """garbage_collect end to end: what goes, what stays, which backends are cleaned."""

    def test_sweep_removes_unreachable_records(self) -> None:
        def alters(f: Fixture) -> None:
            f.image("ns1", "img", dgst(1))
            f.content("ns1", dgst(1), {LABEL_GC_CONTENT_REF + ".c": dgst(2)})
            f.content("ns1", dgst(2))
            f.content("ns1", dgst(3))
            f.content("ns1", dgst(4), {LABEL_GC_ROOT: "x", LABEL_GC_SNAP_REF + "overlay": "s1"})
            f.snapshot("ns1", "overlay", "s1", "s0")
            f.snapshot("ns1", "overlay", "s0", "")
            f.snapshot("ns1", "overlay", "s2", "")
            f.lease("ns1", "gone", {LABEL_GC_EXPIRE: rfc3339(-10)})
            f.lease_content("ns1", "gone", dgst(5))
            f.content("ns1", dgst(5))
            f.ingest("ns1", "old", expires_in=-1)
            f.ingest("ns1", "new", expires_in=100)

        self.alter(alters)
        content, overlay, btrfs = FakeCleaner(), FakeCleaner(), FakeCleaner()
        self.collector.register_content(content)
        self.collector.register_snapshotter("overlay", overlay)
        self.collector.register_snapshotter("btrfs", btrfs)
        stats = self.collector.garbage_collect()
        self.assertEqual(
            set(self.db.view(self.collector.scan_all)),
            {
                Node(CONTENT, "ns1", dgst(1)),
                Node(CONTENT, "ns1", dgst(2)),
                Node(CONTENT, "ns1", dgst(4)),
                Node(SNAPSHOT, "ns1", "overlay/s1"),
                Node(SNAPSHOT, "ns1", "overlay/s0"),
                Node(INGEST, "ns1", "new"),
            },
        )
        self.assertEqual((content.calls, overlay.calls, btrfs.calls), (1, 1, 0))
        self.assertGreater(stats.elapsed, 0)
        self.assertEqual(stats.elapsed, stats.meta)
        self.assertEqual([name for name, _ in stats.snapshots], ["overlay"])

    def test_nothing_removed_cleans_nothing(self) -> None:
        self.alter(lambda f: f.content("ns1", dgst(1), {LABEL_GC_ROOT: "x"}))
        content = FakeCleaner()
        self.collector.register_content(content)
        self.collector.garbage_collect()
        self.assertEqual(content.calls, 0)

    def test_dirty_flags(self) -> None:
        content, overlay = FakeCleaner(), FakeCleaner()
        self.collector.register_content(content)
        self.collector.register_snapshotter("overlay", overlay)
        self.assertFalse(self.collector.dirty)
        self.collector.mark_dirty()
        self.assertTrue(self.collector.dirty)
        self.collector.garbage_collect()
        self.assertFalse(self.collector.dirty)
        self.assertEqual((content.calls, overlay.calls), (0, 0))
        # A user's delete of a blob or snapshot cleans that backend even if the sweep removed nothing.
        self.collector.mark_dirty(content=True, snapshotter="overlay")
        self.collector.garbage_collect()
        self.assertEqual((content.calls, overlay.calls), (1, 1))
        self.collector.garbage_collect()
        self.assertEqual((content.calls, overlay.calls), (1, 1))

    def test_backend_failure_is_logged_not_raised(self) -> None:
        class Broken:
            def garbage_collect(self) -> float:
                raise OSError("disk on fire")

        self.collector.register_content(Broken())
        self.collector.mark_dirty(content=True)
        self.collector.garbage_collect()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_collector_for_is_per_database(self) -> None:
        self.assertIs(mgc.collector_for(self.db), mgc.collector_for(self.db))
        other = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.assertIsNot(mgc.collector_for(other), mgc.collector_for(self.db))

    def test_writers_wait_for_mark_and_sweep(self) -> None:
        """Mark and sweep share one write transaction: a reference added meanwhile waits."""
        self.alter(lambda f: f.content("ns1", dgst(1)))
        entered, release = threading.Event(), threading.Event()

        def slow_roots(tx: sqlite3.Connection, now: int, emit: mgc.Emit) -> None:
            entered.set()
            release.wait(5)

        collector = Collector(self.db, kinds=[mleases.KIND, mcontent.KIND, ResourceKind("slow", roots=slow_roots)])
        worker = threading.Thread(target=collector.garbage_collect)
        worker.start()
        self.assertTrue(entered.wait(5))
        added = threading.Event()

        def label_root() -> None:
            self.db.update(lambda tx: Fixture(tx).lease_content("ns1", "late", dgst(1)))
            added.set()

        writer = threading.Thread(target=label_root)
        writer.start()
        self.assertFalse(added.wait(0.2))
        release.set()
        worker.join(5)
        writer.join(5)
        self.assertTrue(added.is_set())
        # The blob was unreferenced when marked, so it went; the late lease came after the sweep.
        self.assertEqual(self.db.view(self.collector.scan_all), [Node(LEASE, "ns1", "late")])


class ContentBackendTests(SynchronousTestCase):
    """The content store's cleanup: backend blobs and ingests no namespace has."""

    def test_cleanup_removes_unreferenced_blobs_and_ingests(self) -> None:
        db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(db.close)
        db.open()
        backend = LocalStore(self.mktemp())
        store = mcontent.NamespacedContentStore(db, backend, shared=True, collector=Collector(db))
        kept, lost = b"kept", b"lost"
        for ns, data in (("a", kept), ("a", lost)):
            with store.writer(ns, data.decode()) as w:
                w.write(data)
                w.commit()
        stale = backend.writer("orphan-ingest")
        stale.write(b"x")
        stale.close()
        with store.writer("a", "live") as w:
            w.write(b"partial")
        store.delete("a", mcontent.CANONICAL + ":" + hashlib.sha256(lost).hexdigest())
        store.garbage_collect()
        digests: list[str] = []
        backend.walk(lambda info: digests.append(info.digest))
        self.assertEqual(digests, ["sha256:" + hashlib.sha256(kept).hexdigest()])
        refs: list[str] = []
        backend.walk_status_refs(refs.append)
        self.assertEqual(refs, [mcontent.backend_ref("a", "live")])
