"""Tests for :mod:`cdtwist.content.local`.

``StoreSuiteTests`` ports containerd's ``content/testsuite/testsuite.go``
(run with a dict-backed label store, as ``local/store_test.go`` does) and
``LocalStoreTests`` the rest of ``local/store_test.go``; the remaining
classes cover the layout, errors, threads, expiry and crash safety.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import grpc
from twisted.trial.unittest import SynchronousTestCase

import cdtwist
from cdtwist.content import local
from cdtwist.content.local import Info, LocalStore, Status, Writer
from cdtwist.errors import (
    AlreadyExists,
    CdtwistError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    to_grpc_code,
)

EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cdtwist.__file__)))

_seed = itertools.count(1)


def create_content(size: int) -> tuple[bytes, str]:
    """Different but reproducible content on each call, like the Go suite's createContent."""
    data = random.Random(next(_seed)).randbytes(size)
    return data, local.digest_from_bytes(data)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemoryLabelStore:
    """store_test.go's memoryLabelStore."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.labels: dict[str, dict[str, str]] = {}

    def get(self, digest: str) -> dict[str, str] | None:
        with self._mu:
            return self.labels.get(digest)

    def set(self, digest: str, labels: dict[str, str]) -> None:
        with self._mu:
            self.labels[digest] = labels

    def update(self, digest: str, labels: dict[str, str]) -> dict[str, str]:
        with self._mu:
            current = self.labels.setdefault(digest, {})
            for k, v in labels.items():
                if v == "":
                    current.pop(k, None)
                else:
                    current[k] = v
            return dict(current)


def write_blob(store: LocalStore, ref: str, data: bytes, expected: str = "", labels: dict[str, str] | None = None):
    """content.WriteBlob: nothing to do when the content is already there."""
    try:
        w = store.writer(ref, total=len(data), expected=expected)
    except AlreadyExists:
        return
    try:
        copy_into(w, data, len(data), expected, labels)
    finally:
        w.close()


def copy_into(w: Writer, data: bytes, size: int, expected: str, labels: dict[str, str] | None = None) -> None:
    """content.Copy: continue from the writer's offset, then commit."""
    offset = w.status().offset
    for i in range(offset, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
    w.commit(size, expected, labels)


def write_in_pieces(w: Writer, data: bytes, piece: int) -> int:
    n = 0
    for i in range(0, len(data), piece):
        n += w.write(data[i : i + piece])
    return n


class _StoreTestCase(SynchronousTestCase):
    with_labels = True

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.label_store = MemoryLabelStore() if self.with_labels else None
        self.store = LocalStore(self.root, self.label_store, lock_retries=1)

    def check_info(
        self, digest: str, size: int, labels: dict[str, str] | None, c1: int, c2: int, u1: int, u2: int
    ) -> Info:
        info = self.store.info(digest)
        self.assertEqual(info.digest, digest)
        self.assertEqual(info.size, size)
        self.assertTrue(c1 <= info.created_at <= c2, (c1, info.created_at, c2))
        self.assertTrue(u1 <= info.updated_at <= u2, (u1, info.updated_at, u2))
        self.assertEqual(info.labels, labels or {})
        return info

    def check_status(
        self, w: Writer, expected: Status, digest: str, pre_start: int, post_start: int, pre_up: int, post_up: int
    ) -> None:
        st = w.status()
        self.assertEqual(w.digest(), digest)
        self.assertEqual((st.ref, st.offset, st.total), (expected.ref, expected.offset, expected.total))
        self.assertTrue(pre_start <= st.started_at <= post_start, (pre_start, st.started_at, post_start))
        self.assertTrue(pre_up <= st.updated_at <= post_up, (pre_up, st.updated_at, post_up))

    def check_ref_not_available(self, ref: str) -> None:
        self.assertRaises(Unavailable, self.store.writer, ref)

    def blob_file(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest.split(":", 1)[1])


# ---------------------------------------------------------------------------
# content/testsuite/testsuite.go


class StoreSuiteTests(_StoreTestCase):
    labels = {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def test_writer(self) -> None:
        """checkContentStoreWriter: every combination of size and digest hints."""
        cases = []
        for i, (with_size, with_digest) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
            data, dgst = create_content(256)
            w = self.store.writer(
                f"c{i + 1}", total=len(data) if with_size else 0, expected=dgst if with_digest else ""
            )
            self.addCleanup(w.close)
            cases.append((data, dgst, w))
        for data, dgst, w in cases:
            self.assertEqual(write_in_pieces(w, data, 32), len(data))
            pre = time.time_ns()
            w.commit(0, "", self.labels)
            post = time.time_ns()
            self.assertEqual(w.digest(), dgst)
            self.check_info(dgst, len(data), self.labels, pre, post, pre, post)

    def test_update_status(self) -> None:
        data, d1 = create_content(256)
        pre_start = time.time_ns()
        w = self.store.writer("c1", total=256, expected=d1)
        self.addCleanup(w.close)
        post_start = time.time_ns()
        expected = Status("c1", total=256, expected=d1)
        self.check_status(w, expected, EMPTY_DIGEST, pre_start, post_start, pre_start, post_start)
        for lo, hi in [(0, 64), (64, 192), (192, 256)]:
            pre = time.time_ns()
            w.write(data[lo:hi])
            post = time.time_ns()
            expected.offset = hi
            self.check_status(w, expected, sha256(data[:hi]), pre_start, post_start, pre, post)
        pre = time.time_ns()
        w.commit(0, "", self.labels)
        post = time.time_ns()
        self.check_info(d1, 256, self.labels, pre, post, pre, post)

    def test_commit_exists(self) -> None:
        c1, d1 = create_content(256)
        write_blob(self.store, "c1", c1, d1)
        for i, expected in enumerate([d1, ""]):
            w = self.store.writer(f"c1-commitexists-{i}")
            w.write(c1)
            e = self.assertRaises(AlreadyExists, w.commit, len(c1), expected)
            w.close()
            self.assertEqual(str(e), f"content {d1}: already exists")
            # ErrAlreadyExists aborts the writer.
            self.assertRaises(NotFound, self.store.status, f"c1-commitexists-{i}")

    def test_resume_writer(self) -> None:
        ref = "cb"
        cb, dgst = create_content(256)
        first, second = cb[:128], cb[128:]
        pre_start = time.time_ns()
        w1 = self.store.writer(ref, total=256, expected=dgst)
        post_start = pre_up = time.time_ns()
        self.assertEqual(w1.write(first), 128)
        post_up = time.time_ns()
        expected = Status(ref, offset=128, total=256)
        self.check_status(w1, expected, sha256(first), pre_start, post_start, pre_up, post_up)
        w1.close()

        w2 = self.store.writer(ref, total=256, expected=dgst)
        # Status should be consistent with the version before close.
        self.check_status(w2, expected, sha256(first), pre_start, post_start, pre_up, post_up)
        pre_up = time.time_ns()
        w2.write(second)
        post_up = time.time_ns()
        expected.offset = 256
        self.check_status(w2, expected, dgst, pre_start, post_start, pre_up, post_up)
        pre = time.time_ns()
        w2.commit(0, "")
        post = time.time_ns()
        w2.close()
        self.check_info(dgst, 256, None, pre, post, pre, post)

    def _check_resume(self, resume) -> None:
        for i, size in enumerate([500, 5000, 50000]):
            for j, fraction in enumerate([0.0, 0.1, 0.5, 0.9, 1.0]):
                data, dgst = create_content(size)
                limit = int(size * fraction)
                ref = f"ref-{i}-{j}"
                w = self.store.writer(ref, total=size, expected=dgst)
                w.write(data[:limit])
                w.close()
                w = self.store.writer(ref, total=size, expected=dgst)
                self.assertEqual(w.status().offset, limit)
                pre = time.time_ns()
                resume(w, data, limit, size, dgst)
                post = time.time_ns()
                w.close()
                self.check_info(dgst, size, None, pre, post, pre, post)

    def test_resume_truncate(self) -> None:
        def resume(w: Writer, data: bytes, written: int, size: int, dgst: str) -> None:
            w.truncate(0)
            write_in_pieces(w, data, 1024)
            w.commit(size, dgst)

        self._check_resume(resume)

    def test_resume_discard(self) -> None:
        def resume(w: Writer, data: bytes, written: int, size: int, dgst: str) -> None:
            write_in_pieces(w, data[written:], 1024)
            w.commit(size, dgst)

        self._check_resume(resume)

    def test_resume_copy(self) -> None:
        self._check_resume(lambda w, data, written, size, dgst: copy_into(w, data, size, dgst))

    def test_small_blob(self) -> None:
        """checkSmallBlob: reading past the end of a blob returns what is there."""
        blob = b"foobar"
        dgst = local.digest_from_bytes(blob)
        w = self.store.writer("TestSmallBlob", total=len(blob), expected=dgst)
        w.write(blob)
        w.commit(len(blob), dgst)
        w.close()
        with self.store.reader(dgst) as ra:
            self.assertEqual(ra.size, len(blob))
            self.assertEqual(ra.read_at(0, len(blob) + 1), blob)

    def test_labels(self) -> None:
        c1, d1 = create_content(256)
        w = self.store.writer("c1-checklabels", total=256, expected=d1)
        self.addCleanup(w.close)
        w.write(c1)
        root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        labels = {"k1": "v1", "k2": "v2", "containerd.io/gc.root": root_time}
        pre_commit = time.time_ns()
        w.commit(0, "", labels)
        post_commit = time.time_ns()
        self.check_info(d1, 256, labels, pre_commit, post_commit, pre_commit, post_commit)

        labels = {"k1": "newvalue", "k3": "v3", "containerd.io/gc.root": root_time}
        pre = time.time_ns()
        updated = self.store.update(Info(d1, 256, labels=dict(labels)))
        post = time.time_ns()
        self.assertEqual(updated.labels, labels)
        self.check_info(d1, 256, labels, pre_commit, post_commit, pre, post)

        labels = {"k1": "v1", "containerd.io/gc.root": root_time}
        pre = time.time_ns()
        updated = self.store.update(Info(d1, 256, labels=dict(labels)), "labels.k3", "labels.k1")
        post = time.time_ns()
        self.assertEqual(updated.labels, labels)
        self.check_info(d1, 256, labels, pre_commit, post_commit, pre, post)

    def test_commit_error_state(self) -> None:
        c1, d1 = create_content(256)
        _, d2 = create_content(256)
        write_blob(self.store, "c1", c1, d1)
        ref = "c1-commiterror-state"

        w = self.store.writer(ref)
        w.write(c1)
        self.check_ref_not_available(ref)
        self.assertRaises(AlreadyExists, w.commit, len(c1), d1)

        w = self.store.writer(ref)
        self.check_ref_not_available(ref)
        w.write(c1)
        # exists, without providing the digest
        self.assertRaises(AlreadyExists, w.commit, len(c1), "")
        w.close()

        w = self.store.writer(ref)
        self.check_ref_not_available(ref)
        w.write(c1 + b"more")
        e = self.assertRaises(FailedPrecondition, w.commit, len(c1) + 4, d2)
        self.assertEqual(str(e), f"unexpected commit digest {sha256(c1 + b'more')}, expected {d2}: failed precondition")
        w.close()

        w = self.store.writer(ref)
        self.check_ref_not_available(ref)
        e = self.assertRaises(FailedPrecondition, w.commit, len(c1), "")
        self.assertEqual(str(e), f"unexpected commit size {len(c1) + 4}, expected {len(c1)}: failed precondition")
        w.close()

        w = self.store.writer(ref)
        self.check_ref_not_available(ref)
        w.commit(len(c1) + 4, "")
        w.close()

        w = self.store.writer(ref)
        w.write(c1)
        self.check_ref_not_available(ref)
        self.assertRaises(AlreadyExists, w.commit, len(c1), d1)
        w.close()

        w = self.store.writer(ref)
        self.check_ref_not_available(ref)
        w.close()
        w = self.store.writer(ref)
        w.close()


# ---------------------------------------------------------------------------
# content/local/store_test.go


class LocalStoreTests(_StoreTestCase):
    with_labels = False

    def test_content_writer(self) -> None:
        self.assertTrue(os.path.isdir(os.path.join(self.root, "ingest")))
        cw = self.store.writer("myref")
        cw.close()
        cw = self.store.writer("myref")
        self.addCleanup(cw.close)
        # a second resume fails while the first is open
        self.assertRaises(Unavailable, self.store.writer, "myref")

        ingestions = self.store.list_statuses("")
        for st in ingestions:
            st.started_at = st.updated_at = 0
        self.assertEqual(ingestions, [Status("myref", offset=0)])

        p = os.urandom(4 << 20)
        expected = sha256(p)
        self.assertEqual(write_in_pieces(cw, p, 4096), len(p))
        cw.commit(len(p), expected)
        cw.close()

        cw = self.store.writer("aref")
        write_in_pieces(cw, p, 65536)
        self.assertRaises(AlreadyExists, cw.commit, len(p), expected)

        path = self.check_blob_path(expected)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), p)

    def check_blob_path(self, digest: str) -> str:
        path = self.store.blob_path(digest)
        self.assertEqual(path, os.path.join(self.root, "blobs", "sha256", digest[len("sha256:") :]))
        mode = os.stat(path).st_mode
        self.assertEqual(stat.S_IMODE(mode) & 0o333, 0, oct(mode))
        return path

    def test_walk_blobs(self) -> None:
        rnd = random.Random(79)
        blobs = {}
        for _ in range(79):
            p = rnd.randbytes(rnd.randrange(4 << 10))
            blobs[sha256(p)] = p
        for dgst, p in blobs.items():
            write_blob(self.store, dgst, p, dgst)
        found: list[str] = []

        def visit(info: Info) -> None:
            found.append(info.digest)
            self.check_blob_path(info.digest)
            self.assertEqual(info.size, len(blobs[info.digest]))

        self.store.walk(visit)
        self.assertEqual(found, sorted(blobs))

    def test_truncate_recovers_from_incomplete_write(self) -> None:
        data = b"this is the content"
        w = self.store.writer("ref", total=len(data))
        w.write(b"bad data")
        w.close()
        w = self.store.writer("ref", total=len(data))
        w.truncate(0)
        w.write(data)
        w.commit(len(data), sha256(data))
        with self.store.reader(sha256(data)) as ra:
            self.assertEqual(ra.read_all(), data)

    def test_write_read_zero_timestamp(self) -> None:
        """TestWriteReadEmptyFileTimestamp: Go's zero time survives a round trip."""
        path = os.path.join(self.root, "updatedat")
        zero = local.parse_timestamp("0001-01-01T00:00:00Z")
        local._write_timestamp(path, zero)
        with open(path) as f:
            self.assertEqual(f.read(), "0001-01-01T00:00:00Z")
        self.assertEqual(local._read_timestamp(path), zero)
        self.assertFalse(os.path.exists(path + ".tmp"))


