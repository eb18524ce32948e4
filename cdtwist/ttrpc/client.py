# -*- test-case-name: tests.test_ttrpc_protocol,tests.test_ttrpc_interop -*-
"""A ttrpc client that behaves like github.com/containerd/ttrpc's ``Client``.

The core, :class:`TTRPCClient`, is sans-IO: it is handed bytes
(``data_received``), writes through a callable, and makes futures through
a txaio API object.  So the same code runs under Twisted (futures are
Deferreds; :func:`connect_unix`, :class:`TTRPCClientProtocol`) and under
asyncio (futures are ``asyncio.Future``; :mod:`cdtwist.ttrpc.aio`)::

    # asyncio: no Twisted reactor, no global txaio switch
    from cdtwist.ttrpc.aio import open_unix_client
    client = await open_unix_client("/run/containerd/containerd.sock.ttrpc")
    resp = await client.call("containerd.task.v2.Task", "State", req, StateResponse, timeout=5)

Semantics follow Go: odd stream ids from 1, many calls in flight on one
connection; ``timeout`` sends ``timeout_nano`` and fails the call with
DeadlineExceeded ("context deadline exceeded") when it passes; cancelling
the future forgets the call (a late answer is dropped); a lost connection
fails every pending call with :class:`ClosedError` ("ttrpc: closed"); a
non-OK status becomes :func:`cdtwist.errors.from_grpc_code`'s error class.
Not thread-safe: use it from its event loop's thread.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
import txaio
import txaio.tx
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from cdtwist.api.ttrpc import request_pb2
from cdtwist.errors import CdtwistError, DeadlineExceeded, Unavailable
from cdtwist.log import get_logger
from cdtwist.ttrpc.framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
    oversized_message,
)
from cdtwist.ttrpc.status import ClosedError, StatusError, error_from_status

__all__ = [
    "NAMESPACE_KEY",
    "ClientStream",
    "Stub",
    "TTRPCClient",
    "TTRPCClientProtocol",
    "connect_unix",
    "metadata_pairs",
]

log = get_logger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"
_MAX_STREAM_ID = 0xFFFFFFFF
_ABANDONED_MEMORY = 4096

Metadata = Mapping[str, str | Iterable[str]]


def metadata_pairs(metadata: Metadata | None, namespace: str | None = None) -> list[request_pb2.KeyValue]:
    """Go's ``MD.setRequest``: one KeyValue per value, keys lowercased as ``MD.Set`` does."""
    out: list[request_pb2.KeyValue] = []
    for key, values in (metadata or {}).items():
        for value in [values] if isinstance(values, str) else values:
            out.append(request_pb2.KeyValue(key=key.lower(), value=value))
    if namespace is not None:
        out.append(request_pb2.KeyValue(key=NAMESPACE_KEY, value=namespace))
    return out


def _cancel_timer(handle: Any) -> None:
    """Cancel a Twisted DelayedCall or an asyncio TimerHandle, whichever and whenever."""
    if handle is None:
        return
    active = getattr(handle, "active", None)
    if active is None or active():
        handle.cancel()


class _Call:
    __slots__ = ("future", "method", "response_cls", "stream", "stream_id", "timer")

    def __init__(self, stream_id: int, method: str, response_cls: type[Message]) -> None:
        self.stream_id = stream_id
        self.method = method
        self.response_cls = response_cls
        self.future: Any = None
        self.timer: Any = None
        self.stream: ClientStream | None = None


