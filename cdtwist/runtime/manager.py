# -*- test-case-name: tests.test_runtime_manager -*-
"""``io.containerd.runtime.v2.task``: the v2 shim manager (containerd's ``runtime/v2/manager.go``).

Creating a task makes a bundle, runs ``<shim> start`` in it, dials the
address the shim prints and asks it to create the task; deleting one asks
the shim to delete it, shuts the shim down and removes the bundle.
Whenever a shim connection ends (the shim died, or was shut down) the
manager runs ``<shim> delete`` for it, as containerd's ``onClose`` does,
and, if the task was still listed, publishes ``/tasks/exit`` and
``/tasks/delete`` on its behalf.

Recovery: at start the manager reconnects to the shims whose bundles are
under its state dir and cleans up after dead ones, all concurrently and in
the background, so the daemon serves at once; callers that need the task
list wait for :meth:`ShimManager.ready` (bounded by the shim load and
cleanup timeouts).  When the daemon stops, connections are dropped
without cleanup: shims and their containers keep running.

Everything here runs on the reactor thread; disk work (bundles, address
files, mounts) goes to the I/O pool.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import timestamp_pb2
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from cdtwist.api.events import task_pb2 as events
from cdtwist.errors import AlreadyExists, CdtwistError, InvalidArgument, NotFound
from cdtwist.log import get_logger
from cdtwist.mount import unmount_all
from cdtwist.plugin import EVENT, METADATA, RUNTIME_V2, Registration, register
from cdtwist.runtime.binary import DeleteRun, Exit, ShimBinary, binary_name, resolve_runtime_path
from cdtwist.runtime.bundle import (
    ADDRESS_FILENAME,
    LOG_FILENAME,
    SHIM_BINARY_PATH_FILENAME,
    Bundle,
    load_bundle,
    new_bundle,
    read_address,
    socket_path,
)
from cdtwist.runtime.containers import ContainerGetter, ContainerStore
from cdtwist.runtime.publish import write_publish_binary
from cdtwist.runtime.shim import CreateOpts, ShimClosedError, ShimTask
from cdtwist.sockets import socket_is_live
from cdtwist.ttrpc import TTRPCClient, TTRPCClientProtocol

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from cdtwist.events.exchange import Exchange
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

T = TypeVar("T")

LOAD_TIMEOUT = "io.containerd.timeout.shim.load"
CLEANUP_TIMEOUT = "io.containerd.timeout.shim.cleanup"
SHUTDOWN_TIMEOUT = "io.containerd.timeout.shim.shutdown"
STATE_TIMEOUT = "io.containerd.timeout.task.state"

TASK_EXIT_TOPIC = "/tasks/exit"
TASK_DELETE_TOPIC = "/tasks/delete"

#: Go's ``shim.Connect`` dial timeout.
DIAL_TIMEOUT = 100.0
PUBLISH_BINARY = "cdtwist-publish"


class TaskNotExists(NotFound):
    """containerd's ``runtime.ErrTaskNotExists``."""

    text = "task does not exist"


def wrap_error(prefix: str, err: BaseException) -> BaseException:
    """``fmt.Errorf(prefix + ": %w", err)``: same class, context prefixed."""
    if isinstance(err, CdtwistError):
        new = err.__class__.__new__(err.__class__)
        new.__dict__.update(err.__dict__)
        new.context = f"{prefix}: {err.context}" if err.context else prefix
        Exception.__init__(new, new.message)
        return new
    return CdtwistError(f"{prefix}: {err}")


@dataclass
class Timeouts:
    load: float = 5.0
    cleanup: float = 5.0
    shutdown: float = 3.0
    state: float = 2.0


@dataclass
class PreparedLaunch:
    """A bundle made ahead of :meth:`ShimManager.start_shim` (see :meth:`ShimManager.prepare_launch`)."""

    bundle: Bundle
    runtime_path: str
    log_fd: int
    #: set on the reactor once start_shim (or discard_launch) has taken it over
    taken: bool = False