# ---------------------------------------------------------------------------
# Layout, formats and error texts


class LayoutTests(_StoreTestCase):
    def test_ingest_files(self) -> None:
        """The ingest directory holds what containerd writes, in the same formats."""
        before = time.time_ns()
        w = self.store.writer("myref", total=10)
        path = os.path.join(self.root, "ingest", hashlib.sha256(b"myref").hexdigest())
        self.assertEqual(self.store.ingest_root("myref"), path)
        self.assertEqual(sorted(os.listdir(path)), ["data", "ref", "startedat", "total", "updatedat"])
        with open(os.path.join(path, "ref"), "rb") as f:
            self.assertEqual(f.read(), b"myref")
        with open(os.path.join(path, "total"), "rb") as f:
            self.assertEqual(f.read(), b"10")
        stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")
        for name in ("startedat", "updatedat"):
            with open(os.path.join(path, name)) as f:
                text = f.read()
            self.assertTrue(stamp.fullmatch(text), text)
            self.assertTrue(before <= local.parse_timestamp(text) <= time.time_ns())
        w.write(b"0123")
        w.close()
        with open(os.path.join(path, "data"), "rb") as f:
            self.assertEqual(f.read(), b"0123")
        st = self.store.status("myref")
        self.assertEqual((st.ref, st.offset, st.total, st.expected), ("myref", 4, 10, ""))

    def test_no_total_file_when_unknown(self) -> None:
        self.store.writer("r").close()
        self.assertFalse(os.path.exists(os.path.join(self.store.ingest_root("r"), "total")))
        self.assertEqual(self.store.status("r").total, 0)

    def test_commit_layout(self) -> None:
        data, dgst = create_content(1000)
        write_blob(self.store, "r", data, dgst)
        self.assertEqual(os.listdir(os.path.join(self.root, "ingest")), [])
        self.assertEqual(os.listdir(os.path.join(self.root, "blobs", "sha256")), [dgst[7:]])
        self.assertEqual(stat.S_IMODE(os.stat(self.blob_file(dgst)).st_mode) & 0o333, 0)

    def test_timestamps_like_go(self) -> None:
        # Go: time.Date(2023, 4, 5, 10, 11, 12, 123456789, time.FixedZone("", 2*3600)).MarshalText()
        ns = local.parse_timestamp("2023-04-05T10:11:12.123456789+02:00")
        self.assertEqual(ns, 1680682272123456789)
        self.assertEqual(local.parse_timestamp("2023-04-05T08:11:12.1234567891Z"), ns)
        self.assertEqual(local.parse_timestamp("2023-04-05T08:11:12Z"), 1680682272000000000)
        self.assertEqual(local.parse_timestamp("1969-12-31T23:59:59.5Z"), -500000000)
        for bad in ("", "2023-04-05", "2023-02-30T00:00:00Z", "2023-04-05T24:00:00Z", "2023-04-05T08:11:12"):
            self.assertRaises(ValueError, local.parse_timestamp, bad)
        old_tz = os.environ.get("TZ")
        self.addCleanup(self._set_tz, old_tz)
        self._set_tz("UTC")
        self.assertEqual(local.format_timestamp(ns), "2023-04-05T08:11:12.123456789Z")
        self.assertEqual(local.format_timestamp(1680682272100000000), "2023-04-05T08:11:12.1Z")
        self.assertEqual(local.format_timestamp(1680682272000000000), "2023-04-05T08:11:12Z")
        self._set_tz("EST+5")
        self.assertEqual(local.format_timestamp(ns), "2023-04-05T03:11:12.123456789-05:00")
        self.assertEqual(local.parse_timestamp(local.format_timestamp(ns)), ns)

    @staticmethod
    def _set_tz(tz: str | None) -> None:
        if tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = tz
        time.tzset()

    def test_go_duration(self) -> None:
        cases = {
            0: "0s",
            1: "1ns",
            999: "999ns",
            1100: "1.1µs",
            2_200_000: "2.2ms",
            3_300_000_000: "3.3s",
            245_000_000_000: "4m5s",
            245_001_000_000: "4m5.001s",
            3600_000_000_000: "1h0m0s",
            18367_001_000_000: "5h6m7.001s",
            -1500: "-1.5µs",
        }
        for ns, text in cases.items():
            self.assertEqual(local.go_duration(ns), text)

    def test_digest_validation(self) -> None:
        hex64 = "a" * 64
        cases = {
            "": "invalid checksum digest format",
            "sha256": "invalid checksum digest format",
            "sha256:": "invalid checksum digest format",
            ":" + hex64: "invalid checksum digest format",
            "sha256:abc": "invalid checksum digest length",
            "sha256:" + "A" * 64: "invalid checksum digest format",
            "sha256:" + "g" * 64: "invalid checksum digest format",
            "md5:abc": "unsupported digest algorithm",
            "sha512:" + "a" * 128: "unsupported digest algorithm",
            "Sha256:" + hex64: "invalid checksum digest format",
            "foo:bar+": "invalid checksum digest format",
        }
        for dgst, text in cases.items():
            e = self.assertRaises(ValueError, local.validate_digest, dgst)
            self.assertEqual(str(e), text, dgst)
        local.validate_digest("sha256:" + hex64)

    def test_invalid_digest_errors(self) -> None:
        bad = "sha256:abc"
        tail = "cannot calculate blob path from invalid digest: invalid checksum digest length: invalid argument"
        cases = [
            (self.store.info, "calculating blob info path"),
            (self.store.reader, "calculating blob path for ReaderAt"),
            (self.store.delete, "calculating blob path for delete"),
            (lambda d: self.store.update(Info(d)), "calculating blob path for update"),
            (lambda d: self.store.writer("r", expected=d), "calculating expected blob path for writer"),
        ]
        for call, prefix in cases:
            e = self.assertRaises(InvalidArgument, call, bad)
            self.assertEqual(str(e), f"{prefix}: {tail}")
        # the failed writer released its ref
        self.store.writer("r").close()

    def test_not_found_errors(self) -> None:
        _, dgst = create_content(10)
        e = self.assertRaises(NotFound, self.store.info, dgst)
        self.assertEqual(str(e), f"content {dgst}: not found")
        e = self.assertRaises(NotFound, self.store.reader, dgst)
        self.assertEqual(str(e), f"blob {dgst} expected at {self.blob_file(dgst)}: blob not found: not found")
        e = self.assertRaises(NotFound, self.store.delete, dgst)
        self.assertEqual(str(e), f"content {dgst}: not found")
        e = self.assertRaises(NotFound, self.store.update, Info(dgst))
        self.assertEqual(str(e), f"content {dgst}: not found")
        e = self.assertRaises(NotFound, self.store.status, "nope")
        data = os.path.join(self.store.ingest_root("nope"), "data")
        self.assertEqual(str(e), f"stat {data}: no such file or directory: not found")
        e = self.assertRaises(NotFound, self.store.abort, "nope")
        self.assertEqual(str(e), 'ingest ref "nope": not found')

    def test_empty_ref(self) -> None:
        e = self.assertRaises(InvalidArgument, self.store.writer, "")
        self.assertEqual(str(e), "ref must not be empty: invalid argument")

    def test_expected_exists_at_writer(self) -> None:
        data, dgst = create_content(100)
        write_blob(self.store, "a", data, dgst)
        e = self.assertRaises(AlreadyExists, self.store.writer, "b", len(data), dgst)
        self.assertEqual(str(e), f"content {dgst}: already exists")
        self.assertFalse(os.path.exists(self.store.ingest_root("b")))
        self.store.writer("b").close()  # not left locked

    def test_update_without_label_store(self) -> None:
        store = LocalStore(self.root)
        data, dgst = create_content(10)
        write_blob(store, "r", data, dgst, labels={"a": "b"})
        self.assertEqual(store.info(dgst).labels, {})
        e = self.assertRaises(FailedPrecondition, store.update, Info(dgst, labels={"a": "b"}))
        self.assertEqual(str(e), "update not supported on immutable content store: failed precondition")

    def test_update_fieldpaths(self) -> None:
        data, dgst = create_content(10)
        write_blob(self.store, "r", data, dgst, labels={"a": "1", "b": "2"})
        e = self.assertRaises(InvalidArgument, self.store.update, Info(dgst, size=3), "size")
        self.assertEqual(str(e), f'cannot update "size" field on content info "{dgst}": invalid argument')
        info = self.store.update(Info(dgst, labels={"c": "3"}), "labels.c", "labels.a")
        self.assertEqual(info.labels, {"b": "2", "c": "3"})
        info = self.store.update(Info(dgst, labels={"z": "9"}), "labels")
        self.assertEqual(info.labels, {"z": "9"})
        self.assertEqual(self.store.info(dgst).labels, {"z": "9"})
        self.assertEqual(info.size, 10)

    def test_reader(self) -> None:
        data, dgst = create_content(3 * 1024 + 5)
        write_blob(self.store, "r", data, dgst)
        ra = self.store.reader(dgst)
        self.assertEqual(ra.size, len(data))
        self.assertEqual(ra.read_at(10, 20), data[10:30])
        self.assertEqual(ra.read_at(len(data) - 2, 100), data[-2:])
        self.assertEqual(ra.read_at(len(data) + 10, 100), b"")
        self.assertEqual(b"".join(ra.iter_chunks(chunk_size=1000)), data)
        self.assertEqual([len(c) for c in ra.iter_chunks(100, 2500, 1000)], [1000, 1000, 500])
        e = self.assertRaises(CdtwistError, ra.read_at, -1, 1)
        self.assertEqual(to_grpc_code(e), grpc.StatusCode.UNKNOWN)
        ra.close()
        ra.close()
        self.assertRaises(CdtwistError, ra.read_at, 0, 1)

    def test_delete(self) -> None:
        data, dgst = create_content(10)
        write_blob(self.store, "r", data, dgst)
        self.store.delete(dgst)
        self.assertRaises(NotFound, self.store.info, dgst)
        # the same content can be written again
        write_blob(self.store, "r", data, dgst)
        self.assertEqual(self.store.info(dgst).size, 10)


