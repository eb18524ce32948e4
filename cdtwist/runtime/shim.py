# -*- test-case-name: tests.test_runtime_shim -*-
"""A connected shim and its task API, as containerd's ``runtime/v2/shim.go`` drives it.

:class:`ShimTask` wraps one ttrpc connection to a shim
(``containerd.task.v2.Task``) with containerd's error handling: statuses
become cdtwist error classes (``errdefs.FromGRPC``), a closed connection
reads as "not found" where containerd says so.  Every method runs on the
reactor thread and returns a Deferred (they are coroutines).

Waiting is shared: however many clients wait on a process, the shim sees
one ``Wait`` call for it (:class:`ExitWatch`), whose answer is kept until
the process is deleted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, message_factory, timestamp_pb2
from twisted.internet.defer import Deferred, ensureDeferred

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.types import mount_pb2
from cdtwist.api.types.task import task_pb2
from cdtwist.errors import CdtwistError, InvalidArgument, NotFound
from cdtwist.grpc.context import validate_identifier
from cdtwist.log import get_logger
from cdtwist.runtime.binary import Exit
from cdtwist.runtime.bundle import Bundle
from cdtwist.ttrpc import ClosedError, TTRPCClient

log = get_logger(__name__)

TASK_SERVICE = shim_pb2.DESCRIPTOR.services_by_name["Task"]
#: each method's response class, resolved once (a ``Stub`` per shim would redo it per connection)
_RESPONSES: dict[str, type[Any]] = {
    m.name: message_factory.GetMessageClass(m.output_type) for m in TASK_SERVICE.methods
}


class Status(enum.IntEnum):
    """``containerd.v1.types.Status`` (the shim speaks it, so does the tasks API)."""

    UNKNOWN = task_pb2.UNKNOWN
    CREATED = task_pb2.CREATED
    RUNNING = task_pb2.RUNNING
    STOPPED = task_pb2.STOPPED
    PAUSED = task_pb2.PAUSED
    PAUSING = task_pb2.PAUSING


@dataclass
class IO:
    """Paths of a process's stdio (client FIFOs, passed through untouched)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class CreateOpts:
    """containerd's ``runtime.CreateOpts``."""

    spec: bytes
    io: IO = field(default_factory=IO)
    rootfs: Sequence[mount_pb2.Mount] = ()
    checkpoint: str = ""
    runtime: str = ""
    runtime_options: any_pb2.Any | None = None
    task_options: any_pb2.Any | None = None

    @property
    def options(self) -> any_pb2.Any | None:
        """What the shim gets: task options, else the container's runtime options."""
        return self.task_options if self.task_options is not None else self.runtime_options


@dataclass
class State:
    """containerd's ``runtime.State`` (status already in the API's enum)."""

    pid: int = 0
    status: int = Status.UNKNOWN
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)


class ShimClosedError(CdtwistError):
    """Go's ``ttrpc.ErrClosed`` as the tasks API reports it (no class: gRPC UNKNOWN)."""

    def __init__(self, context: str | None = "ttrpc: closed") -> None:
        super().__init__(context)


def from_shim_error(err: BaseException) -> BaseException:
    """``errdefs.FromGRPC`` on a shim error; a lost connection stays Go's ``ttrpc: closed``."""
    if isinstance(err, ClosedError):
        return ShimClosedError()
    return err


class ExitWatch:
    """One shim ``Wait`` for a process, shared by every waiter."""

    def __init__(self, start: Callable[[], Deferred[Exit]]) -> None:
        self._start = start
        self._waiters: list[Deferred[Exit]] = []
        self._result: Exit | BaseException | None = None
        self._running = False

    def wait(self) -> Deferred[Exit]:
        d: Deferred[Exit] = Deferred(lambda d: self._forget(d))
        if isinstance(self._result, Exit):
            d.callback(self._result)
            return d
        self._waiters.append(d)
        if not self._running:
            self._running = True
            self._start().addCallbacks(self._done, self._failed)
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def exit(self) -> Exit | None:
        return self._result if isinstance(self._result, Exit) else None

    def _forget(self, d: Deferred[Exit]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    def _done(self, exit: Exit) -> None:
        self._running = False
        self._result = exit
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(exit)

    def _failed(self, failure: Any) -> None:
        # An error is not remembered: the next waiter asks the shim again.
        self._running = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)