class ClientStream:
    """One streaming call, client side (Go 1.2's ``ClientStream``).

    ``recv()`` resolves to the next message, or None once the server ended
    the stream; an error status rejects it.  ``send``/``close_send`` exist
    when the method is client-streaming.
    """

    def __init__(self, client: TTRPCClient, call: _Call, client_streaming: bool, server_streaming: bool) -> None:
        self._client = client
        self._call = call
        self.stream_id = call.stream_id
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self.send_closed = not client_streaming
        self._items: deque[Message | BaseException | None] = deque()
        self._waiters: deque[Any] = deque()
        self.done = False

    def send(self, msg: Message) -> None:
        """One ``Data`` frame (flags 0)."""
        if self.send_closed or self.done:
            raise CdtwistError("ttrpc: stream closed")
        self._client._send(self.stream_id, MessageType.DATA, msg.SerializeToString(), 0)

    def close_send(self) -> None:
        """``CloseSend``: ``Data[REMOTE_CLOSED|NO_DATA]`` with no body."""
        if self.send_closed or self.done:
            return
        self.send_closed = True
        self._client._send(self.stream_id, MessageType.DATA, b"", FLAG_REMOTE_CLOSED | FLAG_NO_DATA)

    def recv(self) -> Any:
        """Future of the next message (None at the end of the stream)."""
        api = self._client.api
        f = api.create_future(canceller=self._forget_waiter)
        if self._items:
            self._deliver(f, self._items.popleft())
        elif self.done:
            api.resolve(f, None)
        else:
            self._waiters.append(f)
        return f

    def _forget_waiter(self, f: Any) -> None:
        if f in self._waiters:
            self._waiters.remove(f)

    def _deliver(self, f: Any, item: Message | BaseException | None) -> None:
        if isinstance(item, BaseException):
            self._client.api.reject(f, item)
        else:
            self._client.api.resolve(f, item)

    def _push(self, item: Message | BaseException | None) -> None:
        api = self._client.api
        while self._waiters:
            f = self._waiters.popleft()
            if not api.is_called(f):
                self._deliver(f, item)
                return
        self._items.append(item)

    def _end(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.send_closed = True
        if error is not None:
            self._push(error)
        api = self._client.api
        while self._waiters:
            f = self._waiters.popleft()
            if not api.is_called(f):
                api.resolve(f, None)

    def cancel(self) -> None:
        """Stop listening to this stream; later frames for it are dropped."""
        self._client._abandon(self.stream_id)
        self._end(StatusError(grpc.StatusCode.CANCELLED, "context canceled"))


class TTRPCClient:
    """One ttrpc connection's calls, independent of the event loop.

    ``write`` sends bytes, ``lose_connection`` closes the transport (the
    adapter then calls :meth:`connection_lost`), ``api`` is a txaio API
    (``txaio.tx.with_config()`` / ``txaio.aio.with_config(loop)``) and
    ``call_later(delay, fn)`` returns a cancellable timer.
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        lose_connection: Callable[[], object],
        *,
        api: Any,
        call_later: Callable[..., Any],
        max_length: int = MESSAGE_LENGTH_MAX,
    ) -> None:
        self._write = write
        self._lose_connection = lose_connection
        self.api = api
        self._call_later = call_later
        self.max_length = max_length
        self._decoder = FrameDecoder(max_length)
        self._next_id = 1
        self._pending: dict[int, _Call] = {}
        self._abandoned: set[int] = set()
        self._abandoned_order: deque[int] = deque()
        self._close_waiters: list[Any] = []
        self.closed = False
        self.close_reason: BaseException | None = None

    # -- public API --------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_cls: type[Message],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        namespace: str | None = None,
    ) -> Any:
        """Unary call; a future (Deferred under Twisted) of a ``response_cls`` message."""
        if timeout is not None and timeout <= 0:
            return self._failed(DeadlineExceeded())
        req = request_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout is not None else 0,
            metadata=metadata_pairs(metadata, namespace),
        )
        call = self._open(f"/{service}/{method}", response_cls, req, 0, timeout)
        if isinstance(call, BaseException):
            return self._failed(call)
        return call.future

    def stream(
        self,
        service: str,
        method: str,
        response_cls: type[Message],
        *,
        request: Message | None = None,
        client_streaming: bool,
        server_streaming: bool,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        namespace: str | None = None,
    ) -> ClientStream:
        """Open a streaming call (Go 1.2 ``NewStream``); the Go 1.1 server has no streams."""
        req = request_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString() if request is not None else b"",
            timeout_nano=int(timeout * 1e9) if timeout is not None else 0,
            metadata=metadata_pairs(metadata, namespace),
        )
        flags = FLAG_REMOTE_OPEN if client_streaming else FLAG_REMOTE_CLOSED
        call = self._open(f"/{service}/{method}", response_cls, req, flags, timeout, streaming=True)
        if isinstance(call, BaseException):
            raise call
        stream = ClientStream(self, call, client_streaming, server_streaming)
        call.stream = stream
        return stream

    def close(self) -> None:
        """Go's ``Client.Close``: drop the connection; pending calls fail with ClosedError."""
        if not self.closed:
            self._lose_connection()

    def when_closed(self) -> Any:
        """A future that fires (with None) once the connection is gone."""
        f = self.api.create_future(canceller=lambda f: None)
        if self.closed:
            self.api.resolve(f, None)
        else:
            self._close_waiters.append(f)
        return f

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- transport side ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for item in self._decoder.feed(data):
                if isinstance(item, OversizedFrame):
                    self._oversized(item)
                else:
                    self._frame(item)
        except Exception:
            log.failure("ttrpc: error handling message, closing connection")
            self._lose_connection()

    def connection_lost(self, reason: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        pending, self._pending = self._pending, {}
        for call in pending.values():
            _cancel_timer(call.timer)
            self._settle(call, error=ClosedError())
        waiters, self._close_waiters = self._close_waiters, []
        for f in waiters:
            if not self.api.is_called(f):
                self.api.resolve(f, None)

    # -- internals ---------------------------------------------------------

    def _failed(self, err: BaseException) -> Any:
        f = self.api.create_future(canceller=lambda f: None)
        self.api.reject(f, err)
        return f

    def _open(
        self,
        method: str,
        response_cls: type[Message],
        req: request_pb2.Request,
        flags: int,
        timeout: float | None,
        *,
        streaming: bool = False,
    ) -> _Call | BaseException:
        if self.closed:
            return ClosedError()
        data = req.SerializeToString()
        if len(data) > self.max_length:  # Go 1.2 refuses to send (OversizedMessageErr)
            return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, oversized_message(len(data), self.max_length))
        if self._next_id > _MAX_STREAM_ID:
            return Unavailable("ttrpc: stream ids exhausted")
        sid = self._next_id
        self._next_id += 2
        call = _Call(sid, method, response_cls)
        if not streaming:
            call.future = self.api.create_future(canceller=lambda f: self._abandon(sid))
        self._pending[sid] = call
        if timeout is not None:
            call.timer = self._call_later(timeout, self._timed_out, sid)
        self._send(sid, MessageType.REQUEST, data, flags)
        return call

    def _send(self, sid: int, msg_type: int, data: bytes, flags: int) -> None:
        self._write(encode_frame(sid, msg_type, data, flags, max_length=self.max_length))

    def _abandon(self, sid: int) -> None:
        """Forget a call whose caller gave up; its late answer is dropped quietly."""
        call = self._pending.pop(sid, None)
        if call is None:
            return
        _cancel_timer(call.timer)
        self._abandoned.add(sid)
        self._abandoned_order.append(sid)
        if len(self._abandoned_order) > _ABANDONED_MEMORY:
            self._abandoned.discard(self._abandoned_order.popleft())

    def _timed_out(self, sid: int) -> None:
        call = self._pending.get(sid)
        if call is None:
            return
        call.timer = None
        self._abandon(sid)
        self._settle(call, error=DeadlineExceeded())

    def _settle(self, call: _Call, result: Message | None = None, error: BaseException | None = None) -> None:
        if call.stream is not None:
            call.stream._end(error)
            return
        if self.api.is_called(call.future):
            return
        if error is not None:
            self.api.reject(call.future, error)
        else:
            self.api.resolve(call.future, result)

    def _take(self, sid: int) -> _Call | None:
        call = self._pending.get(sid)
        if call is None:
            if sid in self._abandoned:
                log.debug("ttrpc: dropping late message for abandoned stream {stream}", stream=sid)
            else:
                log.error("ttrpc: received message for unknown channel {stream}", stream=sid)
        return call

    def _finish(self, call: _Call) -> None:
        self._pending.pop(call.stream_id, None)
        _cancel_timer(call.timer)
        call.timer = None

    def _oversized(self, frame: OversizedFrame) -> None:
        call = self._take(frame.stream_id)
        if call is None:
            return
        self._finish(call)
        self._settle(call, error=StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, frame.message))

    def _frame(self, frame: Frame) -> None:
        call = self._take(frame.stream_id)
        if call is None:
            return
        if call.stream is not None:
            self._stream_frame(call, call.stream, frame)
            return
        self._finish(call)
        if frame.type != MessageType.RESPONSE:
            self._settle(call, error=CdtwistError("unknown message type received"))
            return
        try:
            self._settle(call, self._response(call, frame.data))
        except CdtwistError as e:
            self._settle(call, error=e)

    def _response(self, call: _Call, data: bytes) -> Message:
        resp = request_pb2.Response()
        try:
            resp.ParseFromString(data)
        except DecodeError as e:
            raise CdtwistError(f"ttrpc: unmarshal response: {e}") from None
        if resp.HasField("status") and resp.status.code != 0:  # absent or 0 is OK
            raise error_from_status(resp.status)
        msg = call.response_cls()
        try:
            msg.ParseFromString(resp.payload)
        except DecodeError as e:
            raise CdtwistError(f"ttrpc: unmarshal payload: {e}") from None
        return msg

    def _stream_frame(self, call: _Call, stream: ClientStream, frame: Frame) -> None:
        if frame.type == MessageType.RESPONSE:
            self._finish(call)
            try:
                msg = self._response(call, frame.data)
            except CdtwistError as e:
                stream._end(e)
                return
            if frame.data or not stream.server_streaming:  # client-only streaming: the response
                stream._push(msg)
            stream._end()
        elif frame.type == MessageType.DATA:
            if not stream.server_streaming:
                self._finish(call)
                stream._end(CdtwistError("ttrpc: received data from non-streaming server"))
                return
            if not frame.flags & FLAG_NO_DATA:
                msg = call.response_cls()
                try:
                    msg.ParseFromString(frame.data)
                except DecodeError as e:
                    stream._push(CdtwistError(f"ttrpc: unmarshal payload: {e}"))
                else:
                    stream._push(msg)
            if frame.flags & FLAG_REMOTE_CLOSED:
                self._finish(call)
                stream._end()


