"""``containerd.services.content.v1.Content`` over a real grpcio server: contentserver's behaviour, byte for byte.

The server here is cdtwist's own servicer with the error interceptor, on a
UNIX socket in a temp dir; :class:`Fixture` is shared with the leases tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import field_mask_pb2
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import typeurl
from cdtwist.api.services.content.v1 import content_pb2 as api
from cdtwist.api.services.content.v1 import content_pb2_grpc as api_grpc
from cdtwist.api.services.leases.v1 import leases_pb2 as lapi
from cdtwist.api.services.leases.v1 import leases_pb2_grpc as lapi_grpc
from cdtwist.content.local import LocalStore
from cdtwist.content.service import ContentGRPC, ContentService
from cdtwist.events.exchange import Exchange
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.leases.service import LeasesGRPC, LeasesService
from cdtwist.metadata.content import NamespacedContentStore, backend_ref
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector

Code = grpc.StatusCode


class InlineReactor:
    def callFromThread(self, f, *args):  # noqa: N802
        f(*args)


class DirectScheduler:
    """Collects right away, in the calling thread."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.runs = 0

    def schedule_and_wait_blocking(self, is_active=None):  # type: ignore[no-untyped-def]
        self.runs += 1
        return self.collector.garbage_collect()


class Fixture:
    """DB, blob store, exchange, the content and leases services, a gRPC server and client stubs."""

    def __init__(self, case: SynchronousTestCase, shared: bool = True) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cdtcs", dir="/tmp")
        case.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = DB(os.path.join(self.tmp, "meta.sqlite"))
        self.db.open()
        case.addCleanup(self.db.close)
        self.backend = LocalStore(os.path.join(self.tmp, "content"), lock_retries=2)
        self.collector = Collector(self.db)
        self.store = NamespacedContentStore(self.db, self.backend, shared=shared, collector=self.collector)
        self.exchange = Exchange(InlineReactor())  # type: ignore[arg-type]
        self.events = self.exchange.subscribe()
        case.addCleanup(self.events.close)
        self.scheduler = DirectScheduler(self.collector)
        self.leases = LeasesService(self.db, self.collector, lambda: self.scheduler)  # type: ignore[arg-type,return-value]
        self.server = grpc.server(ThreadPoolExecutor(8), interceptors=[ErrorAndMetricsInterceptor()])
        ContentGRPC(ContentService(self.store, self.exchange)).register_grpc(self.server)
        LeasesGRPC(self.leases).register_grpc(self.server)
        self.address = os.path.join(self.tmp, "s.sock")
        self.server.add_insecure_port("unix:" + self.address)
        self.server.start()
        case.addCleanup(lambda: self.server.stop(None).wait(5))
        self.channel = grpc.insecure_channel("unix:" + self.address)
        case.addCleanup(self.channel.close)
        self.content = api_grpc.ContentStub(self.channel)
        self.lease_stub = lapi_grpc.LeasesStub(self.channel)

    @staticmethod
    def md(namespace: str | None = "default", lease: str | None = None) -> list[tuple[str, str]]:
        out = []
        if namespace is not None:
            out.append(("containerd-namespace", namespace))
        if lease is not None:
            out.append(("containerd-lease", lease))
        return out

    def write(self, reqs: list[api.WriteContentRequest], namespace: str = "default", lease: str | None = None):  # type: ignore[no-untyped-def]
        return list(self.content.Write(iter(reqs), metadata=self.md(namespace, lease)))

    def ingest(self, data: bytes, ref: str = "ref", namespace: str = "default", **commit: object) -> str:
        self.write(
            [
                api.WriteContentRequest(action=api.STAT, ref=ref),
                api.WriteContentRequest(action=api.WRITE, data=data),
                api.WriteContentRequest(action=api.COMMIT, offset=len(data), **commit),  # type: ignore[arg-type]
            ],
            namespace,
        )
        return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Fixture(self)

    def assertStatus(self, code: grpc.StatusCode, message: str, fn, *args, **kw):  # type: ignore[no-untyped-def]  # noqa: N802
        err = self.assertRaises(grpc.RpcError, fn, *args, **kw)
        self.assertEqual((err.code(), err.details()), (code, message))
        return err