# ---------------------------------------------------------------------------
# Walk, statuses, abort and writers' edge cases


class ListingTests(_StoreTestCase):
    def test_walk_filters(self) -> None:
        blobs = {}
        for name, labels in [("a", {"k": "a"}), ("b", {"k": "b", "x.y": "z"}), ("c", None)]:
            data, dgst = create_content(64)
            write_blob(self.store, name, data, dgst, labels=labels)
            blobs[name] = dgst

        def walked(*filters: str) -> list[str]:
            seen: list[str] = []
            self.store.walk(lambda info: seen.append(info.digest), *filters)
            return sorted(seen)

        self.assertEqual(walked(), sorted(blobs.values()))
        self.assertEqual(walked("labels.k==a"), [blobs["a"]])
        self.assertEqual(walked("labels.k"), sorted([blobs["a"], blobs["b"]]))
        self.assertEqual(walked('labels."x.y"==z'), [blobs["b"]])
        self.assertEqual(walked("labels.k==a", "labels.k==b"), sorted([blobs["a"], blobs["b"]]))
        self.assertEqual(walked(f"digest=={blobs['c']}"), [blobs["c"]])
        self.assertEqual(walked("digest~=^sha256:"), sorted(blobs.values()))
        self.assertEqual(walked("size==64"), [])  # containerd does not filter on size
        e = self.assertRaises(InvalidArgument, walked, "labels.k==")
        self.assertTrue(str(e).startswith("filters: parse error"), str(e))

    def test_walk_skips_foreign_entries(self) -> None:
        store = LocalStore(self.root)
        store.walk(self.fail)  # no blobs/ yet: nothing, not an error
        data, dgst = create_content(64)
        write_blob(store, "a", data, dgst)
        blobs = os.path.join(self.root, "blobs")
        os.makedirs(os.path.join(blobs, "md5"))
        with open(os.path.join(blobs, "md5", "abc"), "w"):
            pass
        with open(os.path.join(blobs, "sha256", "not-a-digest"), "w"):
            pass
        os.mkdir(os.path.join(blobs, "sha256", "b" * 64))
        seen: list[str] = []
        store.walk(lambda info: seen.append(info.digest))
        self.assertEqual(seen, [dgst])
        self.flushLoggedErrors()

    def test_walk_stops_on_exception(self) -> None:
        for i in range(3):
            data, dgst = create_content(8)
            write_blob(self.store, str(i), data, dgst)

        class Stop(Exception):
            pass

        seen: list[str] = []

        def fn(info: Info) -> None:
            seen.append(info.digest)
            raise Stop()

        self.assertRaises(Stop, self.store.walk, fn)
        self.assertEqual(len(seen), 1)

    def test_list_statuses_filters(self) -> None:
        for ref in ("a1", "a2", "b1"):
            w = self.store.writer(ref, total=5)
            w.write(ref.encode())
            w.close()

        def refs(*filters: str) -> list[str]:
            return sorted(st.ref for st in self.store.list_statuses(*filters))

        self.assertEqual(refs(), ["a1", "a2", "b1"])
        self.assertEqual(refs(""), ["a1", "a2", "b1"])
        self.assertEqual(refs("ref==a1"), ["a1"])
        self.assertEqual(refs("ref~=^a"), ["a1", "a2"])
        self.assertEqual(refs("ref!=a1"), ["a2", "b1"])
        self.assertEqual(refs("ref==a1", "ref==b1"), ["a1", "b1"])
        self.assertEqual(refs("labels.x==y"), [])
        st = [s for s in self.store.list_statuses("ref==a2")][0]
        self.assertEqual((st.offset, st.total), (2, 5))
        self.assertRaises(InvalidArgument, refs, "ref==")

        # half-created ingests (no data yet) are not listed
        half = os.path.join(self.root, "ingest", "f" * 64)
        os.mkdir(half)
        with open(os.path.join(half, "ref"), "w") as f:
            f.write("half")
        self.assertEqual(refs(), ["a1", "a2", "b1"])
        seen: list[str] = []
        self.store.walk_status_refs(seen.append)
        self.assertEqual(sorted(seen), ["a1", "a2", "b1", "half"])

    def test_status_prefers_newer_data_mtime(self) -> None:
        w = self.store.writer("r")
        w.write(b"x")
        w.close()
        st = self.store.status("r")
        later = st.updated_at + 5_000_000_000
        os.utime(os.path.join(self.store.ingest_root("r"), "data"), ns=(later, later))
        self.assertEqual(self.store.status("r").updated_at, later)

    def test_abort(self) -> None:
        w = self.store.writer("r")
        w.write(b"data")
        w.close()
        self.store.abort("r")
        self.assertFalse(os.path.exists(self.store.ingest_root("r")))
        self.assertRaises(NotFound, self.store.status, "r")
        self.assertRaises(NotFound, self.store.abort, "r")

    def test_abort_active_writer(self) -> None:
        """Abort does not wait for the writer (as in Go); its commit then fails and frees the ref."""
        w = self.store.writer("r")
        w.write(b"data")
        self.store.abort("r")
        e = self.assertRaises(CdtwistError, w.commit, 4, "")
        self.assertEqual(to_grpc_code(e), grpc.StatusCode.UNKNOWN)
        self.assertIn("rename", str(e))
        w = self.store.writer("r")
        self.assertEqual(w.status().offset, 0)
        w.close()

    def test_closed_writer(self) -> None:
        w = self.store.writer("r")
        w.write(b"abc")
        w.close()
        w.close()  # idempotent
        e = self.assertRaises(CdtwistError, w.write, b"x")
        self.assertEqual((str(e), to_grpc_code(e)), ("invalid argument", grpc.StatusCode.UNKNOWN))
        e = self.assertRaises(FailedPrecondition, w.commit, 0, "")
        self.assertEqual(str(e), "cannot commit on closed writer: failed precondition")
        self.assertEqual(w.digest(), sha256(b"abc"))

    def test_truncate_unsupported_size(self) -> None:
        w = self.store.writer("r")
        self.addCleanup(w.close)
        w.write(b"abc")
        e = self.assertRaises(CdtwistError, w.truncate, 1)
        self.assertEqual(str(e), "Truncate: unsupported size")
        w.truncate(0)
        self.assertEqual((w.status().offset, w.digest()), (0, EMPTY_DIGEST))

    def test_stale_writer_does_not_free_new_lock(self) -> None:
        """Go unlocks by ref even from a closed writer's Commit; here the live writer keeps its lock."""
        w1 = self.store.writer("r")
        w1.close()
        w2 = self.store.writer("r")
        self.addCleanup(w2.close)
        self.assertRaises(FailedPrecondition, w1.commit, 0, "")
        self.assertRaises(Unavailable, self.store.writer, "r")

    def test_dropped_writer_frees_ref(self) -> None:
        w = self.store.writer("r")
        w.write(b"abc")
        del w
        gc.collect()
        w = self.store.writer("r")
        self.addCleanup(w.close)
        self.assertEqual(w.status().offset, 0)  # unflushed data is lost, consistently
        self.assertEqual(w.digest(), EMPTY_DIGEST)


