# -*- test-case-name: tests.test_content_service -*-
"""``containerd.services.content.v1.Content`` (containerd's ``services/content``).

``content-service`` is the namespaced metadata store plus the
``/content/delete`` event; the ``content`` gRPC plugin serves it with the
exact behaviour of containerd's ``contentserver``: its messages, status
codes, offsets relative to the request in ``Read``, and the ``Write``
stream's quirks (a session's response fields persist from message to
message, and the last response is sent once more when the session ends).

Handlers run on gRPC pool threads and block on disk and database there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from cdtwist.api.events import content_pb2 as events
from cdtwist.api.services.content.v1 import content_pb2 as api
from cdtwist.api.services.content.v1 import content_pb2_grpc as api_grpc
from cdtwist.content.local import Info, validate_digest
from cdtwist.content.wire import info_to_grpc, timestamp
from cdtwist.errors import Canceled, CdtwistError, GRPCStatus, NotFound
from cdtwist.events.exchange import Exchange
from cdtwist.filters import quote
from cdtwist.grpc import context as callctx
from cdtwist.log import get_logger
from cdtwist.metadata.content import NamespacedContentStore, NamespacedWriter
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.plugin import EVENT, GRPC, METADATA, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

SERVICE_ID = "content-service"
#: Read sends at most this much per message (containerd's 1 MiB buffer pool).
READ_CHUNK = 1 << 20
#: List sends infos in blocks of this many.
LIST_BLOCK = 100


__all__ = ["ContentGRPC", "ContentService", "ContentServicer", "info_to_grpc", "timestamp"]


def wrapf(err: BaseException, prefix: str) -> BaseException:
    """``errdefs.ToGRPCf``: ``"<prefix>: <err>"``, keeping the error's class."""
    if isinstance(err, GRPCStatus):
        return err
    if isinstance(err, CdtwistError) and type(err).text:
        context = f"{prefix}: {err.context}" if err.context else prefix
        return type(err)(context)
    return CdtwistError(f"{prefix}: {err}")


class ContentService:
    """The ``content-service`` plugin: the metadata content store, publishing deletes."""

    def __init__(self, store: NamespacedContentStore, exchange: Exchange) -> None:
        self.store = store
        self.exchange = exchange

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        self.store.delete(namespace, digest, lease)
        self.exchange.publish(namespace, "/content/delete", events.ContentDelete(digest=digest))


def _validate(digest: str) -> str | None:
    try:
        validate_digest(digest)
    except ValueError as e:
        return str(e)
    return None