class InfoUpdateListTests(_Case):
    def test_info(self) -> None:
        d = self.f.ingest(b"hello", labels={"a": "b"})
        info = self.f.content.Info(api.InfoRequest(digest=d), metadata=self.f.md()).info
        self.assertEqual((info.digest, info.size, dict(info.labels)), (d, 5, {"a": "b"}))
        self.assertEqual(info.created_at, info.updated_at)
        self.assertGreater(info.created_at.seconds, 0)

    def test_info_errors(self) -> None:
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            '"sha256:nope" failed validation',
            self.f.content.Info,
            api.InfoRequest(digest="sha256:nope"),
            metadata=self.f.md(None),
        )
        d = digest_of(b"missing")
        self.assertStatus(
            Code.FAILED_PRECONDITION,
            "namespace is required: failed precondition",
            self.f.content.Info,
            api.InfoRequest(digest=d),
            metadata=self.f.md(None),
        )
        self.assertStatus(
            Code.NOT_FOUND,
            f"content digest {d}: not found",
            self.f.content.Info,
            api.InfoRequest(digest=d),
            metadata=self.f.md(),
        )

    def test_update_with_and_without_mask(self) -> None:
        d = self.f.ingest(b"hello", labels={"a": "1", "b": "2"})
        info = api.Info(digest=d, labels={"b": "3", "c": "4"})
        mask = field_mask_pb2.FieldMask(paths=["labels.b", "labels.a"])
        got = self.f.content.Update(api.UpdateRequest(info=info, update_mask=mask), metadata=self.f.md()).info
        self.assertEqual(dict(got.labels), {"b": "3"})
        got = self.f.content.Update(api.UpdateRequest(info=info), metadata=self.f.md()).info
        self.assertEqual(dict(got.labels), {"b": "3", "c": "4"})
        self.assertGreater(
            (got.updated_at.seconds, got.updated_at.nanos), (got.created_at.seconds, got.created_at.nanos)
        )
        mask = field_mask_pb2.FieldMask(paths=["size"])
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            f'cannot update "size" field on content info "{d}": invalid argument',
            self.f.content.Update,
            api.UpdateRequest(info=info, update_mask=mask),
            metadata=self.f.md(),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            '"" failed validation',
            self.f.content.Update,
            api.UpdateRequest(info=api.Info()),
            metadata=self.f.md(),
        )

    def test_list_blocks_and_filters(self) -> None:
        digests = sorted(self.f.ingest(str(i).encode(), ref=f"r{i}", labels={"n": str(i % 3)}) for i in range(205))
        blocks = list(self.f.content.List(api.ListContentRequest(), metadata=self.f.md()))
        self.assertEqual([len(b.info) for b in blocks], [100, 100, 5])
        self.assertEqual([i.digest for b in blocks for i in b.info], digests)
        first = blocks[0].info[0]
        self.assertTrue(first.HasField("created_at"))
        # containerd's List leaves updated_at at Go's zero time (gogo still sends it)
        self.assertEqual(first.updated_at.seconds, -62135596800)
        some = list(self.f.content.List(api.ListContentRequest(filters=["labels.n==1"]), metadata=self.f.md()))
        self.assertEqual(sum(len(b.info) for b in some), 68)
        self.assertEqual(list(self.f.content.List(api.ListContentRequest(), metadata=self.f.md("other"))), [])
        err = self.assertRaises(
            grpc.RpcError,
            lambda: list(self.f.content.List(api.ListContentRequest(filters=["a=="]), metadata=self.f.md())),
        )
        self.assertEqual(err.code(), Code.INVALID_ARGUMENT)

    def test_delete_publishes(self) -> None:
        d = self.f.ingest(b"bye")
        self.f.content.Delete(api.DeleteContentRequest(digest=d), metadata=self.f.md())
        envelope = self.f.events.get(1)
        assert envelope is not None
        self.assertEqual((envelope.namespace, envelope.topic), ("default", "/content/delete"))
        self.assertEqual(typeurl.unmarshal_any(envelope.event).digest, d)
        self.assertEqual(envelope.event.type_url, "containerd.events.ContentDelete")
        self.assertStatus(
            Code.NOT_FOUND,
            f"content digest {d}: not found",
            self.f.content.Delete,
            api.DeleteContentRequest(digest=d),
            metadata=self.f.md(),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            "invalid checksum digest format",
            self.f.content.Delete,
            api.DeleteContentRequest(digest="x"),
            metadata=self.f.md(),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            "unsupported digest algorithm",
            self.f.content.Delete,
            api.DeleteContentRequest(digest="sha512:" + "0" * 128),
            metadata=self.f.md(),
        )