class ResumeTests(_StoreTestCase):
    def test_resume_recomputes_digest_from_disk(self) -> None:
        w = self.store.writer("r")
        w.write(b"a" * 100)
        w.close()
        with open(os.path.join(self.store.ingest_root("r"), "data"), "r+b") as f:
            f.write(b"b" * 10)
        w = self.store.writer("r")
        self.addCleanup(w.close)
        self.assertEqual(w.status().offset, 100)
        self.assertEqual(w.digest(), sha256(b"b" * 10 + b"a" * 90))

    def test_resume_keeps_total_and_times(self) -> None:
        w = self.store.writer("r", total=10)
        started = w.status().started_at
        w.write(b"12345")
        updated = w.status().updated_at
        w.close()
        w = self.store.writer("r")  # no total: the recorded one is kept
        self.addCleanup(w.close)
        st = w.status()
        self.assertEqual((st.offset, st.total, st.started_at, st.updated_at), (5, 10, started, updated))

    def test_total_mismatch_starts_over(self) -> None:
        w = self.store.writer("r", total=10)
        w.write(b"12345")
        w.close()
        w = self.store.writer("r", total=20)
        self.assertEqual((w.status().offset, w.status().total, w.digest()), (0, 20, EMPTY_DIGEST))
        w.write(b"xy")
        w.close()
        # the old bytes are gone, not overwritten in place
        with open(os.path.join(self.store.ingest_root("r"), "data"), "rb") as f:
            self.assertEqual(f.read(), b"xy")
        self.assertEqual(self.store.status("r").total, 20)

    def test_recreate_drops_stale_total(self) -> None:
        w = self.store.writer("r", total=10)
        w.close()
        os.unlink(os.path.join(self.store.ingest_root("r"), "startedat"))
        w = self.store.writer("r")
        w.close()
        self.assertEqual(self.store.status("r").total, 0)

    def test_corrupt_ingest_starts_over(self) -> None:
        w = self.store.writer("r")
        w.write(b"abc")
        w.close()
        with open(os.path.join(self.store.ingest_root("r"), "startedat"), "w") as f:
            f.write("garbage")
        e = self.assertRaises(CdtwistError, self.store.status, "r")
        self.assertIn("could not read startedat: could not parse timestamp file", str(e))
        w = self.store.writer("r")
        self.addCleanup(w.close)
        self.assertEqual(w.status().offset, 0)
        self.assertEqual(self.store.status("r").offset, 0)

    def test_read_only_ingest_data_is_writable_again(self) -> None:
        """What a commit killed just before its rename leaves can still be resumed."""
        w = self.store.writer("r")
        w.write(b"abc")
        w.close()
        data = os.path.join(self.store.ingest_root("r"), "data")
        os.chmod(data, 0o444)
        w = self.store.writer("r")
        w.write(b"def")
        w.commit(6, sha256(b"abcdef"))


