# -*- test-case-name: tests.test_tasks_service -*-
"""``containerd.services.tasks.v1.Tasks`` (containerd's ``services/tasks``).

``tasks-service`` (:class:`TasksService`, containerd's ``local``) reads the
container from the metadata database, then drives its task through the v2
runtime; the ``tasks`` gRPC plugin serves it.  Handlers run on gRPC pool
threads: database reads happen there, and everything that talks to shims
crosses to the reactor through :func:`cdtwist.tasks.bridge.call`, with a
bounded wait.  Task events are the shims' own (forwarded over ttrpc and
republished by the exchange); the service publishes none itself, as in
containerd 1.6.

Waiting: a ``Wait`` may last as long as the container runs.  grpcio's
synchronous server gives every call in flight a pool thread, so each
``Wait`` holds one, blocked on a ``threading.Event`` (no reactor or I/O
thread, and one shared shim ``Wait`` per process however many clients
wait).  The number of concurrent ``Wait`` calls is capped at
:data:`MAX_CONCURRENT_WAITS`, below the gRPC pool size, so waits can never
take every worker and starve the calls that would end them (``Kill``);
past the cap a ``Wait`` is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from twisted.internet.defer import DeferredList, ensureDeferred

from cdtwist import filters, typeurl
from cdtwist.api.runtime.runc.options import oci_pb2 as runc_options
from cdtwist.api.services.tasks.v1 import tasks_pb2 as api
from cdtwist.api.services.tasks.v1 import tasks_pb2_grpc as api_grpc
from cdtwist.api.types import descriptor_pb2, metrics_pb2
from cdtwist.api.types.task import task_pb2
from cdtwist.errors import AlreadyExists, Canceled, CdtwistError, GRPCStatus, NotFound, Unavailable
from cdtwist.grpc import context as callctx
from cdtwist.log import get_logger
from cdtwist.plugin import EVENT, GRPC, METADATA, MONITOR, RUNTIME_V2, SERVICE, Registration, register
from cdtwist.runtime.containers import ContainerGetter, ContainerStore
from cdtwist.runtime.manager import STATE_TIMEOUT, PreparedLaunch, TaskManager, TaskNotExists
from cdtwist.runtime.shim import IO, CreateOpts, ShimTask, State, Status
from cdtwist.tasks import bridge

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

T = TypeVar("T")

SERVICE_ID = "tasks-service"

#: Waits beyond this many at once are refused (each holds a gRPC worker).
MAX_CONCURRENT_WAITS = 96
#: Bound on any other call that crosses to the reactor without a client deadline.
DEFAULT_CALL_TIMEOUT = 300.0

MEDIA_TYPE_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_TYPE_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
RUNC_OPTIONS_URL = "containerd.runc.v1.Options"
RUNC_CHECKPOINT_OPTIONS_URL = "containerd.runc.v1.CheckpointOptions"
RUNTIME_RUNC_V1 = "io.containerd.runc.v1"
RUNTIME_RUNC_V2 = "io.containerd.runc.v2"


@dataclass
class Call:
    """What the service needs of a gRPC call: namespace, deadline, liveness."""

    namespace: str
    timeout: float | None = None
    alive: Callable[[], bool] | None = None
    add_callback: Callable[[Callable[[], None]], object] | None = None
    lease: str | None = None

    @classmethod
    def from_grpc(cls, context: grpc.ServicerContext) -> Call:
        remaining = context.time_remaining()
        return cls(
            namespace=callctx.namespace_required(context),
            timeout=remaining if remaining is not None and remaining < 1e9 else None,
            alive=context.is_active,
            add_callback=context.add_callback,
            lease=callctx.lease(context),
        )


def task_not_found(id: str) -> GRPCStatus:
    """``status.Errorf(codes.NotFound, "task %v not found", id)``."""
    return GRPCStatus(grpc.StatusCode.NOT_FOUND, f"task {id} not found")


def _timestamp_now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def check_runtime(current: str, expected: str) -> bool:
    """containerd's ``checkRuntime``: ``expected``'s dotted parts prefix ``current``'s."""
    cp = current.split(".")
    for i, part in enumerate(expected.split(".")):
        if i >= len(cp) or part != cp[i]:
            return False
    return True