class TaskList:
    """Tasks by namespace then id (containerd's ``runtime.TaskList``); reactor thread only."""

    def __init__(self) -> None:
        self._tasks: dict[str, dict[str, ShimTask]] = {}

    def get(self, namespace: str, id: str) -> ShimTask:
        task = self._tasks.get(namespace, {}).get(id)
        if task is None:
            raise TaskNotExists()
        return task

    def get_all(self, namespace: str | None) -> list[ShimTask]:
        if namespace is None:
            return [t for tasks in self._tasks.values() for t in tasks.values()]
        return list(self._tasks.get(namespace, {}).values())

    def add(self, task: ShimTask) -> None:
        tasks = self._tasks.setdefault(task.namespace, {})
        if task.id in tasks:
            raise AlreadyExists(f"{task.id}: task already exists")
        tasks[task.id] = task

    def delete(self, namespace: str, id: str, task: ShimTask | None = None) -> None:
        """Remove ``id`` (only if it is still ``task``, when given)."""
        tasks = self._tasks.get(namespace)
        if tasks is not None and (task is None or tasks.get(id) is task):
            tasks.pop(id, None)

    def __contains__(self, item: tuple[str, str]) -> bool:
        namespace, id = item
        return id in self._tasks.get(namespace, {})

    def __len__(self) -> int:
        return sum(len(t) for t in self._tasks.values())


