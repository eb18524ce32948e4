# -*- test-case-name: tests.test_proxy -*-
"""A content store that forwards every call to another process's Content API.

containerd's ``content/proxy``, offering the blocking interface of
:class:`~cdtwist.content.local.LocalStore` that the namespaced metadata
store wraps: blobs read through ``Read`` streams, ingests written through
one ``Write`` stream per writer (a synchronous request/response cycle per
operation, as the Go ``remoteWriter`` does).  Every method blocks on the
network: callers are on pool threads.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from cdtwist.api.services.content.v1 import content_pb2 as api
from cdtwist.api.services.content.v1 import content_pb2_grpc as api_grpc
from cdtwist.content.local import Info, Status
from cdtwist.content.wire import from_timestamp, info_from_grpc, info_to_grpc, status_from_grpc
from cdtwist.errors import CdtwistError, FailedPrecondition
from cdtwist.proxy.channel import ProxyClient, rpc_error
from cdtwist.snapshots import wrap_error

#: ``iter_chunks`` asks the peer for the whole range in one stream; this
#: bounds one ``read_at`` instead (containerd reads in the caller's sizes).
_READ_CHUNK = 1 << 20


class ProxyContentStore(ProxyClient[api_grpc.ContentStub]):
    """The backend interface of :class:`~cdtwist.content.local.LocalStore`, over a :class:`ProxyChannel`."""

    stub_class = api_grpc.ContentStub

    # -- blobs ----------------------------------------------------------------

    def info(self, digest: str) -> Info:
        return info_from_grpc(self._call(lambda s: s.Info(api.InfoRequest(digest=digest))).info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = api.UpdateRequest(info=info_to_grpc(info), update_mask=field_mask_pb2.FieldMask(paths=fieldpaths))
        return info_from_grpc(self._call(lambda s: s.Update(req)).info)

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        for resp in self._stream(lambda s: s.List(api.ListContentRequest(filters=filters))):
            for info in resp.info:
                fn(info_from_grpc(info))

    def delete(self, digest: str) -> None:
        self._call(lambda s: s.Delete(api.DeleteContentRequest(digest=digest)))

    def reader(self, digest: str) -> ProxyReaderAt:
        """``ReaderAt``: the blob's size from ``Info``, bytes from ``Read`` streams."""
        return ProxyReaderAt(self, digest, self.info(digest).size)

    # -- ingests --------------------------------------------------------------

    def status(self, ref: str) -> Status:
        return status_from_grpc(self._call(lambda s: s.Status(api.StatusRequest(ref=ref))).status)

    def list_statuses(self, *filters: str) -> list[Status]:
        resp = self._call(lambda s: s.ListStatuses(api.ListStatusesRequest(filters=filters)))
        return [status_from_grpc(st) for st in resp.statuses]

    def walk_status_refs(self, fn: Callable[[str], object]) -> None:
        for status in self.list_statuses():
            fn(status.ref)

    def abort(self, ref: str) -> None:
        self._call(lambda s: s.Abort(api.AbortRequest(ref=ref)))

    def writer(self, ref: str, total: int = 0, expected: str = "") -> ProxyWriter:
        """Open a ``Write`` session and learn where the ingest stands (containerd's ``negotiate``)."""
        writer = ProxyWriter(self, ref)
        try:
            resp = writer.send(api.WriteContentRequest(action=api.STAT, ref=ref, total=total, expected=expected))
        except BaseException:
            writer.close()
            raise
        writer.offset = resp.offset
        writer.total = resp.total
        return writer