class ReadTests(_Case):
    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom((1 << 20) * 2 + 100)
        self.d = self.f.ingest(self.data)

    def read(self, **kw: object) -> list[api.ReadContentResponse]:
        return list(self.f.content.Read(api.ReadContentRequest(digest=self.d, **kw), metadata=self.f.md()))  # type: ignore[arg-type]

    def test_whole_blob_in_mib_chunks_with_relative_offsets(self) -> None:
        chunks = self.read()
        self.assertEqual([len(c.data) for c in chunks], [1 << 20, 1 << 20, 100])
        self.assertEqual([c.offset for c in chunks], [0, 1 << 20, 2 << 20])
        self.assertEqual(b"".join(c.data for c in chunks), self.data)

    def test_offset_and_size(self) -> None:
        chunks = self.read(offset=10, size=5)
        self.assertEqual([(c.offset, c.data) for c in chunks], [(0, self.data[10:15])])
        chunks = self.read(offset=(1 << 20) + 7)
        self.assertEqual([c.offset for c in chunks], [0, 1 << 20])  # counted from the requested offset
        self.assertEqual(b"".join(c.data for c in chunks), self.data[(1 << 20) + 7 :])
        self.assertEqual(b"".join(c.data for c in self.read(offset=-5, size=3)), self.data[:3])
        self.assertEqual(b"".join(c.data for c in self.read(offset=len(self.data) - 2, size=100)), self.data[-2:])
        self.assertEqual(self.read(offset=len(self.data)), [])

    def test_errors(self) -> None:
        err = self.assertRaises(grpc.RpcError, self.read, offset=len(self.data) + 1)
        self.assertEqual(
            (err.code(), err.details()), (Code.OUT_OF_RANGE, f"read past object length {len(self.data)} bytes")
        )
        err = self.assertRaises(
            grpc.RpcError,
            lambda: list(self.f.content.Read(api.ReadContentRequest(digest="sha256:zz"), metadata=self.f.md())),
        )
        self.assertEqual(
            (err.code(), err.details()), (Code.INVALID_ARGUMENT, "sha256:zz: invalid checksum digest length")
        )
        err = self.assertRaises(
            grpc.RpcError,
            lambda: list(self.f.content.Read(api.ReadContentRequest(digest=self.d), metadata=self.f.md("x"))),
        )
        self.assertEqual((err.code(), err.details()), (Code.NOT_FOUND, f"content digest {self.d}: not found"))


