"""cdtwist ttrpc against the Go library (github.com/containerd/ttrpc from /usr/share/gocode).

tests/ttrpc_go/main.go is built once (GOPATH mode, cached under the temp
dir by source hash) and used three ways: as a client of cdtwist's server,
as a server for cdtwist's client, and as the reference whose raw response
bytes cdtwist's server must reproduce.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import grpc
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.services.ttrpc.events.v1 import events_pb2
from cdtwist.api.ttrpc import request_pb2
from cdtwist.errors import CdtwistError, DeadlineExceeded, FailedPrecondition, NotFound, NotImplemented_
from cdtwist.ttrpc.client import Stub, TTRPCClient, connect_unix
from cdtwist.ttrpc.framing import HEADER, MESSAGE_LENGTH_MAX, Frame, FrameDecoder, MessageType, encode_frame
from cdtwist.ttrpc.server import listen_ttrpc
from cdtwist.ttrpc.status import ClosedError, StatusError
from tests.go_build import GO, GOCODE, GoProgram
from tests.test_ttrpc_support import EVENTS, EVENTS_SERVICE, TASK, TASK_SERVICE, task_services

SOURCE = Path(__file__).parent / "ttrpc_go" / "main.go"
OVERSIZE_SUFFIX = " exceed maximum message size of 4194304"

_PEER = GoProgram(SOURCE, "ttrpcinterop")


def build_peer() -> str:
    """Build main.go once per source version; later runs reuse the cached binary."""
    return _PEER.build()


def _socket_dir(case: TestCase) -> str:
    path = tempfile.mkdtemp(prefix="cdtwist-ttrpc-go-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


class GoServer(ProcessProtocol):
    """The Go peer in server mode: READY on stdout, exits when stdin closes."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"READY" in self.out and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"Go server died: {self.err.decode(errors='replace')}"))
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        if not self.ended.called:
            assert self.transport is not None
            self.transport.closeStdin()
            timer = reactor.callLater(5, self._kill)  # type: ignore[attr-defined]
            self.ended.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return self.ended

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:  # already gone
            pass


class _Interop(TestCase):
    timeout = 60
    skip = None if GO else "the go toolchain is not installed: cannot build the Go ttrpc peer"

    @classmethod
    def setUpClass(cls) -> None:
        if GO and os.path.isdir(GOCODE):
            build_peer()

    def start_go_server(self, path: str) -> Deferred[GoServer]:
        proto = GoServer()
        reactor.spawnProcess(proto, build_peer(), [build_peer(), "server", path], env=dict(os.environ))  # type: ignore[attr-defined]
        self.addCleanup(proto.stop)
        return proto.ready.addCallback(lambda _: proto)

    async def start_py_server(self, path: str) -> object:
        self.services, self.impl = task_services(reactor)
        port = await listen_ttrpc(reactor, path, self.services, os.geteuid(), os.getegid())
        self.addCleanup(port.stopListening)
        return port