# ---------------------------------------------------------------------------
# Threads


class ThreadTests(_StoreTestCase):
    def test_lock_error_text(self) -> None:
        w = self.store.writer("busy")
        self.addCleanup(w.close)
        e = self.assertRaises(Unavailable, self.store.writer, "busy")
        self.assertEqual(to_grpc_code(e), grpc.StatusCode.UNAVAILABLE)
        pattern = (
            r"ref busy locked for [0-9.]+(ns|µs|ms|s) "
            r"\(since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? [+-]\d{4} \S+ m=\+\d+\.\d{9}\): unavailable"
        )
        self.assertRegex(str(e), pattern)

    def test_locked_across_threads(self) -> None:
        store = LocalStore(self.root)  # Go's 10 retries
        held = store.writer("r")
        results: list[object] = []

        def other() -> None:
            try:
                results.append(store.writer("r"))
            except Exception as e:
                results.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        self.assertIsInstance(results[0], Unavailable)

        # a writer released while another thread is retrying is picked up
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.005)
        held.write(b"abc")
        held.close()
        t.join()
        w = results[1]
        self.assertIsInstance(w, Writer)
        assert isinstance(w, Writer)
        self.assertEqual(w.status().offset, 3)
        w.close()

    def test_concurrent_writers(self) -> None:
        shared, shared_digest = create_content(300_000)
        outcomes: list[str] = []
        errors: list[BaseException] = []
        mu = threading.Lock()
        store = LocalStore(self.root, lock_retries=1)

        def worker(n: int) -> None:
            try:
                rnd = random.Random(n)
                for i in range(10):
                    data = rnd.randbytes(rnd.randrange(1, 200_000))
                    w = store.writer(f"w{n}-{i}", total=len(data))
                    write_in_pieces(w, data, rnd.choice([100, 4096, 1 << 20]))
                    w.commit(len(data), sha256(data))
                    w = store.writer(f"shared-{n}-{i}")
                    write_in_pieces(w, shared, 65536)
                    try:
                        w.commit(len(shared), shared_digest)
                        outcome = "committed"
                    except AlreadyExists:
                        outcome = "exists"
                    with mu:
                        outcomes.append(outcome)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertIn("committed", outcomes)
        self.assertEqual(len(outcomes), 80)
        self.assertEqual(store.list_statuses(), [])
        count = 0

        def verify(info: Info) -> None:
            nonlocal count
            count += 1
            with store.reader(info.digest) as ra:
                self.assertEqual(sha256(b"".join(ra.iter_chunks())), info.digest)

        store.walk(verify)
        self.assertEqual(count, 81)

    def test_parallel_status_while_writing(self) -> None:
        w = self.store.writer("r")
        self.addCleanup(w.close)
        stop = threading.Event()
        seen: list[int] = []

        def poll() -> None:
            while not stop.is_set():
                seen.append(w.status().offset)
                w.digest()

        t = threading.Thread(target=poll)
        t.start()
        for _ in range(2000):
            w.write(b"x" * 100)
        stop.set()
        t.join()
        self.assertEqual(seen, sorted(seen))
        self.assertEqual(w.status().offset, 200_000)