def _unmarshal(option: any_pb2.Any) -> Any:
    try:
        return typeurl.unmarshal_any(option)
    except NotFound:
        cls = _RUNC_TYPES.get(option.type_url.rsplit("/", 1)[-1])
        if cls is None:
            raise
        msg = cls()
        msg.ParseFromString(option.value)
        return msg


_RUNC_TYPES: dict[str, type] = {
    RUNC_OPTIONS_URL: runc_options.Options,
    RUNC_CHECKPOINT_OPTIONS_URL: runc_options.CheckpointOptions,
}


def restore_path(runtime: str, option: any_pb2.Any | None) -> str:
    """containerd's ``getRestorePath`` (runc options' ``criu_image_path``)."""
    if option is None or not check_runtime(runtime, "io.containerd.runc"):
        return ""
    value = _unmarshal(option)
    if not isinstance(value, runc_options.Options):
        raise CdtwistError(f"invalid task create option for {runtime}")
    return value.criu_image_path


def checkpoint_path(runtime: str, option: any_pb2.Any | None) -> str:
    """containerd's ``getCheckpointPath`` (runc checkpoint options' ``image_path``)."""
    if option is None or not check_runtime(runtime, "io.containerd.runc"):
        return ""
    value = _unmarshal(option)
    if not isinstance(value, runc_options.CheckpointOptions):
        raise CdtwistError(f"invalid task checkpoint option for {runtime}")
    return value.image_path


def process_from_state(id: str, state: State) -> task_pb2.Process:
    return task_pb2.Process(
        id=id,
        pid=state.pid,
        status=state.status,
        stdin=state.stdin,
        stdout=state.stdout,
        stderr=state.stderr,
        terminal=state.terminal,
        exit_status=state.exit_status,
        exited_at=state.exited_at,
    )