class GoClientTests(_Interop):
    """Go's ttrpc.Client (v1.1) calling cdtwist's server: one check per process run."""

    def setUp(self) -> Deferred[object]:
        self.path = os.path.join(_socket_dir(self), "py.sock")
        return ensureDeferred(self.start_py_server(self.path))

    async def check(self, name: str) -> None:
        out, err, code = await getProcessOutputAndValue(build_peer(), ["client", self.path, name], env=dict(os.environ))
        detail = f"{out.decode(errors='replace')}\n{err.decode(errors='replace')[-2000:]}"
        self.assertEqual((code, out.strip()), (0, b"ok"), detail)

    def test_unary(self) -> Deferred[None]:
        return ensureDeferred(self.check("unary"))

    def test_errors(self) -> Deferred[None]:
        async def run() -> None:
            await self.check("errors")
            self.flushLoggedErrors(RuntimeError)

        return ensureDeferred(run())

    def test_metadata(self) -> Deferred[None]:
        async def run() -> None:
            await self.check("metadata")
            self.assertEqual(
                self.impl.contexts[-1].metadata, {"foo": ["a", "b"], "containerd-namespace-ttrpc": ["ns1"]}
            )

        return ensureDeferred(run())

    def test_payload_at_and_over_limit(self) -> Deferred[None]:
        return ensureDeferred(self.check("limit"))

    def test_oversized_response(self) -> Deferred[None]:
        """Go 1.1's client panics on an oversized Response frame; cdtwist sends the status instead."""
        return ensureDeferred(self.check("bigresponse"))

    def test_hundred_concurrent_calls(self) -> Deferred[None]:
        async def run() -> None:
            await self.check("concurrent")
            self.assertEqual(len({c.stream_id for c in self.impl.contexts}), 100)
            self.assertTrue(all(c.stream_id % 2 == 1 for c in self.impl.contexts))

        return ensureDeferred(run())

    def test_timeout(self) -> Deferred[None]:
        async def run() -> None:
            await self.check("timeout")
            slow = self.impl.contexts[0]
            self.assertTrue(0 < slow.timeout_nano <= 100_000_000, slow.timeout_nano)

        return ensureDeferred(run())

    def test_events_forward(self) -> Deferred[None]:
        async def run() -> None:
            await self.check("events")
            env = self.impl.last_event
            assert env is not None
            self.assertEqual((env.timestamp.seconds, env.timestamp.nanos), (1700000000, 5))

        return ensureDeferred(run())


