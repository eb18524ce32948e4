# -*- test-case-name: tests.test_ttrpc_protocol,tests.test_ttrpc_interop -*-
"""A ttrpc server that answers exactly like github.com/containerd/ttrpc's.

Services are described by protobuf service descriptors, so any compiled
``.proto`` service is served without glue: :meth:`Services.register` takes
the descriptor (or its full name) and an object with one method per rpc.

Handler shapes (every one may return a value, a Deferred or a coroutine):

* unary ``rpc M(Req) returns (Resp)``: ``M(request, ctx) -> Resp``;
* streaming (client, server or both): ``M(stream, ctx)``, where
  :class:`ServerStream` has ``recv()`` (Deferred of the next message, None
  once the client closed its side) and ``send(msg)``.  For server-only
  streaming the request is the first ``recv()``, as in Go.  The return
  value is the Response payload for client-only streaming; for server
  streaming the stream ends with ``Data[REMOTE_CLOSED|NO_DATA]`` (or with
  the returned message, if any).

Errors: a :class:`~cdtwist.errors.CdtwistError` keeps its code and message;
anything else becomes UNKNOWN with ``str(err)`` (Go's ``convertCode``
fallback).  A deadline (``timeout_nano``) or a lost connection cancels the
handler's Deferred, so handlers that wait on cancellable Deferreds stop
early, and the caller sees DEADLINE_EXCEEDED "context deadline exceeded".
Blocking work belongs in ``deferToThread``; whatever thread fires the
result, frames are written on the reactor thread.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import iscoroutine
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python import threadable
from twisted.python.failure import Failure

from cdtwist.api.ttrpc import request_pb2
from cdtwist.errors import CdtwistError, DeadlineExceeded, to_grpc_code
from cdtwist.log import get_logger
from cdtwist.sockets import prepare_unix_path, secure_socket
from cdtwist.ttrpc.framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    MESSAGE_LENGTH_MAX,
    Frame,
    MessageType,
    OversizedFrame,
    oversized_message,
)
from cdtwist.ttrpc.protocol import FramedProtocol, PeerCredentials, peer_credentials
from cdtwist.ttrpc.status import StatusError, status_proto

__all__ = [
    "NAMESPACE_KEY",
    "REQUIRE_SAME_USER",
    "CallContext",
    "ServerStream",
    "Services",
    "TTRPCServerFactory",
    "TTRPCServerProtocol",
    "listen_ttrpc",
    "status_from_error",
]

log = get_logger(__name__)

#: containerd's ``namespaces/ttrpc.go`` metadata key.
NAMESPACE_KEY = "containerd-namespace-ttrpc"
#: Messages a stream may queue before the peer is told it is full (Go 1.2 buffers a handful, then fails).
STREAM_BUFFER = 64


class _SameUser:
    def __repr__(self) -> str:
        return "REQUIRE_SAME_USER"


#: Go's ``UnixSocketRequireSameUser()``: peer uid and gid must equal our euid/egid.
REQUIRE_SAME_USER: Any = _SameUser()

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def status_from_error(err: BaseException) -> status_pb2.Status:
    """What the Go server sends for a handler error (``serviceSet.call`` + ``convertCode``)."""
    if isinstance(err, CdtwistError):
        return status_proto(err.code, err.message)
    if isinstance(err, CancelledError):
        return status_proto(grpc.StatusCode.CANCELLED, "context canceled")
    code = to_grpc_code(err)
    if code is grpc.StatusCode.UNKNOWN:
        if isinstance(err, PermissionError):
            code = grpc.StatusCode.PERMISSION_DENIED
        elif isinstance(err, EOFError):
            code = grpc.StatusCode.OUT_OF_RANGE
    return status_proto(code, str(err))


# ---------------------------------------------------------------------------
# Service registry


@dataclass(frozen=True, slots=True)
class _Method:
    service: str
    name: str
    handler: Callable[..., Any] | None
    request_cls: type[Message]
    response_cls: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming


class Services:
    """Registered services by full proto name (Go's ``serviceSet``)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._services: dict[str, dict[str, _Method]] = {}

    def register(self, service: ServiceDescriptor | str, implementation: object) -> None:
        """Serve ``service`` with ``implementation``'s methods of the same names.

        Missing methods answer UNIMPLEMENTED "method X", as an unregistered
        one would in Go; registering a name twice is a bug (Go panics).
        """
        desc = self._pool.FindServiceByName(service) if isinstance(service, str) else service
        if desc.full_name in self._services:
            raise ValueError(f"duplicate service {desc.full_name} registered")
        methods: dict[str, _Method] = {}
        for m in desc.methods:
            methods[m.name] = self._method(desc.full_name, m, getattr(implementation, m.name, None))
        self._services[desc.full_name] = methods

    @staticmethod
    def _method(service: str, m: MethodDescriptor, handler: Callable[..., Any] | None) -> _Method:
        return _Method(
            service,
            m.name,
            handler if callable(handler) else None,
            message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type),
            m.client_streaming,
            m.server_streaming,
        )

    def __contains__(self, name: object) -> bool:
        return name in self._services

    def names(self) -> list[str]:
        return sorted(self._services)

    def resolve(self, service: str, method: str) -> _Method:
        """The method, or StatusError UNIMPLEMENTED with Go's text."""
        methods = self._services.get(service)
        if methods is None:
            raise StatusError(grpc.StatusCode.UNIMPLEMENTED, f"service {service}")
        m = methods.get(method)
        if m is None or m.handler is None:
            raise StatusError(grpc.StatusCode.UNIMPLEMENTED, f"method {method}")
        return m