class ProxyReaderAt:
    """A remote blob read by position; each read is one ``Read`` stream."""

    def __init__(self, store: ProxyContentStore, digest: str, size: int) -> None:
        self.store = store
        self.digest = digest
        #: what errors name, as a local reader names its file
        self.path = digest
        self.size = size

    def _read(self, offset: int, n: int) -> Iterator[bytes]:
        req = api.ReadContentRequest(digest=self.digest, offset=offset, size=n)
        for resp in self.store._stream(lambda s: s.Read(req)):
            yield resp.data

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer only at the end of the blob."""
        if offset < 0:
            raise CdtwistError(f"readat {self.digest}: negative offset")
        n = min(n, self.size - offset)
        if n <= 0:
            return b""
        return b"".join(self._read(offset, n))

    def iter_chunks(self, offset: int = 0, size: int = -1, chunk_size: int = _READ_CHUNK) -> Iterator[bytes]:
        end = self.size if size < 0 else min(self.size, offset + size)
        if offset >= end:
            return
        pending = b""
        for data in self._read(offset, end - offset):
            pending += data
            while len(pending) >= chunk_size:
                yield pending[:chunk_size]
                pending = pending[chunk_size:]
        if pending:
            yield pending

    def read_all(self) -> bytes:
        return self.read_at(0, self.size)

    def close(self) -> None:
        """Nothing is held between reads."""

    def __enter__(self) -> ProxyReaderAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class ProxyWriter:
    """One ``Write`` session: every operation sends a request and waits for its response."""

    def __init__(self, store: ProxyContentStore, ref: str) -> None:
        self.store = store
        self.ref = ref
        self.offset = 0
        self.total = 0
        self._digest = ""
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: Any = store._call(lambda s: s.Write(iter(self._requests.get, _END)))
        self._closed = False

    def send(self, req: api.WriteContentRequest) -> api.WriteContentResponse:
        if self._closed:
            raise FailedPrecondition(f"writer {self.ref} is closed")
        self._requests.put(req)
        try:
            resp = next(self._responses)
        except StopIteration:
            raise CdtwistError("EOF") from None
        except grpc.RpcError as e:
            self._closed = True
            raise rpc_error(e) from None
        if resp.digest:
            self._digest = resp.digest
        return resp

    def status(self) -> Status:
        try:
            resp = self.send(api.WriteContentRequest(action=api.STAT))
        except CdtwistError as e:
            raise wrap_error("error getting writer status", e) from None
        return Status(
            ref=self.ref,
            offset=resp.offset,
            total=resp.total,
            started_at=from_timestamp(resp.started_at) or 0,
            updated_at=from_timestamp(resp.updated_at) or 0,
        )

    def digest(self) -> str:
        return self._digest

    def write(self, data: bytes | bytearray | memoryview) -> int:
        resp = self.send(api.WriteContentRequest(action=api.WRITE, offset=self.offset, data=bytes(data)))
        n = resp.offset - self.offset
        self.offset += n
        if n < len(data):
            raise CdtwistError("short write")
        return n

    def truncate(self, size: int) -> None:
        # As the Go client: checked by the peer only at the next write.
        self.offset = size

    def commit(self, size: int = 0, expected: str = "", labels: dict[str, str] | None = None) -> None:
        try:
            resp = self.send(
                api.WriteContentRequest(
                    action=api.COMMIT, total=size, offset=self.offset, expected=expected, labels=labels or {}
                )
            )
            if size != 0 and resp.offset != size:
                raise CdtwistError(f"unexpected size: {resp.offset} != {size}")
            if expected and resp.digest != expected:
                raise CdtwistError(f"unexpected digest: {resp.digest} != {expected}")
            self._digest = resp.digest
            self.offset = resp.offset
        finally:
            self.close()

    def close(self) -> None:
        """End the session (half-close) and wait for the peer to finish it.

        Waiting matters: the peer releases the ingest only as its handler
        ends, and an ``abort`` sent right after must find it released.
        """
        if self._requests is None:
            return
        self._closed = True
        self._requests.put(_END)
        self._requests = None  # type: ignore[assignment]
        responses, self._responses = self._responses, None
        if responses is None:
            return
        try:
            # The peer answers the end of the stream with its last response once more.
            for _ in responses:
                pass
        except grpc.RpcError:
            pass  # the session had failed already; nothing left to release

    def __enter__(self) -> ProxyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