class Stub:
    """Typed calls from a service descriptor: ``Stub(client, Task).State(req)``.

    Unary methods take ``(request, *, timeout=None, metadata=None,
    namespace=None)`` and return a future; streaming methods return a
    :class:`ClientStream` (pass ``request=`` for server-only streaming).
    """

    def __init__(
        self,
        client: TTRPCClient,
        service: ServiceDescriptor | str,
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        desc = (pool or descriptor_pool.Default()).FindServiceByName(service) if isinstance(service, str) else service
        self._client = client
        self.service_name = desc.full_name
        for m in desc.methods:
            setattr(self, m.name, self._bind(m))

    def _bind(self, m: MethodDescriptor) -> Callable[..., Any]:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        service = self.service_name
        client = self._client

        if m.client_streaming or m.server_streaming:

            def open_stream(request: Message | None = None, **kwargs: Any) -> ClientStream:
                if request is not None and not isinstance(request, request_cls):
                    raise TypeError(f"{m.full_name} takes {request_cls.DESCRIPTOR.full_name}")
                return client.stream(
                    service,
                    m.name,
                    response_cls,
                    request=request,
                    client_streaming=m.client_streaming,
                    server_streaming=m.server_streaming,
                    **kwargs,
                )

            return functools.update_wrapper(open_stream, _named(m.name))

        def unary(request: Message, **kwargs: Any) -> Any:
            if not isinstance(request, request_cls):
                raise TypeError(f"{m.full_name} takes {request_cls.DESCRIPTOR.full_name}")
            return client.call(service, m.name, request, response_cls, **kwargs)

        return functools.update_wrapper(unary, _named(m.name))


def _named(name: str) -> Callable[[], None]:
    def f() -> None:
        pass

    f.__name__ = f.__qualname__ = name
    return f


# ---------------------------------------------------------------------------
# Twisted adapter


_txaio_selected = False


def _use_twisted() -> None:
    """``txaio.use_twisted()`` once (it re-imports and rebinds txaio's globals on every call)."""
    global _txaio_selected
    if not _txaio_selected:
        txaio.use_twisted()
        _txaio_selected = True


class TTRPCClientProtocol(Protocol):
    """Feeds a :class:`TTRPCClient` from a Twisted transport; futures are Deferreds."""

    def __init__(self, reactor: Any = None, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        _use_twisted()
        self.reactor = reactor
        self.max_length = max_length
        self.client: TTRPCClient | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.client = TTRPCClient(
            self.transport.write,
            self.transport.loseConnection,
            api=txaio.tx.with_config(),
            call_later=self.reactor.callLater,
            max_length=self.max_length,
        )

    def dataReceived(self, data: bytes) -> None:
        assert self.client is not None
        self.client.data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.client is not None:
            self.client.connection_lost(reason.value if reason is not None else None)


class _QuietFactory(Factory):
    """Hands out one protocol; quiet, since a daemon dials shims all the time."""

    noisy = False

    def __init__(self, proto: TTRPCClientProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> TTRPCClientProtocol:  # noqa: N802
        return self.proto


def connect_unix(reactor: Any, path: str, *, timeout: float = 30) -> Deferred[TTRPCClient]:
    """Dial a ttrpc UNIX socket (Go's ``net.Dial("unix")`` + ``NewClient``)."""
    proto = TTRPCClientProtocol(reactor)
    d = UNIXClientEndpoint(reactor, path, timeout=timeout).connect(_QuietFactory(proto))

    def connected(p: TTRPCClientProtocol) -> TTRPCClient:
        assert p.client is not None
        return p.client

    return d.addCallback(connected)