@implementer(IReadDescriptor)
class ShimLog:
    """Copies a shim's log FIFO to the daemon's stderr, as containerd does.

    The FIFO is opened read-write and non-blocking (Go's ``openShimLog``), so
    the shim's write-only open never blocks and the reader never sees EOF.
    """

    def __init__(self, reactor: Any, fd: int, write: Callable[[bytes], object] | None = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.write = write or _write_stderr
        self.closed = False
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "shim-log"

    def doRead(self) -> None:  # noqa: N802
        for _ in range(16):
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            if not data:
                return
            self.write(data)

    def connectionLost(self, reason: object) -> None:  # noqa: N802
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.reactor.removeReader(self)
        self.closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass


def _write_stderr(data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(2, view)
        except BlockingIOError:
            continue
        except OSError:
            return
        view = view[n:]


class _QuietClientFactory(Factory):
    """Builds ttrpc client protocols without Twisted's "Starting factory" lines (one per shim)."""

    noisy = False

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def buildProtocol(self, addr: object) -> TTRPCClientProtocol:  # noqa: N802 - Twisted's name
        return TTRPCClientProtocol(self.reactor)


async def dial_shim(reactor: Any, address: str, timeout: float) -> TTRPCClient:
    """Go's ``shim.Connect`` + ``ttrpc.NewClient`` for a shim address (``unix://...`` or abstract)."""
    endpoint = UNIXClientEndpoint(reactor, socket_path(address), timeout=timeout)
    proto = await endpoint.connect(_QuietClientFactory(reactor))
    assert proto.client is not None
    return proto.client


def open_shim_log(bundle: Bundle) -> int:
    """Create (if needed) and open the bundle's ``log`` FIFO; blocking."""
    path = bundle.file(LOG_FILENAME)
    try:
        os.mkfifo(path, 0o700)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise CdtwistError(f"open shim log pipe: file {path} is not fifo") from None
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class ShimManager:
    """Launches, tracks and cleans up shims (containerd's ``ShimManager``)."""

    def __init__(
        self,
        *,
        root: str,
        state: str,
        address: str,
        ttrpc_address: str,
        publish_binary: str,
        exchange: Exchange,
        containers: ContainerGetter,
        reactor: Any,
        io_pool: ThreadPool,
        timeouts: Timeouts | None = None,
        debug: bool = False,
        sched_core: bool = False,
        shim_log_writer: Callable[[bytes], object] | None = None,
    ) -> None:
        self.root = root
        self.state = state
        self.address = address
        self.ttrpc_address = ttrpc_address
        self.publish_binary = publish_binary
        self.exchange = exchange
        self.containers = containers
        self.reactor = reactor
        self.io_pool = io_pool
        self.timeouts = timeouts or Timeouts()
        self.debug = debug
        self.sched_core = sched_core
        self.shim_log_writer = shim_log_writer
        self.tasks = TaskList()
        self.runtime_paths: dict[str, str] = {}
        self.stopping = False
        self._loaded: Deferred[None] | None = None
        self._ready_waiters: list[Deferred[None]] = []
        #: each connected shim's log reader, closed with its connection
        self._logs: dict[tuple[str, str], ShimLog] = {}

    # -- helpers ------------------------------------------------------------

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.io_pool, fn, *args)

    def binary(self, bundle: Bundle, runtime_path: str) -> ShimBinary:
        return ShimBinary(
            bundle=bundle,
            runtime=runtime_path,
            address=self.address,
            ttrpc_address=self.ttrpc_address,
            publish_binary=self.publish_binary,
            debug=self.debug,
            sched_core=self.sched_core,
        )

    async def resolve_runtime_path(self, runtime: str) -> str:
        """Go's ``resolveRuntimePath``, cached by binary name (a cache hit stays on the reactor)."""
        if runtime and not os.path.isabs(runtime):
            cached = self.runtime_paths.get(binary_name(runtime))
            if cached is not None:
                return cached
        return await self._in_thread(resolve_runtime_path, runtime, self.runtime_paths)

    # -- readiness (recovery) -------------------------------------------------

    def start(self) -> None:
        """Plugin start: recover existing shims in the background."""
        self._loaded = ensureDeferred(self.load_existing_tasks())
        self._loaded.addErrback(lambda f: log.failure("loading existing tasks", f))
        self._loaded.addBoth(self._fire_ready)

    def _fire_ready(self, _: object) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def is_ready(self) -> bool:
        """Whether recovery has finished (what :meth:`ready` waits for); safe from any thread."""
        loaded = self._loaded
        return loaded is None or loaded.called

    def ready(self) -> Deferred[None]:
        """Fires once recovery has finished (at once if it has)."""
        d: Deferred[None] = Deferred()
        if self._loaded is None or self._loaded.called:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    # -- launching ------------------------------------------------------------

    def prepare_launch(self, namespace: str, id: str, opts: CreateOpts) -> PreparedLaunch:
        """Blocking, from a pool thread: what :meth:`start_shim` would prepare first (see there).

        The caller must have checked, once recovery finished, that no task ``id``
        exists in ``namespace``; the bundle dir (created exclusively) then stands
        for the new task.  Hand the result to :meth:`start_shim`, or to
        :meth:`discard_launch` if the task is not created after all.
        """
        return PreparedLaunch(*self._prepare_launch(namespace, id, opts))

    async def discard_launch(self, prepared: PreparedLaunch) -> None:
        """On the reactor: undo an unused :meth:`prepare_launch` (log pipe, bundle)."""
        if prepared.taken:
            return
        prepared.taken = True
        try:
            os.close(prepared.log_fd)
        except OSError:
            pass
        await self._delete_bundle(prepared.bundle)

    async def start_shim(
        self, namespace: str, id: str, opts: CreateOpts, prepared: PreparedLaunch | None = None
    ) -> ShimTask:
        """Go's ``ShimManager.Start``: bundle, shim process, connection, task list.

        ``prepared`` (from :meth:`prepare_launch`, made on the caller's thread)
        saves the trip to the I/O pool for the bundle.
        """
        if prepared is not None and not prepared.taken:
            prepared.taken = True
            bundle, runtime_path, log_fd = prepared.bundle, prepared.runtime_path, prepared.log_fd
        else:
            bundle, runtime_path, log_fd = await self._in_thread(self._prepare_launch, namespace, id, opts)
        try:
            shim = await self._launch(bundle, runtime_path, log_fd, opts)
        except BaseException:
            await self._delete_bundle(bundle)
            raise
        try:
            self.tasks.add(shim)
        except CdtwistError as e:
            await self._cleanup_shim(shim)
            raise wrap_error("failed to add task", e) from None
        return shim

    def _prepare_launch(self, namespace: str, id: str, opts: CreateOpts) -> tuple[Bundle, str, int]:
        """Blocking, in one pool hop: the bundle, the shim binary, its log FIFO and ``shim-binary-path``.

        (containerd writes ``shim-binary-path`` once the shim answers; a shim that
        fails to start takes its whole bundle with it, so writing it first is the same.)
        """
        bundle = new_bundle(self.root, self.state, namespace, id, opts.spec)
        try:
            try:
                runtime_path = resolve_runtime_path(opts.runtime, self.runtime_paths)
            except CdtwistError as e:
                raise wrap_error("failed to resolve runtime path", e) from None
            try:
                log_fd = open_shim_log(bundle)
            except OSError as e:
                raise CdtwistError(f"start failed: open shim log pipe: {e}") from None
            try:
                _write_file(bundle.file(SHIM_BINARY_PATH_FILENAME), runtime_path.encode(), 0o600)
            except OSError as e:
                os.close(log_fd)
                raise CdtwistError(f"start failed: {e}") from None
        except BaseException:
            try:
                bundle.delete()
            except Exception as e:
                log.error("failed to delete bundle", id=bundle.id, error=str(e))
            raise
        return bundle, runtime_path, log_fd

    async def _launch(self, bundle: Bundle, runtime_path: str, log_fd: int, opts: CreateOpts) -> ShimTask:
        binary = self.binary(bundle, runtime_path)
        shim_log = ShimLog(self.reactor, log_fd, self.shim_log_writer)
        try:
            address = await binary.start(self.reactor, opts.options)
        except BaseException as e:
            shim_log.close()
            raise wrap_error("start failed", e) from None
        try:
            client = await dial_shim(self.reactor, address, DIAL_TIMEOUT)
        except BaseException as e:
            shim_log.close()
            # The shim runs but cannot be reached: have it clean up after itself.
            try:
                await binary.delete(self.reactor, timeout=self.timeouts.cleanup)
            except Exception as cleanup_error:
                log.warn("failed to clean up unreachable shim", id=bundle.id, error=str(cleanup_error))
            raise wrap_error("start failed", e) from None
        return self._track(bundle, client, binary, shim_log)

    def _track(self, bundle: Bundle, client: Any, binary: ShimBinary, shim_log: ShimLog) -> ShimTask:
        ns, id = bundle.namespace, bundle.id
        shim = ShimTask(
            bundle,
            client,
            runtime=binary.runtime,
            state_timeout=self.timeouts.state,
            shutdown_timeout=self.timeouts.shutdown,
        )
        self._logs[(ns, id)] = shim_log

        async def on_close() -> None:
            # `<shim> delete` starts first; the lines below are logged while it runs.
            started = binary.spawn_delete(self.reactor, timeout=self.timeouts.cleanup)
            log.info("shim disconnected", id=id)
            try:
                await self.cleanup_after_dead_shim(id, ns, binary, shim, started)
            finally:
                # Remove self from the task list: its shim is gone.
                self.tasks.delete(ns, id, shim)
                if self._logs.get((ns, id)) is shim_log:
                    del self._logs[(ns, id)]
                shim_log.close()

        shim.on_close = on_close
        return shim

    async def _cleanup_shim(self, shim: ShimTask) -> None:
        """Go's ``cleanupShim``: after a failed start, delete the shim's traces."""
        await self._shim_delete(shim)
        self.tasks.delete(shim.namespace, shim.id, shim)

    async def _delete_bundle(self, bundle: Bundle) -> None:
        try:
            await self._in_thread(bundle.delete)
        except Exception as e:
            log.error("failed to delete bundle", id=bundle.id, error=str(e))

    # -- deleting -------------------------------------------------------------

    async def _shim_delete(self, shim: ShimTask) -> None:
        """Go's ``shim.delete``: close the client, wait for the close handler, remove the bundle."""
        problems: list[str] = []
        shim.close()
        try:
            await _with_timeout(self.reactor, shim.close_handled, self.timeouts.cleanup * 2)
        except CdtwistError as e:
            problems.append(f"close wait error: {e}")
        if not shim.bundle_deleted:  # the close handler usually has removed it
            try:
                await self._in_thread(shim.bundle.delete)
            except Exception as e:
                log.error("failed to delete bundle", id=shim.id, error=str(e))
                problems.append(f"failed to delete bundle: {e}")
        if problems:
            raise CdtwistError("; ".join(problems))

    async def delete_task(self, shim: ShimTask) -> Exit:
        """Go's ``shimTask.delete`` as ``TaskManager.Delete`` calls it."""
        ns, id = shim.namespace, shim.id
        shim_err: BaseException | None = None
        response: Exit | None = None
        try:
            response = await shim.delete_process("")
        except BaseException as e:
            log.debug("failed to delete task", id=id, error=str(e))
            if isinstance(e, (ShimClosedError, NotFound)):
                shim_err = e
            else:
                raise wrap_error("failed to delete task", e) from None
        if shim_err is None:
            self.tasks.delete(ns, id, shim)
        try:
            await shim.shutdown(timeout=self.timeouts.shutdown)
        except Exception as e:
            log.error("failed to shutdown shim task", id=id, error=str(e))
        try:
            await self._shim_delete(shim)
        except Exception as e:
            log.error("failed to delete shim", id=id, error=str(e))
        self.tasks.delete(ns, id, shim)
        if shim_err is not None:
            raise wrap_error("failed to delete task", shim_err)
        assert response is not None
        return response

    async def abort_create(self, shim: ShimTask) -> None:
        """A shim whose task could not be created: delete what exists, else shut it down."""
        self.tasks.delete(shim.namespace, shim.id, shim)
        try:
            await shim.delete_process("", timeout=self.timeouts.cleanup)
        except BaseException:
            try:
                await shim.shutdown(timeout=self.timeouts.cleanup)
            except Exception:
                pass
            shim.close()
            # the close handler runs `<shim> delete`, which removes the bundle
            try:
                await _with_timeout(self.reactor, shim.close_handled, self.timeouts.cleanup * 2)
            except CdtwistError as e:
                log.warn("cleanup after failed create", id=shim.id, error=str(e))
            return
        try:
            await shim.shutdown(timeout=self.timeouts.shutdown)
        except Exception as e:
            log.error("failed to shutdown shim task", id=shim.id, error=str(e))
        try:
            await self._shim_delete(shim)
        except Exception as e:
            log.error("failed to delete shim", id=shim.id, error=str(e))

    async def cleanup_after_dead_shim(
        self,
        id: str,
        namespace: str,
        binary: ShimBinary,
        shim: ShimTask | None = None,
        started: DeleteRun | None = None,
    ) -> None:
        """Go's ``cleanupAfterDeadShim``: ``<shim> delete`` (or collect ``started``), then exit/delete
        events if still listed."""
        log.warn("cleaning up after shim disconnected", id=id, namespace=namespace)
        exit: Exit | None = None
        bundle_deleted: list[Deferred[None]] = []

        def delete_bundle() -> None:
            bundle_deleted.append(self._in_thread(_delete_dead_bundle, binary.bundle))

        try:
            exit = await binary.delete(self.reactor, timeout=self.timeouts.cleanup, started=started, then=delete_bundle)
            await bundle_deleted[0]  # started by ``then`` once the command succeeded
            if shim is not None:
                shim.bundle_deleted = True
        except Exception as e:
            log.warn("failed to clean up after shim disconnected", id=id, namespace=namespace, error=str(e))
        listed = (namespace, id) in self.tasks and (shim is None or self.tasks.get(namespace, id) is shim)
        if not listed:
            # never started, or already deleted: no events to publish
            return
        if exit is not None:
            pid, status, exited_at = exit.pid, exit.status, exit.timestamp
        else:
            pid, status = 0, 255
            exited_at = timestamp_pb2.Timestamp()
            exited_at.GetCurrentTime()
        self.exchange.publish(
            namespace,
            TASK_EXIT_TOPIC,
            events.TaskExit(container_id=id, id=id, pid=pid, exit_status=status, exited_at=exited_at),
        )
        self.exchange.publish(
            namespace,
            TASK_DELETE_TOPIC,
            events.TaskDelete(container_id=id, pid=pid, exit_status=status, exited_at=exited_at),
        )

    # -- recovery -------------------------------------------------------------

    async def load_existing_tasks(self) -> None:
        """Go's ``loadExistingTasks``: every bundle under state, concurrently."""
        namespaces = await self._in_thread(_visible_dirs, self.state)
        for ns in namespaces:
            log.debug("loading tasks in namespace", namespace=ns)
        per_ns = await DeferredList(
            [ensureDeferred(self._load_namespace(ns)) for ns in namespaces], consumeErrors=True
        )
        for ns, (ok, result) in zip(namespaces, per_ns, strict=True):
            if not ok:
                log.error("loading tasks in namespace", namespace=ns, error=str(result.value))
                continue
            try:
                await self._in_thread(self._cleanup_work_dirs, ns, {t.id for t in self.tasks.get_all(ns)})
            except Exception as e:
                log.error("cleanup working directory in namespace", namespace=ns, error=str(e))

    async def _load_namespace(self, namespace: str) -> None:
        ids = await self._in_thread(_visible_dirs, os.path.join(self.state, namespace))
        await DeferredList([ensureDeferred(self._load_shim(namespace, id)) for id in ids], consumeErrors=True)

    async def _load_shim(self, namespace: str, id: str) -> None:
        bundle = load_bundle(self.state, namespace, id)
        try:
            entries = await self._in_thread(os.listdir, bundle.path)
        except OSError as e:
            await self._delete_bundle(bundle)
            log.error(f"fast path read bundle path for {bundle.path}", error=str(e))
            return
        if not entries:
            await self._delete_bundle(bundle)
            return
        runtime = await self._in_thread(_read_optional, bundle.file(SHIM_BINARY_PATH_FILENAME))
        if not runtime:
            try:
                container = await self._in_thread(self.containers.get, namespace, id)
            except Exception as e:
                log.error(f"loading container {id}", error=str(e))
                await self._in_thread(_unmount_quietly, bundle.rootfs)
                await self._delete_bundle(bundle)
                return
            runtime = container.runtime_name
        try:
            runtime_path = await self.resolve_runtime_path(runtime)
        except Exception as e:
            await self._delete_bundle(bundle)
            log.error("failed to resolve runtime path", error=str(e))
            return
        binary = self.binary(bundle, runtime_path)
        try:
            shim = await self._reconnect(bundle, binary)
        except Exception as e:
            log.info("shim not reachable, cleaning up", id=id, namespace=namespace, error=str(e))
            await self.cleanup_after_dead_shim(id, namespace, binary)
            return
        if self.stopping:  # the daemon stopped while this shim was being loaded
            shim.detach()
            return
        try:
            self.tasks.add(shim)
        except CdtwistError:
            shim.detach()

    async def _reconnect(self, bundle: Bundle, binary: ShimBinary) -> ShimTask:
        """Go's ``loadShim``: address file, dial, log pipe, then a ``Connect`` within the load timeout."""
        address = await self._in_thread(read_address, bundle)
        client = await dial_shim(self.reactor, address, self.timeouts.load)
        try:
            log_fd = await self._in_thread(open_shim_log, bundle)
        except Exception as e:
            client.close()
            raise CdtwistError(f"open shim log pipe when reload: {e}") from None
        shim_log = ShimLog(self.reactor, log_fd, self.shim_log_writer)
        shim = self._track(bundle, client, binary, shim_log)
        try:
            await shim.pid(timeout=self.timeouts.load)
        except BaseException:
            shim.detach()
            self._logs.pop((bundle.namespace, bundle.id), None)
            shim_log.close()
            raise
        return shim

    def _cleanup_work_dirs(self, namespace: str, loaded: set[str]) -> None:
        """Work dirs of tasks not loaded (their state was lost, e.g. on reboot) go; blocking."""
        base = os.path.join(self.root, namespace)
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return
        for name in names:
            if name not in loaded:
                path = os.path.join(base, name)
                try:
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
                except OSError as e:
                    log.error(f"cleanup working dir {path}", error=str(e))

    # -- stop -----------------------------------------------------------------

    def stop(self) -> None:
        """The daemon stops: drop every connection; shims and containers live on."""
        self.stopping = True
        for shim in self.tasks.get_all(None):
            shim.detach()
        for shim_log in list(self._logs.values()):
            shim_log.close()
        self._logs.clear()


class TaskManager:
    """``io.containerd.runtime.v2.task``: tasks on top of the shim manager (``TaskManager``)."""

    def __init__(self, shims: ShimManager) -> None:
        self.shims = shims

    @property
    def id(self) -> str:
        return f"{RUNTIME_V2}.task"

    def start(self) -> None:
        self.shims.start()

    def stop(self) -> None:
        self.shims.stop()

    def ready(self) -> Deferred[None]:
        return self.shims.ready()

    def is_ready(self) -> bool:
        """Recovery has finished (any thread)."""
        return self.shims.is_ready()

    def exists(self, namespace: str, id: str) -> bool:
        """Whether the task is listed now (any thread: a plain dict lookup; the reactor's answer is final)."""
        return (namespace, id) in self.shims.tasks

    def prepare(self, namespace: str, id: str, opts: CreateOpts) -> PreparedLaunch:
        """Blocking (any thread but the reactor): the bundle for :meth:`create`, errors worded as create's."""
        try:
            return self.shims.prepare_launch(namespace, id, opts)
        except BaseException as e:
            raise wrap_error("failed to start shim", e) from None

    async def discard(self, prepared: PreparedLaunch) -> None:
        """On the reactor: a prepared bundle that :meth:`create` did not take."""
        await self.shims.discard_launch(prepared)

    async def create(
        self, namespace: str, id: str, opts: CreateOpts, prepared: PreparedLaunch | None = None
    ) -> ShimTask:
        """Launch a shim and create the task in it (in ``prepared``'s bundle when given)."""
        try:
            shim = await self.shims.start_shim(namespace, id, opts, prepared)
        except BaseException as e:
            raise wrap_error("failed to start shim", e) from None
        try:
            await shim.create(opts)
        except BaseException as e:
            await self.shims.abort_create(shim)
            raise wrap_error("failed to create shim task", e) from None
        return shim

    def get(self, namespace: str, id: str) -> ShimTask:
        return self.shims.tasks.get(namespace, id)

    def tasks(self, namespace: str | None) -> list[ShimTask]:
        """Tasks of ``namespace`` (None: every namespace)."""
        return self.shims.tasks.get_all(namespace)

    async def delete(self, namespace: str, id: str) -> Exit:
        shim = self.shims.tasks.get(namespace, id)
        return await self.shims.delete_task(shim)


# -- small blocking helpers ------------------------------------------------------


def _visible_dirs(path: str) -> list[str]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))