class ContentServicer(api_grpc.ContentServicer):
    """containerd's ``contentserver``, handler for handler.

    The namespace comes from the call (``namespace_of``); a server of a
    store without namespaces (``cdtwist serve-plugin content``) replaces
    that lookup, the rest is the same code, as containerd reuses it too.
    """

    namespace_of = staticmethod(callctx.namespace_required)

    def __init__(self, service: ContentService) -> None:
        self.service = service
        self.store = service.store

    def Info(self, request: api.InfoRequest, context: grpc.ServicerContext) -> api.InfoResponse:  # noqa: N802
        if _validate(request.digest) is not None:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, f"{quote(request.digest)} failed validation")
        namespace = self.namespace_of(context)
        return api.InfoResponse(info=info_to_grpc(self.store.info(namespace, request.digest)))

    def Update(self, request: api.UpdateRequest, context: grpc.ServicerContext) -> api.UpdateResponse:  # noqa: N802
        if _validate(request.info.digest) is not None:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, f"{quote(request.info.digest)} failed validation")
        namespace = self.namespace_of(context)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = Info(
            digest=request.info.digest,
            size=request.info.size,
            labels=dict(request.info.labels),
        )
        updated = self.store.update(namespace, info, *paths)
        return api.UpdateResponse(info=info_to_grpc(updated))

    def List(  # noqa: N802
        self, request: api.ListContentRequest, context: grpc.ServicerContext
    ) -> Iterator[api.ListContentResponse]:
        namespace = self.namespace_of(context)
        infos = self.store.walk(namespace, *request.filters)
        for start in range(0, len(infos), LIST_BLOCK):
            # containerd's List leaves updated_at out.
            block = [info_to_grpc(info, updated=False) for info in infos[start : start + LIST_BLOCK]]
            yield api.ListContentResponse(info=block)

    def Delete(self, request: api.DeleteContentRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        log.debug("delete content", digest=request.digest)
        problem = _validate(request.digest)
        if problem is not None:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, problem)
        namespace = self.namespace_of(context)
        self.service.delete(namespace, request.digest, callctx.lease(context))
        return empty_pb2.Empty()

    def Read(  # noqa: N802
        self, request: api.ReadContentRequest, context: grpc.ServicerContext
    ) -> Iterator[api.ReadContentResponse]:
        problem = _validate(request.digest)
        if problem is not None:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, f"{request.digest}: {problem}")
        namespace = self.namespace_of(context)
        # containerd looks the blob up twice (Info, then ReaderAt's access
        # check); one lookup answers both and keeps small reads cheap.
        blob_size, reader = self.store.open(namespace, request.digest)
        with reader:
            offset = max(request.offset, 0)
            size = request.size
            if offset > blob_size:
                raise GRPCStatus(grpc.StatusCode.OUT_OF_RANGE, f"read past object length {blob_size} bytes")
            if size <= 0 or offset + size > blob_size:
                size = blob_size - offset
            sent = 0  # containerd's response offsets count from the requested offset
            for chunk in reader.iter_chunks(offset, size, READ_CHUNK):
                yield api.ReadContentResponse(offset=sent, data=chunk)
                sent += len(chunk)

    def Status(self, request: api.StatusRequest, context: grpc.ServicerContext) -> api.StatusResponse:  # noqa: N802
        try:
            namespace = self.namespace_of(context)
            status = self.store.status(namespace, request.ref)
        except Exception as e:
            raise wrapf(e, f"could not get status for ref {quote(request.ref)}") from None
        out = api.Status(ref=status.ref, offset=status.offset, total=status.total, expected=status.expected)
        out.started_at.CopyFrom(timestamp(status.started_at))
        out.updated_at.CopyFrom(timestamp(status.updated_at))
        return api.StatusResponse(status=out)

    def ListStatuses(  # noqa: N802
        self, request: api.ListStatusesRequest, context: grpc.ServicerContext
    ) -> api.ListStatusesResponse:
        namespace = self.namespace_of(context)
        response = api.ListStatusesResponse()
        for status in self.store.list_statuses(namespace, *request.filters):
            out = response.statuses.add(
                ref=status.ref, offset=status.offset, total=status.total, expected=status.expected
            )
            out.started_at.CopyFrom(timestamp(status.started_at))
            out.updated_at.CopyFrom(timestamp(status.updated_at))
        return response

    def Write(  # noqa: N802
        self, request_iterator: Iterable[api.WriteContentRequest], context: grpc.ServicerContext
    ) -> Iterator[api.WriteContentResponse]:
        requests = iter(request_iterator)
        try:
            req = next(requests)
        except StopIteration:
            raise CdtwistError("EOF") from None
        ref = req.ref
        if not ref:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, "first message must have a reference")
        total = req.total
        expected = req.expected
        try:
            namespace = self.namespace_of(context)
            lease = callctx.lease(context)
            writer = self.store.writer(namespace, ref, total, expected, lease)
        except Exception as e:
            _log_write_failure(e, ref)
            raise
        msg = api.WriteContentResponse(started_at=timestamp(None), updated_at=timestamp(None))
        try:
            yield from self._session(writer, namespace, lease, ref, req, requests, msg, total, expected)
        except Exception as e:
            _log_write_failure(e, ref)
            raise
        finally:
            # Also when the client goes away mid-stream (GeneratorExit): the
            # ingest stays, its ref is released for the next writer.
            try:
                writer.close()
            except Exception as e:
                log.error("failed to close writer", error=str(e), ref=ref)
        # containerd's deferred send: the session's last response once more.
        yield _copy(msg)

    def _session(
        self,
        writer: NamespacedWriter,
        namespace: str,
        lease: str | None,
        ref: str,
        req: api.WriteContentRequest,
        requests: Iterator[api.WriteContentRequest],
        msg: api.WriteContentResponse,
        total: int,
        expected: str,
    ) -> Iterator[api.WriteContentResponse]:
        """One response per request until a commit or the client's end of stream.

        ``msg`` keeps fields from earlier responses, as Go's does.
        """
        while True:
            msg.action = req.action
            status = writer.status()
            msg.offset = status.offset
            if req.expected:
                if expected and expected != req.expected:
                    log.debug(f"commit digest differs from writer digest: {req.expected} != {expected}")
                expected = req.expected
                try:
                    self.store.info(namespace, req.expected)
                except NotFound:
                    pass
                else:
                    try:
                        writer.close()
                    except Exception as e:
                        log.error("failed to close writer", error=str(e))
                    try:
                        self.store.abort(namespace, ref, lease)
                    except Exception as e:
                        log.error("failed to abort write", error=str(e))
                    raise GRPCStatus(grpc.StatusCode.ALREADY_EXISTS, f"blob with expected digest {req.expected} exists")
            if req.total > 0:
                if total > 0 and req.total != total:
                    log.debug(f"commit size differs from writer size: {req.total} != {total}")
                total = req.total

            if req.action == api.STAT:
                msg.digest = writer.digest()
                msg.started_at.CopyFrom(timestamp(status.started_at))
                msg.updated_at.CopyFrom(timestamp(status.updated_at))
                msg.total = total
            elif req.action in (api.WRITE, api.COMMIT):
                if req.offset > 0 and req.offset != status.offset:
                    raise GRPCStatus(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"write @{req.offset} must occur at current offset {status.offset}",
                    )
                if req.offset == 0 and status.offset > 0:
                    try:
                        writer.truncate(0)
                    except Exception as e:
                        raise CdtwistError(f"truncate failed: {e}") from None
                    msg.offset = 0
                if req.data:
                    n = writer.write(req.data)
                    if n != len(req.data):
                        raise GRPCStatus(grpc.StatusCode.DATA_LOSS, f"wrote {n} of {len(req.data)} bytes")
                    msg.offset += n
                if req.action == api.COMMIT:
                    labels = dict(req.labels) if req.labels else None
                    writer.commit(total, expected, labels, lease)
                msg.digest = writer.digest()

            yield _copy(msg)
            if req.action == api.COMMIT:
                return
            try:
                req = next(requests)
            except StopIteration:
                return
            except grpc.RpcError:
                # grpcio's way of saying the client went away
                raise Canceled() from None

    def Abort(self, request: api.AbortRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        namespace = self.namespace_of(context)
        self.store.abort(namespace, request.ref, callctx.lease(context))
        return empty_pb2.Empty()


def _copy(msg: api.WriteContentResponse) -> api.WriteContentResponse:
    out = api.WriteContentResponse()
    out.CopyFrom(msg)
    return out


def _log_write_failure(err: BaseException, ref: str) -> None:
    code = getattr(err, "code", None)
    if code != grpc.StatusCode.ALREADY_EXISTS:
        log.error("(*service).Write failed", error=str(err), ref=ref)


class ContentGRPC:
    """The ``io.containerd.grpc.v1.content`` plugin."""

    def __init__(self, service: ContentService) -> None:
        self.servicer = ContentServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_ContentServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> ContentService:
    metadata: MetadataPlugin = ic.get(METADATA)
    return ContentService(metadata.content_store(), ic.get(EVENT))


def _init_grpc(ic: InitContext) -> ContentGRPC:
    return ContentGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, requires=(EVENT, METADATA), init=_init_service))
register(Registration(type=GRPC, id="content", requires=(SERVICE,), init=_init_grpc))