class TasksService:
    """The ``tasks-service`` plugin (containerd's ``local``): call from gRPC pool threads.

    (No method is named ``start``/``stop``/``close``: those are plugin lifecycle hooks.)
    """

    def __init__(
        self,
        runtime: TaskManager,
        containers: ContainerGetter,
        monitor: Any,
        reactor: Any,
        *,
        state_timeout: float = 2.0,
        content_store: Callable[[], Any] | None = None,
        max_waits: int = MAX_CONCURRENT_WAITS,
    ) -> None:
        self.runtime = runtime
        self.containers = containers
        self.monitor = monitor
        self.reactor = reactor
        self.state_timeout = state_timeout
        self.content_store = content_store
        self.max_waits = max_waits
        self._waits = threading.BoundedSemaphore(max_waits)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._draining = threading.Event()
        self._wakers: set[Callable[[], None]] = set()

    # -- plumbing -------------------------------------------------------------

    def _run(self, call: Call, fn: Callable[..., Any], *args: Any, timeout: float | None = -1.0) -> Any:
        """``fn(*args)`` on the reactor, bounded by the call's deadline (or a default)."""
        if timeout is not None and timeout < 0:
            timeout = call.timeout if call.timeout is not None else DEFAULT_CALL_TIMEOUT
        return bridge.call(self.reactor, fn, *args, timeout=timeout, alive=call.alive, add_callback=call.add_callback)

    def _container(self, call: Call, id: str) -> Any:
        return self.containers.get(call.namespace, id)

    def _require_task(self, call: Call, id: str) -> None:
        """A task known to be missing fails here, without the trip to the reactor.

        Only once recovery is over; the reactor's lookup (:meth:`_task`) stays
        the final word for a task that exists now.
        """
        if self.runtime.is_ready() and not self.runtime.exists(call.namespace, id):
            raise task_not_found(id)

    async def _task(self, namespace: str, id: str) -> ShimTask:
        """``getTaskFromContainer``: the task of a container that exists."""
        if not self.runtime.is_ready():
            await self.runtime.ready()
        try:
            return self.runtime.get(namespace, id)
        except TaskNotExists:
            raise task_not_found(id) from None

    async def _process_state(self, task: ShimTask, exec_id: str) -> task_pb2.Process:
        """``getProcessState``: a state error other than "not found" yields an unknown process."""
        try:
            state = await task.state(exec_id, timeout=self.state_timeout)
        except NotFound:
            raise
        except Exception as e:
            log.error(f"get state for {exec_id or task.id}", error=str(e))
            state = State()
        if state.status == Status.UNKNOWN:
            log.warn("unknown status", status=state.status)
        return process_from_state(exec_id or task.id, state)

    # -- the API --------------------------------------------------------------

    def create(self, call: Call, r: api.CreateTaskRequest) -> api.CreateTaskResponse:
        container = self._container(call, r.container_id)
        task_options = r.options if r.HasField("options") else None
        checkpoint = restore_path(container.runtime_name, task_options)
        cleanup: str | None = None
        if not checkpoint and r.HasField("checkpoint"):
            checkpoint = cleanup = self._restore_checkpoint(call, r.checkpoint)
        spec = container.spec
        opts = CreateOpts(
            spec=spec.value if spec is not None else b"",
            io=IO(stdin=r.stdin, stdout=r.stdout, stderr=r.stderr, terminal=r.terminal),
            rootfs=list(r.rootfs),
            checkpoint=checkpoint,
            runtime=r.runtime_path or container.runtime_name,
            runtime_options=container.runtime_options,
            task_options=task_options,
        )
        if container.runtime_name.startswith("io.containerd.runtime.v1."):
            log.warn("runtime v1 is deprecated since containerd v1.4, consider using runtime v2")
        elif container.runtime_name == RUNTIME_RUNC_V1:
            log.warn(
                f'"{RUNTIME_RUNC_V1}" is deprecated since containerd v1.4, consider using "{RUNTIME_RUNC_V2}"'
            )
        try:
            prepared = None
            if self.runtime.is_ready():
                # Recovery is over (its cleanup can no longer touch a new bundle): check
                # for the task and make its bundle here rather than in the I/O pool.
                if self.runtime.exists(call.namespace, r.container_id):
                    raise AlreadyExists(f"task {r.container_id}")
                prepared = self.runtime.prepare(call.namespace, r.container_id, opts)
            try:
                pid = self._run(
                    call, self._create, call.namespace, r.container_id, opts, container.runtime_name, prepared
                )
            except BaseException:
                if prepared is not None:
                    # after _create (calls from this thread run in order): a bundle it never took goes
                    self.reactor.callFromThread(_discard, self.runtime, prepared)
                raise
        finally:
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)
        return api.CreateTaskResponse(container_id=r.container_id, pid=pid)

    async def _create(
        self, namespace: str, id: str, opts: CreateOpts, runtime_name: str, prepared: PreparedLaunch | None = None
    ) -> int:
        if not self.runtime.is_ready():
            await self.runtime.ready()
        try:
            self.runtime.get(namespace, id)
        except TaskNotExists:
            pass
        else:
            raise AlreadyExists(f"task {id}")
        task = await self.runtime.create(namespace, id, opts, prepared)
        self.monitor.monitor(task, {"runtime": runtime_name})
        try:
            return await task.pid()
        except Exception as e:
            raise CdtwistError(f"failed to get task pid: {e}") from None

    def start_process(self, call: Call, r: api.StartRequest) -> api.StartResponse:
        self._container(call, r.container_id)
        self._require_task(call, r.container_id)

        async def start() -> int:
            task = await self._task(call.namespace, r.container_id)
            if r.exec_id:
                await task.process(r.exec_id)
            await task.start(r.exec_id)
            state = await task.state(r.exec_id)
            return state.pid

        return api.StartResponse(pid=self._run(call, start))

    def delete_task(self, call: Call, r: api.DeleteTaskRequest) -> api.DeleteResponse:
        self._container(call, r.container_id)
        self._require_task(call, r.container_id)

        async def delete() -> Any:
            task = await self._task(call.namespace, r.container_id)
            self.monitor.unmonitor(task)
            return await self.runtime.delete(call.namespace, r.container_id)

        exit = self._run(call, delete)
        return api.DeleteResponse(exit_status=exit.status, exited_at=exit.timestamp, pid=exit.pid)

    def delete_process(self, call: Call, r: api.DeleteProcessRequest) -> api.DeleteResponse:
        self._container(call, r.container_id)
        self._require_task(call, r.container_id)

        async def delete() -> Any:
            task = await self._task(call.namespace, r.container_id)
            await task.process(r.exec_id)
            return await task.delete_process(r.exec_id)

        exit = self._run(call, delete)
        return api.DeleteResponse(id=r.exec_id, exit_status=exit.status, exited_at=exit.timestamp, pid=exit.pid)

    def get(self, call: Call, r: api.GetRequest) -> api.GetResponse:
        self._container(call, r.container_id)
        self._require_task(call, r.container_id)

        async def get() -> task_pb2.Process:
            task = await self._task(call.namespace, r.container_id)
            if r.exec_id:
                await task.process(r.exec_id)
            return await self._process_state(task, r.exec_id)

        return api.GetResponse(process=self._run(call, get))

    def list(self, call: Call, r: api.ListTasksRequest) -> api.ListTasksResponse:
        async def list_() -> list[task_pb2.Process]:
            await self.runtime.ready()
            tasks = self.runtime.tasks(call.namespace)
            results = await DeferredList(
                [ensureDeferred(self._process_state(t, "")) for t in tasks], consumeErrors=True
            )
            out = []
            for task, (ok, value) in zip(tasks, results, strict=True):
                if ok:
                    out.append(value)
                elif not isinstance(value.value, NotFound):  # a race with deletion
                    log.error("converting task to protobuf", id=task.id, error=str(value.value))
            return out

        return api.ListTasksResponse(tasks=self._run(call, list_))

    def _simple(self, call: Call, id: str, op: Callable[[ShimTask], Any], exec_id: str = "") -> None:
        self._container(call, id)
        self._require_task(call, id)

        async def run() -> None:
            task = await self._task(call.namespace, id)
            if exec_id:
                await task.process(exec_id)
            await op(task)

        self._run(call, run)

    def pause(self, call: Call, r: api.PauseTaskRequest) -> None:
        self._simple(call, r.container_id, lambda t: t.pause())

    def resume(self, call: Call, r: api.ResumeTaskRequest) -> None:
        self._simple(call, r.container_id, lambda t: t.resume())

    def kill(self, call: Call, r: api.KillRequest) -> None:
        self._simple(call, r.container_id, lambda t: t.kill(r.signal, r.all, r.exec_id), r.exec_id)

    def resize_pty(self, call: Call, r: api.ResizePtyRequest) -> None:
        self._simple(call, r.container_id, lambda t: t.resize_pty(r.width, r.height, r.exec_id), r.exec_id)

    def close_io(self, call: Call, r: api.CloseIORequest) -> None:
        if not r.stdin:
            self._simple(call, r.container_id, _noop, r.exec_id)
            return
        self._simple(call, r.container_id, lambda t: t.close_io(r.exec_id), r.exec_id)

    def update(self, call: Call, r: api.UpdateTaskRequest) -> None:
        resources = r.resources if r.HasField("resources") else None
        self._simple(call, r.container_id, lambda t: t.update(resources, r.annotations))

    def exec(self, call: Call, r: api.ExecProcessRequest) -> None:
        if not r.exec_id:
            raise GRPCStatus(grpc.StatusCode.INVALID_ARGUMENT, "exec id cannot be empty")
        spec = r.spec if r.HasField("spec") else None
        io = IO(stdin=r.stdin, stdout=r.stdout, stderr=r.stderr, terminal=r.terminal)
        self._simple(call, r.container_id, lambda t: t.exec(r.exec_id, io, spec))

    def list_pids(self, call: Call, r: api.ListPidsRequest) -> api.ListPidsResponse:
        self._container(call, r.container_id)
        self._require_task(call, r.container_id)

        async def pids() -> list[task_pb2.ProcessInfo]:
            task = await self._task(call.namespace, r.container_id)
            return await task.pids()

        return api.ListPidsResponse(processes=self._run(call, pids))

    def metrics(self, call: Call, r: api.MetricsRequest) -> api.MetricsResponse:
        flt = filters.parse_all(*r.filters)

        async def collect() -> list[metrics_pb2.Metric]:
            await self.runtime.ready()
            chosen = [t for t in self.runtime.tasks(call.namespace) if flt.match(_task_adaptor(t))]
            stamps = [_timestamp_now() for _ in chosen]
            results = await DeferredList([ensureDeferred(t.stats()) for t in chosen], consumeErrors=True)
            out = []
            for task, stamp, (ok, value) in zip(chosen, stamps, results, strict=True):
                if not ok:
                    if not isinstance(value.value, NotFound):
                        log.error(f"collecting metrics for {task.id}", error=str(value.value))
                    continue
                metric = metrics_pb2.Metric(timestamp=stamp, id=task.id)
                if value is not None:
                    metric.data.CopyFrom(value)
                out.append(metric)
            return out

        return api.MetricsResponse(metrics=self._run(call, collect))

    def wait(self, call: Call, r: api.WaitRequest) -> api.WaitResponse:
        """Blocks this pool thread until the process exits or the client goes away (see module doc)."""
        self._container(call, r.container_id)
        if not self._waits.acquire(blocking=False):
            raise GRPCStatus(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent task waits (limit {self.max_waits})",
            )
        wakers: list[Callable[[], None]] = []

        def add_callback(fn: Callable[[], None]) -> None:
            # woken when the client goes away and when the server drains
            wakers.append(fn)
            with self._waiting_lock:
                self._wakers.add(fn)
            if call.add_callback is not None:
                call.add_callback(fn)

        def alive() -> bool:
            return not self._draining.is_set() and (call.alive is None or call.alive())

        with self._waiting_lock:
            self._waiting += 1
        try:
            self._require_task(call, r.container_id)

            async def wait() -> Any:
                task = await self._task(call.namespace, r.container_id)
                if r.exec_id:
                    await task.process(r.exec_id)
                return await task.wait(r.exec_id)

            try:
                exit = bridge.call(
                    self.reactor, wait, timeout=call.timeout, alive=alive, add_callback=add_callback
                )
            except Canceled:
                if self._draining.is_set():
                    raise Unavailable("tasks service is stopping") from None
                raise
        finally:
            with self._waiting_lock:
                self._waiting -= 1
                for fn in wakers:
                    self._wakers.discard(fn)
            self._waits.release()
        return api.WaitResponse(exit_status=exit.status, exited_at=exit.timestamp)

    def drain(self) -> None:
        """The gRPC server is stopping: end every Wait now rather than after its grace period."""
        self._draining.set()
        with self._waiting_lock:
            wakers = list(self._wakers)
        for fn in wakers:
            fn()

    @property
    def waiting(self) -> int:
        """gRPC threads blocked in Wait now."""
        return self._waiting

    def checkpoint(self, call: Call, r: api.CheckpointTaskRequest) -> api.CheckpointTaskResponse:
        container = self._container(call, r.container_id)
        options = r.options if r.HasField("options") else None
        image = checkpoint_path(container.runtime_name, options)
        write_image = not image
        if write_image:
            image = tempfile.mkdtemp(prefix="ctd-checkpoint", dir=os.environ.get("XDG_RUNTIME_DIR") or None)
        try:

            async def checkpoint() -> None:
                task = await self._task(call.namespace, r.container_id)
                await task.checkpoint(image, options)

            self._run(call, checkpoint)
            if not write_image:
                return api.CheckpointTaskResponse()
            cp = self._write_content(call, MEDIA_TYPE_CHECKPOINT, image, _tar_dir(image))
            spec = container.spec.SerializeToString() if container.spec is not None else b""
            spec_desc = self._write_content(call, MEDIA_TYPE_CHECKPOINT_CONFIG, os.path.join(image, "spec"), spec)
            return api.CheckpointTaskResponse(descriptors=[cp, spec_desc])
        finally:
            if write_image:
                shutil.rmtree(image, ignore_errors=True)

    # -- checkpoint content -----------------------------------------------------

    def _store(self) -> Any:
        if self.content_store is None:
            raise CdtwistError("no content store for checkpoints")
        return self.content_store()

    def _write_content(self, call: Call, media_type: str, ref: str, data: bytes) -> descriptor_pb2.Descriptor:
        store = self._store()
        with store.writer(call.namespace, ref, lease=call.lease) as writer:
            writer.write(data)
            digest = writer.digest()
            try:
                writer.commit(len(data), "", lease=call.lease)
            except AlreadyExists:
                pass
        return descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=len(data))

    def _restore_checkpoint(self, call: Call, desc: descriptor_pb2.Descriptor) -> str:
        path = tempfile.mkdtemp(prefix="ctrd-checkpoint", dir=os.environ.get("XDG_RUNTIME_DIR") or None)
        try:
            if desc.media_type != MEDIA_TYPE_CHECKPOINT:
                raise CdtwistError(f'unsupported checkpoint type "{desc.media_type}"')
            store = self._store()
            size, reader = store.open(call.namespace, desc.digest)
            try:
                data = reader.read_at(0, size) if hasattr(reader, "read_at") else reader.read()
            finally:
                close = getattr(reader, "close", None)
                if callable(close):
                    close()
            _untar(data, path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path


async def _noop(task: ShimTask) -> None:
    return None


def _discard(runtime: TaskManager, prepared: PreparedLaunch) -> None:
    if not prepared.taken:
        ensureDeferred(runtime.discard(prepared)).addErrback(lambda f: log.failure("discarding a task bundle", f))


def _task_adaptor(task: ShimTask) -> filters.Adaptor:
    def field(fieldpath: Any) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "id":
            return task.id, True
        if fieldpath[0] == "namespace":
            return task.namespace, True
        return "", False

    return filters.AdaptorFunc(field)


def _tar_dir(path: str) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(path)):
            tar.add(os.path.join(path, name), arcname=name)
    return buf.getvalue()