# ---------------------------------------------------------------------------
# Expiry


class ExpireTests(_StoreTestCase):
    def test_expire(self) -> None:
        for ref in ("old1", "old2"):
            w = self.store.writer(ref)
            w.write(b"abc")
            w.close()
        active = self.store.writer("active")
        self.addCleanup(active.close)
        half = os.path.join(self.root, "ingest", "e" * 64)  # killed while being created
        os.mkdir(half)
        with open(os.path.join(half, "ref"), "w") as f:
            f.write("half")
        bare = os.path.join(self.root, "ingest", "d" * 64)
        os.mkdir(bare)

        self.assertEqual(self.store.expire_ingests(3600), [])
        future = time.time_ns() + 7200 * 1_000_000_000
        removed = self.store.expire_ingests(3600, now_ns=future)
        self.assertEqual(sorted(removed), sorted(["old1", "old2", "half", "d" * 64]))
        self.assertEqual(os.listdir(os.path.join(self.root, "ingest")), [self.store.ingest_root("active")[-64:]])
        self.assertEqual([s.ref for s in self.store.list_statuses()], ["active"])
        # expiry held the lock only briefly
        self.store.writer("old1").close()

    def test_expire_uses_last_update(self) -> None:
        w = self.store.writer("r")
        w.close()
        started = self.store.status("r").started_at
        w = self.store.writer("r")
        w.write(b"more")
        w.close()
        updated = self.store.status("r").updated_at
        self.assertGreater(updated, started)
        # older than its start but newer than its last write: kept
        self.assertEqual(self.store.expire_ingests(0.0, now_ns=updated), [])
        self.assertEqual(self.store.expire_ingests(0.0, now_ns=updated + 1), ["r"])