# ---------------------------------------------------------------------------
# Per-call context


@dataclass(eq=False)
class CallContext:
    """What Go keeps in a handler's ``context.Context``: metadata, deadline, peer."""

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]] = field(default_factory=dict)
    timeout_nano: int = 0
    #: Absolute deadline in ``reactor.seconds()`` terms, or None.
    deadline: float | None = None
    peer: PeerCredentials | None = None
    clock: IReactorTime | None = None
    #: Set when the deadline passed (the handler was cancelled for it).
    deadline_exceeded: bool = False
    #: Set when the call was cancelled (deadline or lost connection).
    cancelled: bool = False

    @property
    def full_method(self) -> str:
        """``/service/method``, the interceptor ``FullMethod``."""
        return f"/{self.service}/{self.method}"

    def get(self, key: str) -> str | None:
        """First value for ``key`` like Go's ``GetMetadataValue`` (looks up the lowercased key)."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace (``namespaces.NamespaceFromContext`` over ttrpc)."""
        return self.get(NAMESPACE_KEY)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed), None without one."""
        if self.deadline is None or self.clock is None:
            return None
        return self.deadline - self.clock.seconds()


class ServerStream:
    """One streaming call, server side (Go's ``StreamServer``)."""

    def __init__(self, proto: TTRPCServerProtocol, stream_id: int, method: _Method, ctx: CallContext) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self._method = method
        self.ctx = ctx
        self._queue: deque[Message] = deque()
        self._waiters: deque[Deferred[Message | None]] = deque()
        self.remote_closed = False
        self.local_closed = False
        self._error: BaseException | None = None

    # -- receive side (from the client) --

    def _push(self, payload: bytes) -> None:
        msg = self._method.request_cls()
        try:
            msg.ParseFromString(payload)
        except DecodeError as e:
            self._fail_waiters_or_queue(
                StatusError(grpc.StatusCode.INTERNAL, f"ttrpc: error unmarshalling payload: {e}")
            )
            return
        if self._waiters:
            self._waiters.popleft().callback(msg)
        else:
            self._queue.append(msg)

    def _fail_waiters_or_queue(self, err: BaseException) -> None:
        if self._waiters:
            self._waiters.popleft().errback(Failure(err))
        else:
            self._error = err

    def _close_send(self) -> None:
        if self.remote_closed:
            return
        self.remote_closed = True
        while self._waiters and not self._queue:
            self._waiters.popleft().callback(None)

    def _abort(self, err: BaseException) -> None:
        self._error = err
        self.remote_closed = True
        while self._waiters:
            self._waiters.popleft().errback(Failure(err))

    @property
    def full(self) -> bool:
        return len(self._queue) >= STREAM_BUFFER

    def recv(self) -> Deferred[Message | None]:
        """The next client message; None after the client's CloseSend (Go's ``io.EOF``)."""
        if self._queue:
            return succeed(self._queue.popleft())
        if self._error is not None:
            err, self._error = self._error, None
            return fail(err)
        if self.remote_closed:
            return succeed(None)
        d: Deferred[Message | None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Message:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    # -- send side (to the client) --

    def send(self, msg: Message) -> None:
        """Write one ``Data`` frame now (Go's ``SendMsg``)."""
        if self.local_closed:
            raise CdtwistError("ttrpc: stream closed")
        if not self._method.server_streaming:
            raise CdtwistError("ttrpc: method is not server-streaming")
        self._proto._send_data(self.stream_id, msg.SerializeToString(), 0)


# ---------------------------------------------------------------------------
# Protocol


@dataclass(eq=False)
class _Call:
    ctx: CallContext
    method: _Method
    deferred: Deferred[Any] | None = None
    timer: Any = None
    stream: ServerStream | None = None


def _invoke(fn: Callable[..., Any], *args: object) -> Deferred[Any]:
    """Run a handler; values, Deferreds and coroutines all come back as a Deferred."""
    try:
        result = fn(*args)
    except BaseException:
        return fail()
    if isinstance(result, Deferred):
        return result
    if iscoroutine(result):
        return ensureDeferred(result)
    return succeed(result)


class TTRPCServerProtocol(FramedProtocol):
    """One accepted connection: Go's ``serverConn.run`` on the reactor."""

    def __init__(
        self,
        services: Services,
        *,
        reactor: Any = None,
        require_peer: tuple[int, int] | None = None,
        max_length: int = MESSAGE_LENGTH_MAX,
    ) -> None:
        super().__init__(max_length)
        self.services = services
        self.reactor = reactor
        self.require_peer = require_peer
        self.peer: PeerCredentials | None = None
        self.last_stream_id = 0
        self._calls: dict[int, _Call] = {}

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        if isinstance(self.factory, TTRPCServerFactory):
            self.factory.connections.add(self)
        self.peer = peer_credentials(self.transport)
        if self.require_peer is None:
            return
        error = self._check_peer()
        if error is not None:
            log.error("ttrpc: refusing connection after handshake", error=error)
            self.abort()

    def _check_peer(self) -> str | None:
        """Go's ``requireUidGid`` with its error text, or None when the peer may talk."""
        prefix = "ttrpc.UnixCredentialsFunc: "
        if self.peer is None:
            return prefix + "require unix socket: a unix socket connection is required"
        assert self.require_peer is not None
        uid, gid = self.require_peer
        if (uid != -1 and uid != self.peer.uid) or (gid != -1 and gid != self.peer.gid):
            return prefix + "credential check failed: ttrpc: invalid credentials: operation not permitted"
        return None

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if isinstance(self.factory, TTRPCServerFactory):
            self.factory.connections.discard(self)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            self._cancel_call(call)

    @property
    def active(self) -> int:
        """In-flight calls (Go's idle/active connection state)."""
        return len(self._calls)

    # -- input -----------------------------------------------------------

    def oversizedFrameReceived(self, frame: OversizedFrame) -> None:
        self._send_status(frame.stream_id, status_proto(grpc.StatusCode.RESOURCE_EXHAUSTED, frame.message))

    def frameReceived(self, frame: Frame) -> None:
        if frame.type not in (MessageType.REQUEST, MessageType.DATA):
            return  # Go: "must ignore unknown types for future compat"
        if frame.stream_id % 2 != 1:
            self._invalid(frame.stream_id, "StreamID must be odd for client initiated streams")
        elif frame.type == MessageType.DATA:
            self._data_received(frame)
        else:
            self._request_received(frame)

    def _invalid(self, stream_id: int, message: str) -> None:
        self._send_status(stream_id, status_proto(_INVALID, message))

    def _data_received(self, frame: Frame) -> None:
        call = self._calls.get(frame.stream_id)
        stream = call.stream if call is not None else None
        if call is None or stream is None:
            self._invalid(frame.stream_id, "StreamID is no longer active")
            return
        if frame.flags & FLAG_REMOTE_CLOSED and frame.data:
            # Go delivers the data, then fails the stream; rejecting first keeps the outcome deterministic.
            self._finish(frame.stream_id, status_proto(_INVALID, "data close message cannot include data"))
            self._cancel_call(call)
            return
        if not frame.flags & FLAG_NO_DATA:
            if stream.remote_closed:
                self._invalid(frame.stream_id, "data handling error: ttrpc: stream closed")
                return
            if stream.full:
                self._invalid(frame.stream_id, "data handling error: ttrpc: stream buffer full")
                return
            stream._push(frame.data)
        if frame.flags & FLAG_REMOTE_CLOSED:
            stream._close_send()

    def _request_received(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid <= self.last_stream_id:
            self._invalid(sid, "StreamID cannot be re-used and must increment")
            return
        self.last_stream_id = sid
        req = request_pb2.Request()
        try:
            req.ParseFromString(frame.data)
        except DecodeError as e:
            self._invalid(sid, f"unmarshal request error: {e}")
            return
        try:
            method = self.services.resolve(req.service, req.method)
        except StatusError as e:
            self._send_status(sid, status_proto(e.code, e.message))
            return
        ctx = self._context(sid, req)
        call = _Call(ctx, method)
        self._calls[sid] = call
        if method.streaming:
            call.stream = ServerStream(self, sid, method, ctx)
            # ttrpc#126: a non-client-streaming handler always gets the request, even when empty.
            if req.payload or not method.client_streaming:
                call.stream._push(req.payload)
            if not method.client_streaming or frame.flags & FLAG_REMOTE_CLOSED:
                call.stream._close_send()
            d = _invoke(method.handler, call.stream, ctx)  # type: ignore[arg-type]
        else:
            request = method.request_cls()
            try:
                request.ParseFromString(req.payload)
            except DecodeError as e:
                d = fail(StatusError(grpc.StatusCode.INTERNAL, f"ttrpc: error unmarshalling payload: {e}"))
            else:
                d = _invoke(method.handler, request, ctx)  # type: ignore[arg-type]
        if ctx.deadline is not None and not d.called:
            call.timer = self._clock().callLater(
                max(ctx.deadline - ctx.clock.seconds(), 0),
                self._deadline,
                call,  # type: ignore[union-attr]
            )
        call.deferred = d
        d.addCallbacks(self._completed, self._completed, callbackArgs=(sid, call), errbackArgs=(sid, call))
        d.addErrback(self._internal_error)

    def _clock(self) -> IReactorTime:
        """The reactor as a clock, adapted once (an interface lookup per call shows in profiles)."""
        clock: IReactorTime | None = self.__dict__.get("_clock_cache")
        if clock is None:
            clock = self.__dict__["_clock_cache"] = IReactorTime(self._get_reactor())
        return clock

    def _internal_error(self, failure: Failure) -> None:
        """A bug in the completion path: never leave the connection in an unknown state."""
        log.failure("ttrpc: error completing call, closing connection", failure)
        self.abort()

    def _context(self, sid: int, req: request_pb2.Request) -> CallContext:
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:  # Go's MD.fromRequest: keys as sent, values appended
            metadata.setdefault(kv.key, []).append(kv.value)
        clock = self._clock()
        deadline = clock.seconds() + req.timeout_nano / 1e9 if req.timeout_nano else None
        return CallContext(req.service, req.method, sid, metadata, req.timeout_nano, deadline, self.peer, clock)

    # -- handler completion ---------------------------------------------

    def _deadline(self, call: _Call) -> None:
        call.timer = None
        call.ctx.deadline_exceeded = True
        self._cancel_call(call)

    def _cancel_call(self, call: _Call) -> None:
        call.ctx.cancelled = True
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if call.stream is not None:
            call.stream.local_closed = True
            call.stream._abort(self._cancel_error(call))
        if call.deferred is not None and not call.deferred.called:
            call.deferred.cancel()

    @staticmethod
    def _cancel_error(call: _Call) -> CdtwistError:
        if call.ctx.deadline_exceeded:
            return DeadlineExceeded()
        return StatusError(grpc.StatusCode.CANCELLED, "context canceled")

    def _completed(self, result: object, sid: int, call: _Call) -> None:
        """Finish on the reactor thread, even if a handler fired its Deferred from a worker."""
        if threadable.ioThread is not None and not threadable.isInIOThread():
            IReactorFromThreads(self._get_reactor()).callFromThread(self._completed, result, sid, call)
            return
        if isinstance(result, Failure):
            self._handler_failed(result, sid, call)
        else:
            self._handler_done(result, sid, call)

    def _handler_done(self, result: object, sid: int, call: _Call) -> None:
        if self._calls.get(sid) is not call:
            return  # finished early (lost connection, protocol error)
        if result is None:
            if call.method.streaming:  # Go 1.2 stream handlers may return nil: empty payload
                self._finish(sid, None, b"", stream_end=call.method.server_streaming)
                return
            self._finish(sid, status_proto(grpc.StatusCode.UNKNOWN, "ttrpc: marshal called with nil"))
            return
        if not isinstance(result, Message):
            self._finish(
                sid,
                status_proto(
                    grpc.StatusCode.INTERNAL, f"ttrpc: error unsupported response type: {type(result).__name__}"
                ),
            )
            return
        self._finish(sid, None, result.SerializeToString(), stream_end=call.method.server_streaming)

    def _handler_failed(self, failure: Failure, sid: int, call: _Call) -> None:
        if self._calls.get(sid) is not call:
            return
        err = failure.value
        if isinstance(err, CancelledError) and call.ctx.cancelled:
            err = self._cancel_error(call)
        status = status_from_error(err)
        if status.code == grpc.StatusCode.UNKNOWN.value[0] and not isinstance(err, CdtwistError):
            log.debug("ttrpc: handler {method} failed", method=call.ctx.full_method, log_failure=failure)
        self._finish(sid, status)

    def _finish(
        self, sid: int, status: status_pb2.Status | None, payload: bytes = b"", *, stream_end: bool = False
    ) -> None:
        """Close the stream: a Response frame, or Data[RC(|ND)] ending a server stream."""
        call = self._calls.pop(sid, None)
        if call is not None:
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.timer = None
            if call.stream is not None:
                call.stream.local_closed = True
        if stream_end and status is None and len(payload) <= self.max_length:
            self._send_data(sid, payload, FLAG_REMOTE_CLOSED | (0 if payload else FLAG_NO_DATA))
        else:
            self._send_response(sid, status, payload)

    def _send_status(self, sid: int, status: status_pb2.Status) -> None:
        self._send_response(sid, status, b"")

    def _send_response(self, sid: int, status: status_pb2.Status | None, payload: bytes) -> None:
        resp = request_pb2.Response(payload=payload)
        if status is not None:  # success leaves the field absent, like Go
            resp.status.CopyFrom(status)
        data = resp.SerializeToString()
        if len(data) > self.max_length:
            # Go 1.1 would write it and make the client discard it; the client sees the same status.
            message = oversized_message(len(data), self.max_length)
            log.error("ttrpc: refusing to send an oversized response", stream=sid, error=message)
            err = status_proto(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            data = request_pb2.Response(status=err).SerializeToString()
        self.send_frame(sid, MessageType.RESPONSE, data)

    def _send_data(self, sid: int, payload: bytes, flags: int) -> None:
        if len(payload) > self.max_length:
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, oversized_message(len(payload), self.max_length))
        self.send_frame(sid, MessageType.DATA, payload, flags)


class TTRPCServerFactory(Factory):
    """Builds :class:`TTRPCServerProtocol`; ``require_peer`` is Go's handshaker.

    ``REQUIRE_SAME_USER`` (default) = ``UnixSocketRequireSameUser``, a
    ``(uid, gid)`` pair = ``UnixSocketRequireUidGid`` (-1 matches any),
    None = no check (in-memory tests, TCP).
    """

    protocol = TTRPCServerProtocol

    noisy = False  # one log line per listen/stop is the service's job

    def __init__(
        self,
        services: Services,
        *,
        reactor: Any = None,
        require_peer: tuple[int, int] | None | _SameUser = REQUIRE_SAME_USER,
        max_length: int = MESSAGE_LENGTH_MAX,
    ) -> None:
        self.services = services
        self.reactor = reactor
        if isinstance(require_peer, _SameUser):
            require_peer = (os.geteuid(), os.getegid())
        self.require_peer: tuple[int, int] | None = require_peer
        self.max_length = max_length
        self.connections: set[TTRPCServerProtocol] = set()

    def buildProtocol(self, addr: object) -> TTRPCServerProtocol:
        proto = TTRPCServerProtocol(
            self.services, reactor=self.reactor, require_peer=self.require_peer, max_length=self.max_length
        )
        proto.factory = self
        return proto

    def close(self) -> None:
        """Go's ``Server.Close``: drop every connection now, in-flight calls included."""
        for proto in list(self.connections):
            proto.abort()

    def shutdown(self, interval: float = 0.2) -> Deferred[None]:
        """Go's ``Server.Shutdown``: every ``interval`` close idle connections until none remain.

        Stop listening first (``port.stopListening()``); cancel the Deferred to give up waiting.
        """

        def stop_loop(_: object) -> None:
            if loop.running:
                loop.stop()

        done: Deferred[None] = Deferred(stop_loop)

        def close_idle() -> None:
            for proto in list(self.connections):
                if proto.active == 0:
                    proto.abort()
            if not self.connections:
                loop.stop()
                if not done.called:
                    done.callback(None)

        loop = LoopingCall(close_idle)
        loop.clock = IReactorTime(self._reactor())
        loop.start(interval, now=True).addErrback(lambda f: log.failure("ttrpc: shutdown loop failed", f))
        return done

    def _reactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            return reactor
        return self.reactor


def _pool_call(reactor: Any, fn: Callable[..., Any], *args: object) -> Deferred[Any]:
    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


async def _listen(reactor: Any, path: str, factory: TTRPCServerFactory, uid: int, gid: int, mode: int) -> Any:
    await _pool_call(reactor, prepare_unix_path, path, uid, gid)
    port = reactor.listenUNIX(path, factory, mode=mode, wantPID=False)
    try:
        await _pool_call(reactor, secure_socket, path, uid, gid, mode)
    except BaseException:
        await port.stopListening()
        raise
    return port


def listen_ttrpc(
    reactor: Any,
    path: str,
    services: Services | TTRPCServerFactory,
    uid: int = 0,
    gid: int = 0,
    *,
    mode: int = 0o660,
) -> Deferred[IListeningPort]:
    """Listen like containerd's ``GetLocalListener``; filesystem work runs in the reactor pool.

    The parent directory is created 0770 (owned uid:gid) when missing, a
    stale socket is removed, a live one refused (AlreadyExists); the socket
    ends up ``mode`` and uid:gid.  ``stopListening`` unlinks it.
    """
    factory = services if isinstance(services, TTRPCServerFactory) else TTRPCServerFactory(services, reactor=reactor)
    return ensureDeferred(_listen(reactor, path, factory, uid, gid, mode))