def _untar(data: bytes, path: str) -> None:
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(path, filter="data")


class TasksServicer(api_grpc.TasksServicer):
    """containerd's ``service``: every handler hands over to the ``local`` service."""

    def __init__(self, service: TasksService) -> None:
        self.service = service

    def Create(self, request: api.CreateTaskRequest, context: grpc.ServicerContext) -> api.CreateTaskResponse:  # noqa: N802
        return self.service.create(Call.from_grpc(context), request)

    def Start(self, request: api.StartRequest, context: grpc.ServicerContext) -> api.StartResponse:  # noqa: N802
        return self.service.start_process(Call.from_grpc(context), request)

    def Delete(self, request: api.DeleteTaskRequest, context: grpc.ServicerContext) -> api.DeleteResponse:  # noqa: N802
        return self.service.delete_task(Call.from_grpc(context), request)

    def DeleteProcess(  # noqa: N802
        self, request: api.DeleteProcessRequest, context: grpc.ServicerContext
    ) -> api.DeleteResponse:
        return self.service.delete_process(Call.from_grpc(context), request)

    def Get(self, request: api.GetRequest, context: grpc.ServicerContext) -> api.GetResponse:  # noqa: N802
        return self.service.get(Call.from_grpc(context), request)

    def List(self, request: api.ListTasksRequest, context: grpc.ServicerContext) -> api.ListTasksResponse:  # noqa: N802
        return self.service.list(Call.from_grpc(context), request)

    def Kill(self, request: api.KillRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.kill(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def Exec(self, request: api.ExecProcessRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.exec(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def ResizePty(self, request: api.ResizePtyRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.resize_pty(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def CloseIO(self, request: api.CloseIORequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.close_io(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def Pause(self, request: api.PauseTaskRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.pause(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def Resume(self, request: api.ResumeTaskRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.resume(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def ListPids(self, request: api.ListPidsRequest, context: grpc.ServicerContext) -> api.ListPidsResponse:  # noqa: N802
        return self.service.list_pids(Call.from_grpc(context), request)

    def Checkpoint(  # noqa: N802
        self, request: api.CheckpointTaskRequest, context: grpc.ServicerContext
    ) -> api.CheckpointTaskResponse:
        return self.service.checkpoint(Call.from_grpc(context), request)

    def Update(self, request: api.UpdateTaskRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:  # noqa: N802
        self.service.update(Call.from_grpc(context), request)
        return empty_pb2.Empty()

    def Metrics(self, request: api.MetricsRequest, context: grpc.ServicerContext) -> api.MetricsResponse:  # noqa: N802
        return self.service.metrics(Call.from_grpc(context), request)

    def Wait(self, request: api.WaitRequest, context: grpc.ServicerContext) -> api.WaitResponse:  # noqa: N802
        return self.service.wait(Call.from_grpc(context), request)


class TasksGRPC:
    """The ``io.containerd.grpc.v1.tasks`` plugin."""

    #: gRPC workers this plugin's long calls may hold at once (for pool sizing).
    long_call_workers = MAX_CONCURRENT_WAITS

    def __init__(self, service: TasksService) -> None:
        self.service = service
        self.servicer = TasksServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_TasksServicer_to_server(self.servicer, server)


@dataclass
class TasksConfig:
    """``[plugins."io.containerd.service.v1.tasks-service"]``."""

    rdt_config_file: str = ""


def _init_service(ic: InitContext) -> TasksService:
    config: TasksConfig = ic.config
    runtime: TaskManager = ic.get_by_id(RUNTIME_V2, "task")
    metadata = ic.get(METADATA)
    try:
        monitor = ic.get(MONITOR)
    except NotFound:
        from cdtwist.monitor.cgroups import TaskMonitor

        monitor = TaskMonitor()
    if config.rdt_config_file:
        log.error("RDT initialization failed", error="RDT is not supported by cdtwist")
    plugins = ic.plugins

    def content_store() -> Any:
        return plugins.get_by_id(SERVICE, "content-service").store

    service = TasksService(
        runtime,
        ContainerStore(metadata.db),
        monitor,
        ic.reactor,
        state_timeout=ic.timeout(STATE_TIMEOUT, 2.0),
        content_store=content_store,
    )

    def monitor_recovered(_: object) -> None:
        for task in runtime.tasks(None):
            monitor.monitor(task, None)

    runtime.ready().addCallback(monitor_recovered)
    return service


def _init_grpc(ic: InitContext) -> TasksGRPC:
    service = ic.get_by_type(SERVICE).get(SERVICE_ID)
    if service is None:
        raise CdtwistError("tasks service not found")
    return TasksGRPC(service)


register(
    Registration(
        type=SERVICE,
        id=SERVICE_ID,
        requires=(EVENT, RUNTIME_V2, METADATA, MONITOR),
        config=TasksConfig,
        init=_init_service,
    )
)
register(Registration(type=GRPC, id="tasks", requires=(SERVICE,), init=_init_grpc))
