"""Shared ttrpc test services (no tests here): the interop contract of tests/ttrpc_go/main.go.

Both the in-memory protocol tests and the Go interop tests serve
:class:`TaskImpl`, so the Go peer and cdtwist are checked against one
contract (documented at the top of main.go).
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from twisted.internet import task
from twisted.internet.defer import Deferred

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.services.ttrpc.events.v1 import events_pb2
from cdtwist.api.types.task import task_pb2
from cdtwist.errors import NotFound
from cdtwist.ttrpc.server import CallContext, ServerStream, Services
from cdtwist.ttrpc.status import StatusError, code_of

TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]
EVENTS = events_pb2.DESCRIPTOR.services_by_name["Events"]
TASK_SERVICE = TASK.full_name
EVENTS_SERVICE = EVENTS.full_name


def metadata_string(md: dict[str, list[str]]) -> str:
    return ";".join(f"{k}={','.join(md[k])}" for k in sorted(md))


class TaskImpl:
    """``containerd.task.v2.Task`` (State, Pids) + ttrpc ``Events.Forward`` per the contract."""

    def __init__(self, clock: object) -> None:
        self.clock = clock
        self.last_event: events_pb2.Envelope | None = None
        self.contexts: list[CallContext] = []

    def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> object:
        self.contexts.append(ctx)
        cmd, _, arg = req.id.partition(":")
        if cmd == "echo":
            return shim_pb2.StateResponse(
                id=req.id,
                exec_id=ctx.namespace or "",
                bundle=metadata_string(ctx.metadata),
                stdin="deadline" if ctx.deadline is not None else "none",
            )
        if cmd == "len":
            return shim_pb2.StateResponse(id="len", pid=len(req.id))
        if cmd == "error":
            code, _, msg = arg.partition(":")
            raise StatusError(code_of(int(code)), msg)
        if cmd == "notfound":
            raise NotFound(arg)
        if cmd == "boom":
            raise RuntimeError("boom")
        if cmd == "none":
            return None
        if cmd == "sleep":
            ms = int(arg.partition(":")[0])
            return task.deferLater(self.clock, ms / 1000, lambda: shim_pb2.StateResponse(id=req.id))  # type: ignore[arg-type]
        if cmd == "big":
            return shim_pb2.StateResponse(id="big", bundle="x" * int(arg))
        if cmd == "lastevent":
            env = self.last_event
            if env is None:
                raise NotFound("no event")
            return shim_pb2.StateResponse(
                id=env.topic, exec_id=env.namespace, stdout=env.event.value.decode(), bundle=env.event.type_url
            )
        if cmd == "wrongtype":
            return "not a message"
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f'unknown command "{cmd}"')

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: CallContext) -> shim_pb2.PidsResponse:
        """A coroutine handler: ensureDeferred'ed by the server."""
        return shim_pb2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=len(req.id)), task_pb2.ProcessInfo(pid=7)])

    def Forward(self, req: events_pb2.ForwardRequest, ctx: CallContext) -> empty_pb2.Empty:
        self.last_event = req.envelope
        return empty_pb2.Empty()


def task_services(clock: object) -> tuple[Services, TaskImpl]:
    impl = TaskImpl(clock)
    services = Services()
    services.register(TASK, impl)
    services.register(EVENTS_SERVICE, impl)
    return services, impl


# ---------------------------------------------------------------------------
# A service defined at run time: any descriptor works, streaming included.


def _streamer_pool() -> descriptor_pool.DescriptorPool:
    f = descriptor_pb2.FileDescriptorProto(name="cdtwist_test/streamer.proto", package="cdtwist.test", syntax="proto3")
    part = f.message_type.add(name="Part")
    part.field.add(name="text", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1)
    part.field.add(name="n", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64, label=1)
    svc = f.service.add(name="Streamer")
    for name, cs, ss in (
        ("Echo", False, False),
        ("Sum", True, False),
        ("Count", False, True),
        ("Chat", True, True),
        ("Fail", False, True),
    ):
        svc.method.add(
            name=name,
            input_type=".cdtwist.test.Part",
            output_type=".cdtwist.test.Part",
            client_streaming=cs,
            server_streaming=ss,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return pool


STREAMER_POOL = _streamer_pool()
STREAMER: ServiceDescriptor = STREAMER_POOL.FindServiceByName("cdtwist.test.Streamer")
Part: type[Message] = message_factory.GetMessageClass(STREAMER_POOL.FindMessageTypeByName("cdtwist.test.Part"))


class StreamerImpl:
    def Echo(self, req: Message, ctx: CallContext) -> Message:
        return Part(text=req.text.upper(), n=req.n)  # type: ignore[attr-defined]

    async def Sum(self, stream: ServerStream, ctx: CallContext) -> Message:
        total, texts = 0, []
        async for part in stream:
            total += part.n  # type: ignore[attr-defined]
            texts.append(part.text)  # type: ignore[attr-defined]
        return Part(text="+".join(texts), n=total)

    async def Count(self, stream: ServerStream, ctx: CallContext) -> None:
        req = await stream.recv()
        assert req is not None
        for i in range(req.n):  # type: ignore[attr-defined]
            stream.send(Part(text=req.text, n=i))  # type: ignore[attr-defined]

    async def Chat(self, stream: ServerStream, ctx: CallContext) -> None:
        async for part in stream:
            stream.send(Part(text=part.text[::-1], n=part.n))  # type: ignore[attr-defined]

    def Fail(self, stream: ServerStream, ctx: CallContext) -> Deferred[None]:
        stream.send(Part(text="first"))
        raise NotFound("stream thing")


def streamer_services() -> Services:
    services = Services(STREAMER_POOL)
    services.register(STREAMER, StreamerImpl())
    return services
