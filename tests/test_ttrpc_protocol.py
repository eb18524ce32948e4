"""ttrpc server and client protocols: in memory (iosim, Clock) and over real UNIX sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
import threading

import grpc
from google.protobuf import empty_pb2
from google.rpc import status_pb2
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, globalLogPublisher
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.services.ttrpc.events.v1 import events_pb2
from cdtwist.api.ttrpc import request_pb2
from cdtwist.errors import (
    AlreadyExists,
    CdtwistError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    NotImplemented_,
    Unavailable,
)
from cdtwist.ttrpc.aio import open_unix_client
from cdtwist.ttrpc.client import Stub, TTRPCClient, TTRPCClientProtocol, connect_unix
from cdtwist.ttrpc.framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    HEADER,
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from cdtwist.ttrpc.server import CallContext, Services, TTRPCServerFactory, TTRPCServerProtocol, listen_ttrpc
from cdtwist.ttrpc.status import ClosedError, StatusError
from tests.test_ttrpc_support import (
    EVENTS_SERVICE,
    STREAMER,
    TASK,
    TASK_SERVICE,
    Part,
    TaskImpl,
    streamer_services,
    task_services,
)


def connect(services: Services, clock: Clock) -> tuple[TTRPCClient, TTRPCServerProtocol, IOPump]:
    factory = TTRPCServerFactory(services, reactor=clock, require_peer=None)
    client_proto, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None), lambda: TTRPCClientProtocol(clock), clock=clock
    )
    assert client_proto.client is not None
    return client_proto.client, server, pump


def raw_server(services: Services, clock: Clock) -> tuple[TTRPCServerProtocol, StringTransport]:
    proto = TTRPCServerFactory(services, reactor=clock, require_peer=None).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def request_frame(stream_id: int, service: str, method: str, payload: bytes = b"", **kw: object) -> bytes:
    req = request_pb2.Request(service=service, method=method, payload=payload, **kw)  # type: ignore[arg-type]
    return encode_frame(stream_id, MessageType.REQUEST, req.SerializeToString())


def state_frame(stream_id: int, id: str, **kw: object) -> bytes:
    return request_frame(stream_id, TASK_SERVICE, "State", shim_pb2.StateRequest(id=id).SerializeToString(), **kw)


def take_frames(transport: StringTransport) -> list[Frame]:
    frames = FrameDecoder(1 << 30).feed(transport.value())
    transport.clear()
    assert all(isinstance(f, Frame) for f in frames)
    return frames  # type: ignore[return-value]


def response_of(frame: Frame) -> request_pb2.Response:
    assert frame.type == MessageType.RESPONSE and frame.flags == 0
    return request_pb2.Response.FromString(frame.data)


def status_of(frame: Frame) -> tuple[int, int, str]:
    resp = response_of(frame)
    return frame.stream_id, resp.status.code, resp.status.message


class Captured:
    """Log events at error level and above, for "logged an error" assertions."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[str]:
        return [
            str(e.get("log_format"))
            for e in self.events
            if e.get("log_level") is not None and e["log_level"].name in ("error", "critical")
        ]


class UnaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.services, self.impl = task_services(self.clock)
        self.client, self.server, self.pump = connect(self.services, self.clock)

    def call(self, id: str, **kw: object) -> Deferred[shim_pb2.StateResponse]:
        d = self.client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse, **kw)
        self.pump.flush()
        return d

    def test_roundtrip(self) -> None:
        resp = self.successResultOf(self.call("echo:hi"))
        self.assertEqual(resp, shim_pb2.StateResponse(id="echo:hi", stdin="none"))
        ctx = self.impl.contexts[-1]
        self.assertEqual((ctx.service, ctx.method, ctx.stream_id), (TASK_SERVICE, "State", 1))
        self.assertEqual(ctx.full_method, "/containerd.task.v2.Task/State")

    def test_stream_ids_odd_increasing(self) -> None:
        for _ in range(3):
            self.successResultOf(self.call("echo:x"))
        self.assertEqual([c.stream_id for c in self.impl.contexts], [1, 3, 5])

    def test_coroutine_handler_and_stub(self) -> None:
        stub = Stub(self.client, TASK)
        d = stub.Pids(shim_pb2.PidsRequest(id="abcd"))
        self.pump.flush()
        self.assertEqual([p.pid for p in self.successResultOf(d).processes], [4, 7])
        self.assertRaises(TypeError, stub.Pids, shim_pb2.StateRequest())
        by_name = Stub(self.client, EVENTS_SERVICE)
        d = by_name.Forward(events_pb2.ForwardRequest(envelope=events_pb2.Envelope(topic="/t")))
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), empty_pb2.Empty())
        self.assertEqual(self.impl.last_event.topic, "/t")  # type: ignore[union-attr]

    def test_errors_keep_code_and_message(self) -> None:
        cases = [
            ("error:5:gone away", NotFound, grpc.StatusCode.NOT_FOUND, "gone away: not found"),
            ("notfound:c1", NotFound, grpc.StatusCode.NOT_FOUND, "c1: not found"),
            (
                "error:9:not yet",
                FailedPrecondition,
                grpc.StatusCode.FAILED_PRECONDITION,
                "not yet: failed precondition",
            ),
            ("error:8:too much", StatusError, grpc.StatusCode.RESOURCE_EXHAUSTED, "too much"),
            ("error:7:nope", StatusError, grpc.StatusCode.PERMISSION_DENIED, "nope"),
            ("boom", CdtwistError, grpc.StatusCode.UNKNOWN, "boom"),
            ("none", CdtwistError, grpc.StatusCode.UNKNOWN, "ttrpc: marshal called with nil"),
            ("wrongtype", StatusError, grpc.StatusCode.INTERNAL, "ttrpc: error unsupported response type: str"),
        ]
        for id, cls, code, message in cases:
            err = self.failureResultOf(self.call(id), cls).value
            self.assertEqual((err.code, str(err)), (code, message), id)
        self.flushLoggedErrors(RuntimeError)

    def test_unimplemented(self) -> None:
        d = self.client.call("nope.Svc", "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
        d2 = self.client.call(TASK_SERVICE, "Create", shim_pb2.CreateTaskRequest(), shim_pb2.CreateTaskResponse)
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d, NotImplemented_).value.context, "service nope.Svc")
        self.assertEqual(self.failureResultOf(d2, NotImplemented_).value.context, "method Create")

    def test_python_exceptions_map_like_convert_code(self) -> None:
        class Impl:
            def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> None:
                raise {"nf": FileNotFoundError("x"), "ex": FileExistsError("y"), "perm": PermissionError("z")}[req.id]

        services = Services()
        services.register(TASK_SERVICE, Impl())
        client, _, pump = connect(services, self.clock)
        got = {}
        for id in ("nf", "ex", "perm"):
            d = client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse)
            pump.flush()
            got[id] = self.failureResultOf(d, CdtwistError).value.code
        self.assertEqual(
            got,
            {
                "nf": grpc.StatusCode.NOT_FOUND,
                "ex": grpc.StatusCode.ALREADY_EXISTS,
                "perm": grpc.StatusCode.PERMISSION_DENIED,
            },
        )
        self.assertIsInstance(AlreadyExists(), CdtwistError)

    def test_metadata_and_namespace(self) -> None:
        d = self.call("echo:md", metadata={"Foo": ["a", "b"], "x": "1"}, namespace="ns1")
        resp = self.successResultOf(d)
        self.assertEqual(resp.exec_id, "ns1")
        self.assertEqual(resp.bundle, "containerd-namespace-ttrpc=ns1;foo=a,b;x=1")
        ctx = self.impl.contexts[-1]
        self.assertEqual(ctx.get("FOO"), "a")
        self.assertEqual(ctx.metadata["foo"], ["a", "b"])

    def test_hundred_concurrent_calls_on_one_connection(self) -> None:
        ds = [self.call(f"sleep:{1 + (i * 7) % 20}:{i}") for i in range(100)]
        self.assertEqual(self.client.pending, 100)
        self.assertEqual(self.server.active, 100)
        for _ in range(25):
            self.clock.advance(0.001)
            self.pump.flush()
        results = [self.successResultOf(d).id for d in ds]
        self.assertEqual(results, [f"sleep:{1 + (i * 7) % 20}:{i}" for i in range(100)])
        self.assertEqual((self.client.pending, self.server.active), (0, 0))

    def test_timeout(self) -> None:
        log = Captured(self)
        d = self.call("sleep:5000", timeout=0.5)
        ctx = self.impl.contexts[-1]
        self.assertEqual(ctx.timeout_nano, 500_000_000)
        self.assertAlmostEqual(ctx.remaining(), 0.5)  # type: ignore[arg-type]
        self.clock.advance(0.5)
        self.pump.flush()
        err = self.failureResultOf(d, DeadlineExceeded).value
        self.assertEqual((err.code, str(err)), (grpc.StatusCode.DEADLINE_EXCEEDED, "context deadline exceeded"))
        self.assertTrue(ctx.deadline_exceeded and ctx.cancelled)
        self.assertEqual(log.errors(), [])  # the server's late DEADLINE_EXCEEDED is dropped quietly
        self.successResultOf(self.call("echo:after"))
        self.assertEqual(
            self.failureResultOf(self.call("echo:x", timeout=0), DeadlineExceeded).value.code,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    def test_cancel(self) -> None:
        d = self.call("sleep:1000")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.client.pending, 0)
        self.clock.advance(1)
        self.pump.flush()  # late response: dropped
        self.successResultOf(self.call("echo:after"))

    def test_connection_lost_fails_pending_calls(self) -> None:
        ds = [self.call(f"sleep:1000:{i}") for i in range(3)]
        closed = self.client.when_closed()
        self.server.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        for d in ds:
            err = self.failureResultOf(d, ClosedError).value
            self.assertIsInstance(err, Unavailable)
            self.assertEqual((str(err), err.code), ("ttrpc: closed", grpc.StatusCode.UNAVAILABLE))
        self.assertTrue(all(c.cancelled for c in self.impl.contexts))
        self.successResultOf(closed)
        self.failureResultOf(self.call("echo:late"), ClosedError)

    def test_client_close(self) -> None:
        d = self.call("sleep:1000")
        self.client.close()
        self.pump.flush()
        self.failureResultOf(d, ClosedError)

    def test_client_refuses_oversized_request(self) -> None:
        d = self.call("len:" + "x" * MESSAGE_LENGTH_MAX)
        err = self.failureResultOf(d, StatusError).value
        self.assertEqual(err.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertRegex(str(err), r"^message length \d+ exceed maximum message size of 4194304$")

    def test_request_exactly_at_limit(self) -> None:
        id = "len:" + "x" * (MESSAGE_LENGTH_MAX - 64)
        while self._size(id) < MESSAGE_LENGTH_MAX:
            id += "x"
        self.assertEqual(self._size(id), MESSAGE_LENGTH_MAX)
        self.assertEqual(self.successResultOf(self.call(id)).pid, len(id))

    @staticmethod
    def _size(id: str) -> int:
        payload = shim_pb2.StateRequest(id=id).SerializeToString()
        return request_pb2.Request(service=TASK_SERVICE, method="State", payload=payload).ByteSize()

    def test_oversized_response_becomes_resource_exhausted(self) -> None:
        err = self.failureResultOf(self.call("big:5000000"), StatusError).value
        self.assertEqual(err.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        size = request_pb2.Response(
            payload=shim_pb2.StateResponse(id="big", bundle="x" * 5000000).SerializeToString()
        ).ByteSize()
        self.assertEqual(str(err), f"message length {size} exceed maximum message size of 4194304")
        self.successResultOf(self.call("echo:after"))

    def test_graceful_shutdown_waits_for_active_calls(self) -> None:
        factory = self.server.factory
        assert isinstance(factory, TTRPCServerFactory)
        self.assertEqual(factory.connections, {self.server})
        d = self.call("sleep:1000")
        done = factory.shutdown()
        closed = self.client.when_closed()
        self.clock.advance(0.4)
        self.pump.flush()
        self.assertNoResult(done)
        self.clock.advance(0.6)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d).id, "sleep:1000")
        for _ in range(3):
            self.clock.advance(0.2)
            self.pump.flush()
        self.successResultOf(done)
        self.successResultOf(closed)
        self.assertEqual(factory.connections, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_drops_in_flight_calls(self) -> None:
        d = self.call("sleep:1000")
        self.server.factory.close()  # type: ignore[union-attr]
        self.pump.flush()
        self.failureResultOf(d, ClosedError)
        self.assertTrue(self.impl.contexts[0].cancelled)


class WireTests(SynchronousTestCase):
    """Exact server bytes and Go's stream-id rules, driven with raw frames."""

    def setUp(self) -> None:
        self.clock = Clock()
        services, self.impl = task_services(self.clock)
        self.proto, self.transport = raw_server(services, self.clock)

    def test_success_response_bytes_have_no_status(self) -> None:
        self.proto.dataReceived(
            request_frame(1, TASK_SERVICE, "Pids", shim_pb2.PidsRequest(id="ab").SerializeToString())
        )
        # PidsResponse{processes: [{pid: 2}, {pid: 7}]} = 0a 02 08 02 0a 02 08 07; Response{payload: that}
        payload = bytes.fromhex("0a0208020a020807")
        body = b"\x12" + bytes([len(payload)]) + payload
        self.assertEqual(self.transport.value(), HEADER.pack(len(body), 1, 2, 0) + body)
        self.assertEqual(self.transport.value()[:10].hex(" "), "00 00 00 0a 00 00 00 01 02 00")

    def test_empty_response_is_a_bare_header(self) -> None:
        fwd = events_pb2.ForwardRequest(envelope=events_pb2.Envelope(topic="/x")).SerializeToString()
        self.proto.dataReceived(request_frame(1, EVENTS_SERVICE, "Forward", fwd))
        self.assertEqual(self.transport.value(), bytes.fromhex("00000000 00000001 0200"))

    def test_error_response_bytes(self) -> None:
        self.proto.dataReceived(state_frame(3, "error:5:gone"))
        st = status_pb2.Status(code=5, message="gone").SerializeToString()
        body = b"\x0a" + bytes([len(st)]) + st
        self.assertEqual(self.transport.value(), HEADER.pack(len(body), 3, 2, 0) + body)

    def test_stream_id_rules(self) -> None:
        self.proto.dataReceived(state_frame(2, "echo:even"))
        self.proto.dataReceived(state_frame(5, "echo:ok"))
        self.proto.dataReceived(state_frame(5, "echo:again"))
        self.proto.dataReceived(state_frame(3, "echo:lower"))
        self.proto.dataReceived(encode_frame(7, MessageType.DATA, b"x"))
        self.proto.dataReceived(encode_frame(9, MessageType.REQUEST, b"\xff\xff"))
        self.proto.dataReceived(encode_frame(11, 0x7F, b"junk") + encode_frame(11, MessageType.RESPONSE, b"junk"))
        frames = take_frames(self.transport)
        self.assertEqual(
            response_of(frames[1]).payload, shim_pb2.StateResponse(id="echo:ok", stdin="none").SerializeToString()
        )
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        self.assertEqual(
            [status_of(f) for f in frames[:1] + frames[2:6]],
            [
                (2, invalid, "StreamID must be odd for client initiated streams"),
                (5, invalid, "StreamID cannot be re-used and must increment"),
                (3, invalid, "StreamID cannot be re-used and must increment"),
                (7, invalid, "StreamID is no longer active"),
                (9, invalid, status_of(frames[5])[2]),
            ],
        )
        self.assertTrue(status_of(frames[5])[2].startswith("unmarshal request error: "))
        self.assertEqual(len(frames), 6)  # unknown type and Response frames are ignored
        self.assertFalse(self.transport.disconnecting)

    def test_bad_payload_is_internal(self) -> None:
        self.proto.dataReceived(request_frame(1, TASK_SERVICE, "State", b"\x0a\x05ab"))
        _, code, message = status_of(take_frames(self.transport)[0])
        self.assertEqual(code, grpc.StatusCode.INTERNAL.value[0])
        self.assertTrue(message.startswith("ttrpc: error unmarshalling payload: "), message)

    def test_server_side_deadline(self) -> None:
        self.proto.dataReceived(state_frame(1, "sleep:5000", timeout_nano=100_000_000))
        self.clock.advance(0.1)
        self.assertEqual(
            status_of(take_frames(self.transport)[0]),
            (1, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "context deadline exceeded"),
        )
        self.assertEqual(self.proto.active, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handler_from_another_thread_is_written_on_the_reactor(self) -> None:
        """Covered for real in SocketTests; here: no timer or call leaks on success."""
        self.proto.dataReceived(state_frame(1, "echo:t", timeout_nano=10**9))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oversized_request_answered_and_connection_kept(self) -> None:
        body = b"\0" * (MESSAGE_LENGTH_MAX + 1)
        frame = HEADER.pack(len(body), 1, MessageType.REQUEST, 0) + body
        for i in range(0, len(frame), 65536):
            self.proto.dataReceived(frame[i : i + 65536])
        self.proto.dataReceived(state_frame(3, "echo:after"))
        frames = take_frames(self.transport)
        self.assertEqual(
            status_of(frames[0]),
            (
                1,
                grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                "message length 4194305 exceed maximum message size of 4194304",
            ),
        )
        self.assertEqual(frames[1].stream_id, 3)
        self.assertFalse(self.transport.disconnecting)

    def test_lost_connection_cancels_handlers(self) -> None:
        self.proto.dataReceived(state_frame(1, "sleep:1000"))
        self.proto.connectionLost(None)
        self.assertTrue(self.impl.contexts[0].cancelled)
        self.clock.advance(2)
        self.assertEqual(self.transport.value(), b"")

    def test_internal_error_closes_with_logged_error(self) -> None:
        class Broken(Services):
            def resolve(self, service: str, method: str) -> object:
                raise RuntimeError("registry exploded")

        proto, transport = raw_server(Broken(), self.clock)
        proto.dataReceived(state_frame(1, "echo:x") + state_frame(3, "echo:y"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_truncated_frame_at_close_is_logged(self) -> None:
        log = Captured(self)
        self.proto.dataReceived(state_frame(1, "echo:x")[:-3])
        self.proto.connectionLost(None)
        self.assertEqual(len(log.errors()), 1)
        self.assertIn("inside a frame", log.errors()[0])

    def test_peer_required_but_not_a_unix_socket(self) -> None:
        proto = TTRPCServerFactory(Services(), reactor=self.clock).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(state_frame(1, "echo:x"))
        self.assertEqual(transport.value(), b"")

    def test_duplicate_service(self) -> None:
        services = Services()
        services.register(TASK, TaskImpl(self.clock))
        self.assertRaises(ValueError, services.register, TASK_SERVICE, object())


class StreamingTests(SynchronousTestCase):
    """ttrpc 1.2 streams (the Go 1.1 library in /usr/share/gocode has none, so no interop)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.client, self.server, self.pump = connect(streamer_services(), self.clock)
        self.stub = Stub(self.client, STREAMER)

    def drain(self, stream: object) -> list[object]:
        out = []
        while True:
            d = stream.recv()  # type: ignore[attr-defined]
            self.pump.flush()
            msg = self.successResultOf(d)
            if msg is None:
                return out
            out.append((msg.text, msg.n))

    def test_unary_from_a_runtime_descriptor(self) -> None:
        d = self.stub.Echo(Part(text="hi", n=3))
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), Part(text="HI", n=3))

    def test_server_streaming(self) -> None:
        stream = self.stub.Count(Part(text="c", n=3))
        self.pump.flush()
        self.assertEqual(self.drain(stream), [("c", 0), ("c", 1), ("c", 2)])
        self.assertEqual(self.client.pending, 0)

    def test_server_stream_wire_format(self) -> None:
        proto, transport = raw_server(streamer_services(), self.clock)
        req = request_pb2.Request(
            service="cdtwist.test.Streamer", method="Count", payload=Part(text="z", n=1).SerializeToString()
        )
        proto.dataReceived(encode_frame(1, MessageType.REQUEST, req.SerializeToString(), FLAG_REMOTE_CLOSED))
        frames = take_frames(transport)
        self.assertEqual(
            [(f.type, f.flags, f.data) for f in frames],
            [
                (MessageType.DATA, 0, Part(text="z", n=0).SerializeToString()),
                (MessageType.DATA, FLAG_REMOTE_CLOSED | FLAG_NO_DATA, b""),
            ],
        )

    def test_client_streaming(self) -> None:
        stream = self.stub.Sum()
        for i, t in enumerate("abc"):
            stream.send(Part(text=t, n=i + 1))
        stream.close_send()
        d = stream.recv()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), Part(text="a+b+c", n=6))
        d = stream.recv()
        self.assertIsNone(self.successResultOf(d))
        self.assertRaises(CdtwistError, stream.send, Part())

    def test_client_streaming_wire_format(self) -> None:
        proto, transport = raw_server(streamer_services(), self.clock)
        req = request_pb2.Request(service="cdtwist.test.Streamer", method="Sum")
        proto.dataReceived(encode_frame(1, MessageType.REQUEST, req.SerializeToString(), FLAG_REMOTE_OPEN))
        proto.dataReceived(encode_frame(1, MessageType.DATA, Part(text="a", n=2).SerializeToString()))
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(encode_frame(1, MessageType.DATA, b"", FLAG_REMOTE_CLOSED | FLAG_NO_DATA))
        (frame,) = take_frames(transport)
        self.assertEqual(response_of(frame), request_pb2.Response(payload=Part(text="a", n=2).SerializeToString()))

    def test_data_close_with_payload_is_rejected(self) -> None:
        proto, transport = raw_server(streamer_services(), self.clock)
        req = request_pb2.Request(service="cdtwist.test.Streamer", method="Sum")
        proto.dataReceived(encode_frame(1, MessageType.REQUEST, req.SerializeToString(), FLAG_REMOTE_OPEN))
        proto.dataReceived(encode_frame(1, MessageType.DATA, Part(n=1).SerializeToString(), FLAG_REMOTE_CLOSED))
        (frame,) = take_frames(transport)
        self.assertEqual(status_of(frame), (1, 3, "data close message cannot include data"))

    def test_bidi(self) -> None:
        stream = self.stub.Chat()
        stream.send(Part(text="abc", n=1))
        d = stream.recv()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), Part(text="cba", n=1))
        stream.send(Part(text="xy", n=2))
        stream.close_send()
        self.pump.flush()
        self.assertEqual(self.drain(stream), [("yx", 2)])

    def test_stream_error_after_data(self) -> None:
        stream = self.stub.Fail(Part())
        self.pump.flush()
        self.assertEqual(self.successResultOf(stream.recv()), Part(text="first"))
        err = self.failureResultOf(stream.recv(), NotFound).value
        self.assertEqual(str(err), "stream thing: not found")
        self.assertIsNone(self.successResultOf(stream.recv()))

    def test_connection_lost_ends_streams(self) -> None:
        stream = self.stub.Sum()
        d = stream.recv()
        self.server.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        self.failureResultOf(d, ClosedError)


def _tempdir(case: TestCase) -> str:
    path = tempfile.mkdtemp(prefix="cdtwist-ttrpc-")

    def cleanup() -> None:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(path)

    case.addCleanup(cleanup)
    return path


class SocketTests(TestCase):
    """Real UNIX sockets on the real reactor: listen helper, peer check, threads, asyncio."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = _tempdir(self)
        self.services, self.impl = task_services(reactor)

    async def _listen(self, path: str, factory: TTRPCServerFactory | Services | None = None) -> object:
        port = await listen_ttrpc(reactor, path, factory or self.services, os.geteuid(), os.getegid())
        self.addCleanup(port.stopListening)
        return port

    def test_listen_modes_and_same_user_roundtrip(self) -> Deferred[None]:
        async def run() -> None:
            path = os.path.join(self.dir, "sub", "ttrpc.sock")
            await self._listen(path)
            self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o770)
            st = os.stat(path)
            self.assertTrue(stat.S_ISSOCK(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
            client = await connect_unix(reactor, path)
            resp = await client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id="echo:x"), shim_pb2.StateResponse)
            self.assertEqual(resp.id, "echo:x")
            peer = self.impl.contexts[-1].peer
            self.assertEqual((peer.uid, peer.gid, peer.pid), (os.geteuid(), os.getegid(), os.getpid()))  # type: ignore[union-attr]
            # a live socket is refused, not stolen
            with self.assertRaises(AlreadyExists):
                await listen_ttrpc(reactor, path, self.services)
            client.close()
            await client.when_closed()

        return ensureDeferred(run())

    def test_stale_socket_replaced(self) -> Deferred[None]:
        async def run() -> None:
            path = os.path.join(self.dir, "stale.sock")
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.close()
            await self._listen(path)
            client = await connect_unix(reactor, path)
            await client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id="echo:x"), shim_pb2.StateResponse)
            client.close()

        return ensureDeferred(run())

    def test_handlers_may_use_threads(self) -> Deferred[None]:
        class Impl:
            def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> Deferred[shim_pb2.StateResponse]:
                if req.id == "thread":
                    return deferToThread(lambda: shim_pb2.StateResponse(id=threading.current_thread().name))
                # misuse: fire the Deferred from a worker thread; the write must still hop to the reactor
                d: Deferred[shim_pb2.StateResponse] = Deferred()
                threading.Thread(target=lambda: d.callback(shim_pb2.StateResponse(id="raw"))).start()
                return d

        async def run() -> None:
            services = Services()
            services.register(TASK, Impl())
            path = os.path.join(self.dir, "t.sock")
            await self._listen(path, services)
            client = await connect_unix(reactor, path)
            stub = Stub(client, TASK)
            a, b = await gatherResults(
                [stub.State(shim_pb2.StateRequest(id="thread")), stub.State(shim_pb2.StateRequest(id="raw"))]
            )
            self.assertNotEqual(a.id, threading.current_thread().name)
            self.assertEqual(b.id, "raw")
            client.close()

        return ensureDeferred(run())

    def _peer(self, path: str, uid: int | None, gid: int | None) -> Deferred[str]:
        """Fork a peer that drops to uid/gid, sends one Request and reports how many bytes came back."""
        frame = state_frame(1, "echo:intruder")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: plain syscalls only, then _exit
            try:
                os.close(r)
                if gid is not None:
                    os.setgroups([])
                    os.setgid(gid)
                if uid is not None:
                    os.setuid(uid)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(path)
                try:
                    s.sendall(frame)
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                os.write(w, str(len(data)).encode())
            except BaseException as e:
                os.write(w, f"peer error {e!r}".encode())
            finally:
                os._exit(0)
        os.close(w)

        def wait() -> str:
            with os.fdopen(r, "rb") as f:
                out = f.read()
            os.waitpid(pid, 0)
            return out.decode()

        return deferToThread(wait)

    def _open_dir(self) -> str:
        os.chmod(self.dir, 0o777)
        return os.path.join(self.dir, "peer.sock")

    def test_other_user_is_refused_before_any_frame(self) -> Deferred[None]:
        if os.geteuid() != 0:
            raise self.skipTest("needs root to run a peer as nobody")

        async def run() -> None:
            path = self._open_dir()
            port = await listen_ttrpc(reactor, path, self.services, mode=0o666)
            self.addCleanup(port.stopListening)
            self.assertEqual(await self._peer(path, 65534, 65534), "0")
            self.assertEqual(await self._peer(path, None, 65534), "0")  # uid matches, gid does not
            self.assertEqual(self.impl.contexts, [])
            self.assertEqual(await self._peer(path, None, None), str(len(self._echo_response())))
            self.assertEqual(len(self.impl.contexts), 1)

        return ensureDeferred(run())

    def test_uid_gid_wildcards(self) -> Deferred[None]:
        if os.geteuid() != 0:
            raise self.skipTest("needs root to run a peer as nobody")

        async def run() -> None:
            path = self._open_dir()
            factory = TTRPCServerFactory(self.services, require_peer=(-1, 65534))
            port = await listen_ttrpc(reactor, path, factory, mode=0o666)
            self.addCleanup(port.stopListening)
            self.assertNotEqual(await self._peer(path, 65534, 65534), "0")
            self.assertEqual(await self._peer(path, None, None), "0")

        return ensureDeferred(run())

    @staticmethod
    def _echo_response() -> bytes:
        payload = shim_pb2.StateResponse(id="echo:intruder", stdin="none").SerializeToString()
        return encode_frame(1, MessageType.RESPONSE, request_pb2.Response(payload=payload).SerializeToString())

    def test_asyncio_client(self) -> Deferred[None]:
        """The same client core on an asyncio loop (in a thread), against the Twisted server."""

        async def aio_main(path: str) -> list[object]:
            client = await open_unix_client(path)
            stub = Stub(client, TASK)
            many = await asyncio.gather(*(stub.State(shim_pb2.StateRequest(id=f"echo:{i}")) for i in range(20)))
            try:
                await stub.State(shim_pb2.StateRequest(id="notfound:c9"))
            except NotFound as e:
                err = str(e)
            try:
                await stub.State(shim_pb2.StateRequest(id="sleep:5000"), timeout=0.05)
            except DeadlineExceeded as e:
                timeout = str(e)
            fut = stub.State(shim_pb2.StateRequest(id="sleep:5000"))
            fut.cancel()
            await asyncio.sleep(0)
            pending = client.pending
            client.close()
            await client.when_closed()
            return [[m.id for m in many], err, timeout, pending]

        async def run() -> None:
            path = os.path.join(self.dir, "aio.sock")
            await self._listen(path)
            result = await deferToThread(asyncio.run, aio_main(path))
            self.assertEqual(
                result,
                [[f"echo:{i}" for i in range(20)], "c9: not found", "context deadline exceeded", 0],
            )

        return ensureDeferred(run())