# ---------------------------------------------------------------------------
# Crashes: a child process using the store is SIGKILLed


_CHILD_PRELUDE = """
import os, random, signal, sys, time
from cdtwist.content.local import LocalStore

def content(seed, size):
    return random.Random(seed).randbytes(size)
"""


class CrashTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def spawn(self, body: str, *args: object) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = PROJECT_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        script = _CHILD_PRELUDE + textwrap.dedent(body)
        return subprocess.Popen(
            [sys.executable, "-c", script, self.root, *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        self.assertEqual(proc.returncode, -signal.SIGKILL)

    def check_blobs_sound(self) -> list[str]:
        """Nothing but complete, read-only blobs named by their digest lives under blobs/."""
        blobs = os.path.join(self.root, "blobs")
        found = []
        if not os.path.exists(blobs):
            return found
        self.assertEqual(os.listdir(blobs), ["sha256"])
        for name in os.listdir(os.path.join(blobs, "sha256")):
            path = os.path.join(blobs, "sha256", name)
            with open(path, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode) & 0o333, 0)
            found.append("sha256:" + name)
        return found

    def test_resume_after_kill_mid_ingest(self) -> None:
        size = 8 << 20
        proc = self.spawn(
            """
            root, size = sys.argv[1], int(sys.argv[2])
            data = content(7, size)
            w = LocalStore(root).writer("victim", total=size)
            rnd = random.Random(1)
            pos = 0
            while pos < size // 2:
                n = rnd.choice([1, 100, 4096, 300_000, 1 << 20])
                pos += w.write(data[pos:pos + n])
            print(pos, flush=True)
            time.sleep(60)
            """,
            size,
        )
        assert proc.stdout is not None
        written = int(proc.stdout.readline())
        self.kill(proc)

        data = random.Random(7).randbytes(size)
        store = LocalStore(self.root)
        st = store.status("victim")
        self.assertEqual(st.total, size)
        # at most the coalescing buffer was lost with the process
        self.assertTrue(written - (1 << 20) <= st.offset <= written, (st.offset, written))
        self.assertEqual([s.ref for s in store.list_statuses()], ["victim"])
        w = store.writer("victim", total=size, expected=sha256(data))
        self.assertEqual(w.status().offset, st.offset)
        self.assertEqual(w.digest(), sha256(data[: st.offset]))
        copy_into(w, data, size, sha256(data))
        with store.reader(sha256(data)) as ra:
            self.assertEqual(sha256(b"".join(ra.iter_chunks())), sha256(data))
        self.assertEqual(store.list_statuses(), [])

    def test_resume_after_kill_at_random_moment(self) -> None:
        size = 64 << 20
        data = random.Random(11).randbytes(size)
        for attempt in range(3):
            proc = self.spawn(
                """
                root, size, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
                data = content(11, size)
                store = LocalStore(root)
                w = store.writer(ref, total=size)
                print("go", flush=True)
                rnd = random.Random()
                pos = w.status().offset
                while pos < size:
                    n = rnd.choice([7, 5000, 65536, 1 << 20, 3 << 20])
                    pos += w.write(data[pos:pos + n])
                time.sleep(60)
                """,
                size,
                f"random-{attempt}",
            )
            assert proc.stdout is not None
            proc.stdout.readline()
            time.sleep(random.uniform(0.01, 0.15))
            self.kill(proc)
            store = LocalStore(self.root)
            w = store.writer(f"random-{attempt}", total=size)
            offset = w.status().offset
            self.assertEqual(w.digest(), sha256(data[:offset]))
            try:
                copy_into(w, data, size, sha256(data))
            except AlreadyExists:
                pass
            self.assertEqual(store.info(sha256(data)).size, size)
        self.assertEqual(self.check_blobs_sound(), [sha256(data)])

    def _kill_around_rename(self, when: str) -> tuple[LocalStore, bytes]:
        proc = self.spawn(
            """
            root, when = sys.argv[1], sys.argv[2]
            data = content(3, 3 << 20)
            real_rename = os.rename
            def rename(src, dst):
                if "/blobs/" in dst and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real_rename(src, dst)
                if "/blobs/" in dst and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
            os.rename = rename
            w = LocalStore(root).writer("c", total=len(data))
            w.write(data)
            w.commit(len(data), "")
            """,
            when,
        )
        proc.wait(timeout=60)
        self.kill(proc)
        return LocalStore(self.root), random.Random(3).randbytes(3 << 20)

    def test_kill_before_commit_rename(self) -> None:
        store, data = self._kill_around_rename("before")
        self.assertEqual(self.check_blobs_sound(), [])
        self.assertRaises(NotFound, store.info, sha256(data))
        self.assertEqual(store.status("c").offset, len(data))
        w = store.writer("c", total=len(data))
        self.assertEqual(w.digest(), sha256(data))
        w.commit(len(data), sha256(data))
        self.assertEqual(self.check_blobs_sound(), [sha256(data)])

    def test_kill_after_commit_rename(self) -> None:
        store, data = self._kill_around_rename("after")
        self.assertEqual(self.check_blobs_sound(), [sha256(data)])
        self.assertEqual(store.info(sha256(data)).size, len(data))
        # the leftover ingest directory has no data: not listed, restarted on reuse, expirable
        self.assertEqual(store.list_statuses(), [])
        self.assertRaises(NotFound, store.status, "c")
        self.assertRaises(AlreadyExists, store.writer, "c", len(data), sha256(data))
        self.assertEqual(store.expire_ingests(0, now_ns=time.time_ns() + 10**9), ["c"])
        self.assertEqual(os.listdir(os.path.join(self.root, "ingest")), [])

    def test_kill_during_commits(self) -> None:
        """Kill a process committing blob after blob at random moments; blobs/ is always sound."""
        for round_ in range(4):
            proc = self.spawn(
                """
                root, round_ = sys.argv[1], int(sys.argv[2])
                store = LocalStore(root)
                for i in range(10_000):
                    data = content(round_ * 100_000 + i, random.Random(i).randrange(1, 1 << 20))
                    w = store.writer(f"blob-{round_}-{i}", total=len(data))
                    w.write(data)
                    w.commit(len(data), "")
                    if i == 0:
                        print("go", flush=True)
                """,
                round_,
            )
            assert proc.stdout is not None
            proc.stdout.readline()
            time.sleep(random.uniform(0.05, 0.3))
            self.kill(proc)
            found = self.check_blobs_sound()
            self.assertGreater(len(found), 0)
            # whatever was in flight can be finished or already exists
            store = LocalStore(self.root)
            for st in store.list_statuses():
                i = int(st.ref.rsplit("-", 1)[1])
                data = random.Random(round_ * 100_000 + i).randbytes(random.Random(i).randrange(1, 1 << 20))
                w = store.writer(st.ref, total=len(data))
                self.assertEqual(w.digest(), sha256(data[: w.status().offset]))
                try:
                    copy_into(w, data, len(data), sha256(data))
                except AlreadyExists:
                    pass
            store.expire_ingests(0, now_ns=time.time_ns() + 10**9)
            self.assertEqual(os.listdir(os.path.join(self.root, "ingest")), [])
            self.check_blobs_sound()