class WriteTests(_Case):
    def test_session_responses(self) -> None:
        data = b"0123456789"
        d = digest_of(data)
        responses = self.f.write(
            [
                api.WriteContentRequest(action=api.STAT, ref="r", total=10, expected=d),
                api.WriteContentRequest(action=api.WRITE, offset=0, data=data[:4]),
                api.WriteContentRequest(action=api.WRITE, offset=4, data=data[4:]),
                api.WriteContentRequest(action=api.COMMIT, offset=10, total=10, expected=d, labels={"k": "v"}),
            ]
        )
        # one per request, then the last once more (containerd's deferred send)
        self.assertEqual(len(responses), 5)
        self.assertGreater(responses[0].started_at.seconds, 0)
        stat = responses[0]
        self.assertEqual((stat.action, stat.offset, stat.total, stat.digest), (api.STAT, 0, 10, digest_of(b"")))
        self.assertTrue(stat.HasField("started_at"))
        self.assertEqual([r.offset for r in responses[1:]], [4, 10, 10, 10])
        self.assertEqual([r.action for r in responses[1:]], [api.WRITE, api.WRITE, api.COMMIT, api.COMMIT])
        self.assertEqual(responses[2].digest, d)
        # fields set by the stat response persist in later ones
        self.assertEqual((responses[1].total, responses[1].started_at), (10, stat.started_at))
        self.assertEqual(responses[3], responses[4])
        info = self.f.content.Info(api.InfoRequest(digest=d), metadata=self.f.md()).info
        self.assertEqual(dict(info.labels), {"k": "v"})

    def test_end_of_stream_without_commit_keeps_ingest(self) -> None:
        responses = self.f.write(
            [api.WriteContentRequest(action=api.STAT, ref="r"), api.WriteContentRequest(action=api.WRITE, data=b"abc")]
        )
        self.assertEqual([r.offset for r in responses], [0, 3, 3])
        status = self.f.content.Status(api.StatusRequest(ref="r"), metadata=self.f.md()).status
        self.assertEqual((status.ref, status.offset), ("r", 3))
        statuses = self.f.content.ListStatuses(api.ListStatusesRequest(filters=["ref==r"]), metadata=self.f.md())
        self.assertEqual([s.ref for s in statuses.statuses], ["r"])
        # resumed by ref; offset 0 on a write truncates
        responses = self.f.write(
            [
                api.WriteContentRequest(action=api.STAT, ref="r"),
                api.WriteContentRequest(action=api.WRITE, offset=3, data=b"def"),
                api.WriteContentRequest(action=api.WRITE, offset=0, data=b"xy"),
            ]
        )
        self.assertEqual([r.offset for r in responses], [3, 6, 2, 2])

    def test_offset_must_match(self) -> None:
        err = self.assertRaises(
            grpc.RpcError,
            self.f.write,
            [
                api.WriteContentRequest(action=api.STAT, ref="r"),
                api.WriteContentRequest(action=api.WRITE, offset=5, data=b"x"),
            ],
        )
        self.assertEqual((err.code(), err.details()), (Code.OUT_OF_RANGE, "write @5 must occur at current offset 0"))

    def test_first_message_needs_a_ref(self) -> None:
        err = self.assertRaises(grpc.RpcError, self.f.write, [api.WriteContentRequest(action=api.STAT)])
        self.assertEqual((err.code(), err.details()), (Code.INVALID_ARGUMENT, "first message must have a reference"))
        err = self.assertRaises(grpc.RpcError, self.f.write, [])
        self.assertEqual((err.code(), err.details()), (Code.UNKNOWN, "EOF"))
        err = self.assertRaises(grpc.RpcError, self.f.write, [api.WriteContentRequest(ref="r")], None)
        self.assertEqual(
            (err.code(), err.details()), (Code.FAILED_PRECONDITION, "namespace is required: failed precondition")
        )

    def test_commit_size_and_digest_checks(self) -> None:
        data = b"abcdef"
        err = self.assertRaises(
            grpc.RpcError,
            self.f.write,
            [api.WriteContentRequest(ref="r", action=api.COMMIT, data=data, total=5)],
        )
        self.assertEqual(
            (err.code(), err.details()),
            (Code.FAILED_PRECONDITION, '"r" failed size validation: 6 != 5: failed precondition'),
        )
        wrong = digest_of(b"other")
        err = self.assertRaises(
            grpc.RpcError,
            self.f.write,
            [api.WriteContentRequest(ref="r", action=api.COMMIT, offset=6, expected=wrong)],
        )
        self.assertEqual(err.code(), Code.FAILED_PRECONDITION)
        self.assertEqual(
            err.details(), f"unexpected commit digest {digest_of(data)}, expected {wrong}: failed precondition"
        )
        # a writer larger than the expected size fails at commit, the ingest is kept
        status = self.f.content.Status(api.StatusRequest(ref="r"), metadata=self.f.md()).status
        self.assertEqual(status.offset, 6)

    def test_expected_digest_already_present(self) -> None:
        d = self.f.ingest(b"have")
        err = self.assertRaises(
            grpc.RpcError, self.f.write, [api.WriteContentRequest(action=api.STAT, ref="again", expected=d)]
        )
        self.assertEqual((err.code(), err.details()), (Code.ALREADY_EXISTS, f"content {d}: already exists"))
        # named only on the commit message: the ingest is aborted
        err = self.assertRaises(
            grpc.RpcError,
            self.f.write,
            [
                api.WriteContentRequest(action=api.STAT, ref="late"),
                api.WriteContentRequest(action=api.COMMIT, data=b"have", expected=d),
            ],
        )
        self.assertEqual((err.code(), err.details()), (Code.ALREADY_EXISTS, f"blob with expected digest {d} exists"))
        self.assertEqual(self.f.content.ListStatuses(api.ListStatusesRequest(), metadata=self.f.md()).statuses, [])

    def test_locked_ref_is_unavailable(self) -> None:
        w = self.f.store.writer("default", "busy")
        self.addCleanup(w.close)
        err = self.assertRaises(grpc.RpcError, self.f.write, [api.WriteContentRequest(action=api.STAT, ref="busy")])
        self.assertEqual(err.code(), Code.UNAVAILABLE)
        self.assertRegex(err.details(), r"^ref default/1/busy locked for .* \(since .*\): unavailable$")

    def test_client_cancel_releases_the_ref(self) -> None:
        import queue

        q: queue.Queue[api.WriteContentRequest | None] = queue.Queue()
        q.put(api.WriteContentRequest(action=api.STAT, ref="c"))
        call = self.f.content.Write(iter(q.get, None), metadata=self.f.md())
        self.assertEqual(next(call).offset, 0)
        q.put(api.WriteContentRequest(action=api.WRITE, data=b"part"))
        self.assertEqual(next(call).offset, 4)
        call.cancel()
        q.put(None)
        for _ in range(100):
            try:
                self.f.store.writer("default", "c").close()
                break
            except Exception:
                import time

                time.sleep(0.05)
        else:
            self.fail("ref still locked after the client went away")
        self.assertEqual(self.f.store.status("default", "c").offset, 4)

    def test_hostile_refs_stay_inside_the_store(self) -> None:
        refs = ["../../../../etc/passwd", "/abs/path", "a/../../b", "\x00nul", "ünï", "..", "a" * 5000]
        for ref in refs:
            self.f.write([api.WriteContentRequest(action=api.WRITE, ref=ref, data=b"x")])
        statuses = self.f.content.ListStatuses(api.ListStatusesRequest(), metadata=self.f.md()).statuses
        self.assertEqual(sorted(s.ref for s in statuses), sorted(refs))
        names = os.listdir(os.path.join(self.f.backend.root, "ingest"))
        self.assertEqual(len(names), len(refs))
        for name in names:
            self.assertRegex(name, r"^[0-9a-f]{64}$")
        self.assertEqual(
            sorted(os.listdir(self.f.tmp)), ["content", "meta.sqlite", "meta.sqlite-shm", "meta.sqlite-wal", "s.sock"]
        )
        self.assertFalse(os.path.exists("/abs/path"))
        for ref in refs:
            self.f.content.Abort(api.AbortRequest(ref=ref), metadata=self.f.md())
        self.assertEqual(os.listdir(os.path.join(self.f.backend.root, "ingest")), [])

    def test_lease_header(self) -> None:
        self.f.lease_stub.Create(lapi.CreateRequest(id="l"), metadata=self.f.md())
        self.f.write(
            [api.WriteContentRequest(action=api.STAT, ref="r"), api.WriteContentRequest(action=api.WRITE, data=b"x")],
            lease="l",
        )
        listed = self.f.lease_stub.ListResources(lapi.ListResourcesRequest(id="l"), metadata=self.f.md())
        self.assertEqual([(r.type, r.id) for r in listed.resources], [("ingests", "r")])
        self.f.write([api.WriteContentRequest(action=api.COMMIT, ref="r", offset=1)], lease="l")
        listed = self.f.lease_stub.ListResources(lapi.ListResourcesRequest(id="l"), metadata=self.f.md())
        self.assertEqual([(r.type, r.id) for r in listed.resources], [("content", digest_of(b"x"))])
        err = self.assertRaises(
            grpc.RpcError, self.f.write, [api.WriteContentRequest(action=api.STAT, ref="r2")], "default", "missing"
        )
        self.assertEqual((err.code(), err.details()), (Code.NOT_FOUND, "lease does not exist: not found"))