def _read_optional(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except OSError as e:
        log.error("failed to read `runtime` path from bundle", error=str(e))
        return ""


def _delete_dead_bundle(bundle: Bundle) -> None:
    """After ``<shim> delete``: the shim's socket if it was left behind, then the bundle."""
    address = _read_optional(bundle.file(ADDRESS_FILENAME))
    if address:
        # A shim that was killed leaves its socket behind (one that exits removes it).
        _remove_dead_socket(address)
    bundle.delete()


def _remove_dead_socket(address: str) -> None:
    """Unlink a shim's ``unix://`` socket if nothing listens on it any more."""
    if not address.startswith("unix://"):
        return
    path = socket_path(address)
    try:
        if not socket_is_live(path):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("failed to remove shim socket", path=path, error=str(e))


def _write_file(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _unmount_quietly(path: str) -> None:
    try:
        unmount_all(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.error("failed to unmount of rootfs", path=path, error=str(e))


async def _with_timeout(reactor: Any, d: Deferred[T], timeout: float) -> T:
    """Wait for ``d`` without cancelling it; DeadlineExceeded-like error after ``timeout``."""
    waiter: Deferred[T] = Deferred()

    def done(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(result)
        return result

    d.addBoth(done)
    def expire() -> None:
        if not waiter.called:
            waiter.errback(CdtwistError("context deadline exceeded"))

    timer = reactor.callLater(timeout, expire)
    try:
        return await waiter
    finally:
        if timer.active():
            timer.cancel()


# -- the plugin ------------------------------------------------------------------


@dataclass
class RuntimeConfig:
    """``[plugins."io.containerd.runtime.v2.task"]``."""

    platforms: list[str] = field(default_factory=lambda: [_default_platform()])
    sched_core: bool = False


def _default_platform() -> str:
    from cdtwist.snapshots import default_platform

    p = default_platform()
    return "/".join(x for x in (p.os, p.architecture, p.variant) if x)


def _parse_platform(text: str) -> Any:
    from cdtwist.plugin.context import Platform

    parts = text.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(f'"{text}": unknown operating system or architecture')
    parts += [""] * (3 - len(parts))
    return Platform(os=parts[0], architecture=parts[1], variant=parts[2])


def timeouts_from(ic: InitContext) -> Timeouts:
    return Timeouts(
        load=ic.timeout(LOAD_TIMEOUT, 5.0),
        cleanup=ic.timeout(CLEANUP_TIMEOUT, 5.0),
        shutdown=ic.timeout(SHUTDOWN_TIMEOUT, 3.0),
        state=ic.timeout(STATE_TIMEOUT, 2.0),
    )


def _address_path(address: str) -> str:
    from cdtwist.endpoints import unix_path

    return unix_path(address) or address


async def _init(ic: InitContext) -> TaskManager:
    config: RuntimeConfig = ic.config
    ic.meta.platforms = [_parse_platform(p) for p in config.platforms]
    metadata = ic.get(METADATA)
    exchange = ic.get_by_id(EVENT, "exchange")
    root, state = ic.root, ic.state

    def prepare() -> str:
        for d in (root, state):
            os.makedirs(d, 0o711, exist_ok=True)
        return write_publish_binary(os.path.join(root, PUBLISH_BINARY))

    publish_binary = await deferToThreadPool(ic.reactor, ic.io_pool, prepare)
    level = str(getattr(getattr(ic.daemon_config, "debug", None), "level", "") or "").lower()
    shims = ShimManager(
        root=root,
        state=state,
        address=_address_path(ic.address),
        ttrpc_address=_address_path(ic.ttrpc_address),
        publish_binary=publish_binary,
        exchange=exchange,
        containers=ContainerStore(metadata.db),
        reactor=ic.reactor,
        io_pool=ic.io_pool,
        timeouts=timeouts_from(ic),
        debug=level in ("debug", "trace"),
        sched_core=config.sched_core,
    )
    return TaskManager(shims)


def _init_deferred(ic: InitContext) -> Deferred[TaskManager]:
    return Deferred.fromCoroutine(_init(ic))


register(
    Registration(
        type=RUNTIME_V2,
        id="task",
        requires=(EVENT, METADATA),
        config=RuntimeConfig,
        init=_init_deferred,
    )
)