class PythonClientTests(_Interop):
    """cdtwist's client calling Go's ttrpc.Server (v1.1) with the same checks."""

    def setUp(self) -> Deferred[None]:
        async def start() -> None:
            path = os.path.join(_socket_dir(self), "go.sock")
            self.go = await self.start_go_server(path)
            self.client: TTRPCClient = await connect_unix(reactor, path)
            self.addCleanup(self.client.close)
            self.task = Stub(self.client, TASK)

        return ensureDeferred(start())

    def state(self, id: str, **kw: object) -> Deferred[shim_pb2.StateResponse]:
        return self.task.State(shim_pb2.StateRequest(id=id), **kw)

    def test_unary(self) -> Deferred[None]:
        async def run() -> None:
            resp = await self.state("echo:hi")
            self.assertEqual((resp.id, resp.stdin, resp.exec_id, resp.bundle), ("echo:hi", "none", "", ""))
            # gogo's non-nullable stdtime: Go always sends exited_at, as 0001-01-01
            self.assertTrue(resp.HasField("exited_at"))
            self.assertEqual(resp.exited_at.seconds, -62135596800)
            pids = await self.task.Pids(shim_pb2.PidsRequest(id="abc"))
            self.assertEqual([p.pid for p in pids.processes], [3, 7])

        return ensureDeferred(run())

    def test_errors(self) -> Deferred[None]:
        async def run() -> None:
            cases = [
                ("error:5:gone away", NotFound, grpc.StatusCode.NOT_FOUND, "gone away: not found"),
                (
                    "error:9:not: yet",
                    FailedPrecondition,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "not: yet: failed precondition",
                ),
                ("error:8:too much", StatusError, grpc.StatusCode.RESOURCE_EXHAUSTED, "too much"),
                ("notfound:c1", NotFound, grpc.StatusCode.NOT_FOUND, "c1: not found"),
                ("boom", CdtwistError, grpc.StatusCode.UNKNOWN, "boom"),
                ("none", CdtwistError, grpc.StatusCode.UNKNOWN, "ttrpc: marshal called with nil"),
            ]
            for id, cls, code, message in cases:
                with self.assertRaises(cls) as cm:
                    await self.state(id)
                self.assertEqual((cm.exception.code, str(cm.exception)), (code, message), id)
            with self.assertRaises(NotImplemented_) as cm2:
                await self.client.call("nope.Svc", "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
            self.assertEqual(cm2.exception.context, "service nope.Svc")
            with self.assertRaises(NotImplemented_) as cm2:
                await self.task.Create(shim_pb2.CreateTaskRequest())
            self.assertEqual(cm2.exception.context, "method Create")

        return ensureDeferred(run())

    def test_metadata(self) -> Deferred[None]:
        async def run() -> None:
            resp = await self.state("echo:md", metadata={"Foo": ["a", "b"]}, namespace="ns1")
            self.assertEqual((resp.exec_id, resp.bundle), ("ns1", "containerd-namespace-ttrpc=ns1;foo=a,b"))

        return ensureDeferred(run())

    def test_payload_at_and_over_limit(self) -> Deferred[None]:
        async def run() -> None:
            id = "len:" + "x" * (MESSAGE_LENGTH_MAX - 64)
            while _request_size(id) < MESSAGE_LENGTH_MAX:
                id += "x"
            self.assertEqual((await self.state(id)).pid, len(id))
            with self.assertRaises(StatusError) as cm:
                await self.state(id + "x")  # refused locally, like Go 1.2's OversizedMessageErr
            self.assertEqual(str(cm.exception), "message length 4194305" + OVERSIZE_SUFFIX)
            self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertEqual((await self.state("echo:after")).id, "echo:after")

        return ensureDeferred(run())

    def test_oversized_response_from_go(self) -> Deferred[None]:
        """Go 1.1 writes the 5 MB frame; the decoder skips it and fails only that call."""

        async def run() -> None:
            with self.assertRaises(StatusError) as cm:
                await self.state("big:5000000")
            self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertRegex(str(cm.exception), r"^message length 50000\d\d" + OVERSIZE_SUFFIX + "$")
            self.assertEqual(len((await self.state("big:4000000")).bundle), 4000000)
            self.assertEqual((await self.state("echo:after")).id, "echo:after")

        return ensureDeferred(run())

    def test_hundred_concurrent_calls(self) -> Deferred[None]:
        async def run() -> None:
            ids = [f"sleep:{(i * 7) % 20}:{i}" for i in range(100)]
            results = await gatherResults([self.state(id) for id in ids])
            self.assertEqual([r.id for r in results], ids)
            self.assertEqual(self.client.pending, 0)

        return ensureDeferred(run())

    def test_timeout(self) -> Deferred[None]:
        async def run() -> None:
            start = reactor.seconds()  # type: ignore[attr-defined]
            with self.assertRaises(DeadlineExceeded):
                await self.state("sleep:5000", timeout=0.1)
            self.assertLess(reactor.seconds() - start, 2)  # type: ignore[attr-defined]
            resp = await self.state("echo:t", timeout=10)
            self.assertEqual(resp.stdin, "deadline")

        return ensureDeferred(run())

    def test_events_forward(self) -> Deferred[None]:
        async def run() -> None:
            env = events_pb2.Envelope(namespace="ns1", topic="/tasks/exit")
            env.timestamp.FromSeconds(1700000000)
            env.event.type_url = "containerd.events.TaskExit"
            env.event.value = b"payload"
            await Stub(self.client, EVENTS).Forward(events_pb2.ForwardRequest(envelope=env))
            resp = await self.state("lastevent")
            self.assertEqual(
                (resp.id, resp.exec_id, resp.stdout, resp.bundle),
                ("/tasks/exit", "ns1", "payload", "containerd.events.TaskExit"),
            )

        return ensureDeferred(run())

    def test_server_gone_mid_call(self) -> Deferred[None]:
        async def run() -> None:
            d = self.state("sleep:5000")
            await self.go.stop()
            with self.assertRaises(ClosedError) as cm:
                await d
            self.assertEqual((str(cm.exception), cm.exception.code), ("ttrpc: closed", grpc.StatusCode.UNAVAILABLE))

        return ensureDeferred(run())


def _request_size(id: str) -> int:
    payload = shim_pb2.StateRequest(id=id).SerializeToString()
    return request_pb2.Request(service=TASK_SERVICE, method="State", payload=payload).ByteSize()


def _request(sid: int, service: str, method: str, payload: bytes) -> bytes:
    req = request_pb2.Request(service=service, method=method, payload=payload)
    return encode_frame(sid, MessageType.REQUEST, req.SerializeToString())


def _state(sid: int, id: str) -> bytes:
    return _request(sid, TASK_SERVICE, "State", shim_pb2.StateRequest(id=id).SerializeToString())


def _exchange(path: str, steps: list[bytes]) -> list[Frame]:
    """Blocking: send each step, read exactly one response frame for it."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    decoder = FrameDecoder()
    got: list[Frame] = []
    try:
        for step in steps:
            s.sendall(step)
            frames: list[object] = []
            while not frames:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("peer closed")
                frames = decoder.feed(chunk)  # type: ignore[assignment]
            assert len(frames) == 1, frames
            assert isinstance(frames[0], Frame)
            got.append(frames[0])
    finally:
        s.close()
    return got


class WireComparisonTests(_Interop):
    """The same raw frames to Go's server and to cdtwist's: the answers must be the same bytes."""

    def test_responses_are_byte_identical(self) -> Deferred[None]:
        at_limit = "len:" + "x" * (MESSAGE_LENGTH_MAX - 64)
        while _request_size(at_limit) < MESSAGE_LENGTH_MAX:
            at_limit += "x"
        oversize = b"\0" * (MESSAGE_LENGTH_MAX + 1)
        forward = events_pb2.ForwardRequest(envelope=events_pb2.Envelope(topic="/x")).SerializeToString()
        steps = [
            _request(1, TASK_SERVICE, "Pids", shim_pb2.PidsRequest(id="abc").SerializeToString()),
            _state(3, "error:5:gone"),
            _state(5, "notfound:c1"),
            _state(7, "boom"),
            _state(9, "none"),
            _state(11, "error:14:try later"),
            _request(13, "nope.Svc", "X", b""),
            _request(15, TASK_SERVICE, "Nope", b""),
            _state(16, "echo:even"),
            encode_frame(17, 0x7F, b"unknown type") + _state(19, "notfound:after-unknown"),
            HEADER.pack(len(oversize), 21, MessageType.REQUEST, 0) + oversize,
            _request(23, EVENTS_SERVICE, "Forward", forward),
            _state(25, at_limit),
        ]

        async def run() -> None:
            dir = _socket_dir(self)
            go_path, py_path = os.path.join(dir, "go.sock"), os.path.join(dir, "py.sock")
            await self.start_go_server(go_path)
            await self.start_py_server(py_path)
            go = await deferToThread(_exchange, go_path, steps)
            py = await deferToThread(_exchange, py_path, steps)
            self.flushLoggedErrors(RuntimeError)
            for i, (g, p) in enumerate(zip(go[:-1], py[:-1], strict=True)):
                self.assertEqual(
                    HEADER.pack(len(p.data), p.stream_id, p.type, p.flags) + p.data,
                    HEADER.pack(len(g.data), g.stream_id, g.type, g.flags) + g.data,
                    f"step {i}",
                )
            # The last answer is a StateResponse: Go (gogo stdtime, non-nullable) always adds exited_at.
            g_resp, p_resp = (request_pb2.Response.FromString(f.data) for f in (go[-1], py[-1]))
            self.assertFalse(g_resp.HasField("status") or p_resp.HasField("status"))
            g_state = shim_pb2.StateResponse.FromString(g_resp.payload)
            g_state.ClearField("exited_at")
            self.assertEqual(g_state, shim_pb2.StateResponse.FromString(p_resp.payload))
            self.assertEqual(g_state.pid, len(at_limit))

        return ensureDeferred(run())