class StatusAbortTests(_Case):
    def test_status_not_found_message(self) -> None:
        self.assertStatus(
            Code.NOT_FOUND,
            'could not get status for ref "nope": reference nope: not found',
            self.f.content.Status,
            api.StatusRequest(ref="nope"),
            metadata=self.f.md(),
        )
        self.assertStatus(
            Code.FAILED_PRECONDITION,
            'could not get status for ref "x": namespace is required: failed precondition',
            self.f.content.Status,
            api.StatusRequest(ref="x"),
            metadata=self.f.md(None),
        )

    def test_abort(self) -> None:
        self.f.write([api.WriteContentRequest(action=api.WRITE, ref="r", data=b"abc")])
        self.f.content.Abort(api.AbortRequest(ref="r"), metadata=self.f.md())
        self.assertFalse(os.path.exists(self.f.backend.ingest_root(backend_ref("default", "r"))))
        self.assertStatus(
            Code.NOT_FOUND,
            "reference r: not found",
            self.f.content.Abort,
            api.AbortRequest(ref="r"),
            metadata=self.f.md(),
        )

    def test_list_statuses_filter_error(self) -> None:
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            "filters: parse error: [ref==]: expected value or quoted: invalid argument",
            self.f.content.ListStatuses,
            api.ListStatusesRequest(filters=["ref=="]),
            metadata=self.f.md(),
        )