class ShimTask:
    """A task served by one shim over ttrpc (containerd's ``shimTask`` + ``shim``)."""

    def __init__(
        self,
        bundle: Bundle,
        client: TTRPCClient,
        *,
        runtime: str = "",
        on_close: Callable[[], object] | None = None,
        state_timeout: float = 2.0,
        shutdown_timeout: float = 3.0,
    ) -> None:
        self.bundle = bundle
        self.client = client
        self.runtime = runtime
        self.state_timeout = state_timeout
        self.shutdown_timeout = shutdown_timeout
        self._watches: dict[str, ExitWatch] = {}
        #: a callable run (once) when the connection ends, whoever ended it.
        self.on_close = on_close
        self.closed: Deferred[None] = Deferred()
        client.when_closed().addBoth(self._connection_closed)
        #: fires once the close handler (if any) has run.
        self.close_handled: Deferred[None] = Deferred()
        #: set by the close handler once it removed the bundle.
        self.bundle_deleted = False
        self._close_handler_started = False

    # -- identity -----------------------------------------------------------

    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def namespace(self) -> str:
        return self.bundle.namespace

    def __repr__(self) -> str:
        return f"<ShimTask {self.namespace}/{self.id}>"

    # -- connection ---------------------------------------------------------

    def _connection_closed(self, _: object) -> None:
        # Pending waiters fail through their own ttrpc call; forget the watches.
        self._watches.clear()
        if not self.closed.called:
            self.closed.callback(None)
        self._run_close_handler()

    def _run_close_handler(self) -> None:
        """Once per task: the close handler, then ``close_handled``."""
        if self._close_handler_started:
            return
        self._close_handler_started = True
        if self.on_close is not None:
            handler, self.on_close = self.on_close, None
            d = ensureDeferred(_maybe_async(handler))
            d.addErrback(lambda f: log.failure("shim close handler for {id}", f, id=self.id))
            d.addBoth(lambda _: self.close_handled.called or self.close_handled.callback(None))
        elif not self.close_handled.called:
            self.close_handled.callback(None)

    def close(self) -> None:
        """Drop the connection and run the close handler now.

        As Go's ttrpc client runs its on-close callback as soon as it has closed
        the connection itself, the handler does not wait for the transport to
        report the loss (the task's ``closed`` still does).
        """
        self.client.close()
        self._run_close_handler()

    def detach(self) -> None:
        """Drop the connection without the close handler: the daemon is stopping, the shim lives on."""
        self.on_close = None
        self.client.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Deferred[Any]:
        """One unary call on ``containerd.task.v2.Task`` in the task's namespace."""
        return self.client.call(  # type: ignore[no-any-return]
            TASK_SERVICE.full_name, method, request, _RESPONSES[method], namespace=self.namespace, timeout=timeout
        )

    async def _do(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await self._call(method, request, timeout)
        except BaseException as e:
            raise from_shim_error(e) from None

    # -- the task API ---------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> shim_pb2.ConnectResponse:
        return await self._do("Connect", shim_pb2.ConnectRequest(id=self.id), timeout)

    async def pid(self, timeout: float | None = None) -> int:
        """The init process's pid (Go's ``PID``: a ``Connect``)."""
        response = await self.connect(timeout)
        return int(response.task_pid)

    async def create(self, opts: CreateOpts, timeout: float | None = None) -> int:
        request = shim_pb2.CreateTaskRequest(
            id=self.id,
            bundle=self.bundle.path,
            stdin=opts.io.stdin,
            stdout=opts.io.stdout,
            stderr=opts.io.stderr,
            terminal=opts.io.terminal,
            checkpoint=opts.checkpoint,
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in opts.rootfs],
        )
        if opts.options is not None:
            request.options.CopyFrom(opts.options)
        response = await self._do("Create", request, timeout)
        return int(response.pid)

    async def start(self, exec_id: str = "", timeout: float | None = None) -> int:
        response = await self._do("Start", shim_pb2.StartRequest(id=self.id, exec_id=exec_id), timeout)
        return int(response.pid)

    async def state(self, exec_id: str = "", timeout: float | None = None) -> State:
        try:
            r = await self._call("State", shim_pb2.StateRequest(id=self.id, exec_id=exec_id), timeout)
        except ClosedError:
            raise NotFound() from None
        return State(
            pid=r.pid,
            status=r.status,
            stdin=r.stdin,
            stdout=r.stdout,
            stderr=r.stderr,
            terminal=r.terminal,
            exit_status=r.exit_status,
            exited_at=r.exited_at,
        )

    async def kill(self, signal: int, all: bool = False, exec_id: str = "", timeout: float | None = None) -> None:
        request = shim_pb2.KillRequest(id=self.id, exec_id=exec_id, signal=signal, all=all)
        await self._do("Kill", request, timeout)

    async def pause(self, timeout: float | None = None) -> None:
        await self._do("Pause", shim_pb2.PauseRequest(id=self.id), timeout)

    async def resume(self, timeout: float | None = None) -> None:
        await self._do("Resume", shim_pb2.ResumeRequest(id=self.id), timeout)

    async def exec(self, exec_id: str, io: IO, spec: any_pb2.Any | None, timeout: float | None = None) -> None:
        try:
            validate_identifier(exec_id)
        except InvalidArgument as e:
            raise InvalidArgument(f"invalid exec id {exec_id}: {e.context}") from None
        request = shim_pb2.ExecProcessRequest(
            id=self.id,
            exec_id=exec_id,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            terminal=io.terminal,
        )
        if spec is not None:
            request.spec.CopyFrom(spec)
        # A new process under this id: forget what an earlier one left.
        self._watches.pop(exec_id, None)
        await self._do("Exec", request, timeout)

    async def process(self, exec_id: str, timeout: float | None = None) -> str:
        """Go's ``Process``: the exec must exist (a ``State`` call); returns its id."""
        await self.state(exec_id, timeout)
        return exec_id

    async def pids(self, timeout: float | None = None) -> list[task_pb2.ProcessInfo]:
        response = await self._do("Pids", shim_pb2.PidsRequest(id=self.id), timeout)
        return list(response.processes)

    async def resize_pty(self, width: int, height: int, exec_id: str = "", timeout: float | None = None) -> None:
        request = shim_pb2.ResizePtyRequest(id=self.id, exec_id=exec_id, width=width, height=height)
        await self._do("ResizePty", request, timeout)

    async def close_io(self, exec_id: str = "", timeout: float | None = None) -> None:
        await self._do("CloseIO", shim_pb2.CloseIORequest(id=self.id, exec_id=exec_id, stdin=True), timeout)

    async def checkpoint(self, path: str, options: any_pb2.Any | None, timeout: float | None = None) -> None:
        request = shim_pb2.CheckpointTaskRequest(id=self.id, path=path)
        if options is not None:
            request.options.CopyFrom(options)
        await self._do("Checkpoint", request, timeout)

    async def update(
        self, resources: any_pb2.Any | None, annotations: Mapping[str, str], timeout: float | None = None
    ) -> None:
        request = shim_pb2.UpdateTaskRequest(id=self.id, annotations=dict(annotations))
        if resources is not None:
            request.resources.CopyFrom(resources)
        await self._do("Update", request, timeout)

    async def stats(self, timeout: float | None = None) -> any_pb2.Any | None:
        response = await self._do("Stats", shim_pb2.StatsRequest(id=self.id), timeout)
        return response.stats if response.HasField("stats") else None

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the shim to exit; a connection that closes under the call is the expected answer."""
        try:
            await self._call("Shutdown", shim_pb2.ShutdownRequest(id=self.id), timeout)
        except ClosedError:
            pass

    async def delete_process(self, exec_id: str, timeout: float | None = None) -> Exit:
        """Delete an exec process (Go's ``process.Delete``)."""
        response = await self._do("Delete", shim_pb2.DeleteRequest(id=self.id, exec_id=exec_id), timeout)
        self._watches.pop(exec_id, None)
        return Exit(pid=response.pid, status=response.exit_status, timestamp=response.exited_at)

    # -- waiting ----------------------------------------------------------------

    def wait(self, exec_id: str = "") -> Deferred[Exit]:
        """An exit shared by every waiter on ``exec_id`` ("" = the init process)."""
        watch = self._watches.get(exec_id)
        if watch is None:
            watch = ExitWatch(lambda: ensureDeferred(self._shim_wait(exec_id)))
            self._watches[exec_id] = watch
        return watch.wait()

    async def _shim_wait(self, exec_id: str) -> Exit:
        response = await self._do("Wait", shim_pb2.WaitRequest(id=self.id, exec_id=exec_id))
        return Exit(status=response.exit_status, timestamp=response.exited_at)

    def waiting(self) -> int:
        """How many waiters this task's processes have (tests, debug)."""
        return sum(w.waiting for w in self._watches.values())


async def _maybe_async(fn: Callable[[], object]) -> None:
    result = fn()
    if isinstance(result, Deferred):
        await result
    elif hasattr(result, "__await__"):
        await result  # type: ignore[misc]