class WireTests(_Case):
    def test_unset_times_are_gos_zero_time(self) -> None:
        responses = self.f.write([api.WriteContentRequest(action=api.WRITE, ref="z", data=b"x")])
        self.assertEqual([r.started_at.seconds for r in responses], [-62135596800] * 2)
        self.assertEqual([r.updated_at.seconds for r in responses], [-62135596800] * 2)


class AccessCacheTests(_Case):
    def test_read_after_delete_is_not_found(self) -> None:
        d = self.f.ingest(b"cached")
        other = self.f.ingest(b"other", ref="o")
        read = lambda digest: b"".join(  # noqa: E731
            r.data for r in self.f.content.Read(api.ReadContentRequest(digest=digest), metadata=self.f.md())
        )
        self.assertEqual(read(d), b"cached")
        self.assertEqual(read(d), b"cached")
        self.f.content.Delete(api.DeleteContentRequest(digest=d), metadata=self.f.md())
        err = self.assertRaises(grpc.RpcError, read, d)
        self.assertEqual(err.code(), Code.NOT_FOUND)
        self.assertEqual(read(other), b"other")
        # a record the GC sweeps away invalidates too
        self.f.collector.garbage_collect()
        err = self.assertRaises(grpc.RpcError, read, other)
        self.assertEqual(err.code(), Code.NOT_FOUND)
