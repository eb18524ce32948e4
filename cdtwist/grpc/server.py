# -*- test-case-name: tests.test_grpc_server -*-
"""grpcio serving the plugins' servicers from its own thread pool.

grpcio owns its sockets and threads, so this service only prepares the
socket path, builds the server after the daemon has forked (never in
``makeService``), and shuts it down with a grace period while the reactor
is still running.  Servicers are collected after every plugin has
initialised, as containerd's ``server.New`` does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.endpoints import server_description, unix_mode, unix_path
from cdtwist.errors import InvalidArgument
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor, GRPCMetrics, InterceptedGenericHandler
from cdtwist.log import get_logger
from cdtwist.sockets import prepare_unix_path, remove_socket, secure_socket

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from twisted.internet.interfaces import IReactorCore
    from twisted.python.threadpool import ThreadPool

log = get_logger(__name__)

#: Long-lived calls (event subscriptions, task waits) each hold a worker;
#: the cap on concurrent RPCs answers RESOURCE_EXHAUSTED past it instead of
#: queueing silently.
DEFAULT_WORKERS = 128
DEFAULT_MAX_CONCURRENT = 1024
STOP_GRACE = 1.5


class GRPCServerService(Service):
    name = "grpc"

    def __init__(
        self,
        grpc_config: Any,
        servicers: Callable[[], list[Any]],
        *,
        reactor: IReactorCore,
        io_pool: ThreadPool,
        metrics_registry: CollectorRegistry | None = None,
        histogram: bool = False,
        workers: int = DEFAULT_WORKERS,
        bridge_socket: str = "",
    ) -> None:
        self.config = grpc_config
        self.servicers = servicers
        self.reactor = reactor
        self.io_pool = io_pool
        self.metrics = GRPCMetrics(metrics_registry, histogram) if metrics_registry else None
        self.interceptor = ErrorAndMetricsInterceptor(self.metrics)
        self.workers = workers
        self.server: grpc.Server | None = None
        self.tcp_server: grpc.Server | None = None
        self.executor: HandoffPool | None = None
        path = unix_path(grpc_config.address)
        if path is None:
            raise InvalidArgument(
                f"grpc.address {grpc_config.address!r}: the API socket must be a UNIX socket "
                "(use tcp_address for TCP)"
            )
        self.address: str = path
        self.mode = unix_mode(grpc_config.address)
        #: only a socket this service bound is removed on stop, never another daemon's.
        self._bound = False
        self._bridge_bound = False
        self.bridge_socket = bridge_socket or self.address + ".tcp-bridge"
        self.bridge: Any = None

    def queue_length(self) -> int:
        """Calls accepted but waiting for a worker (the debug socket shows it)."""
        executor = self.executor
        return executor.queue_length() if executor is not None else 0

    def worker_count(self) -> int:
        executor = self.executor
        return executor.worker_count() if executor is not None else 0

    def _options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
        if self.config.max_recv_message_size > 0:
            opts.append(("grpc.max_receive_message_length", self.config.max_recv_message_size))
        if self.config.max_send_message_size > 0:
            opts.append(("grpc.max_send_message_length", self.config.max_send_message_size))
        return opts

    def _new_server(self) -> grpc.Server:
        assert self.executor is not None
        # No grpcio interceptors: _register wraps every handler once instead
        # (ErrorAndMetricsInterceptor.wrap), which spares the serving thread
        # an interceptor pipeline per call.
        return grpc.server(self.executor, options=self._options(), maximum_concurrent_rpcs=DEFAULT_MAX_CONCURRENT)

    def _start_blocking(self) -> None:
        cfg = self.config
        prepare_unix_path(self.address, cfg.uid, cfg.gid)
        instances = self.servicers()
        # Calls that may last hours (task Wait) bring their own workers, so they
        # never take the ones short calls need.
        extra = sum(int(getattr(i, "long_call_workers", 0)) for i in instances)
        self.executor = HandoffPool(self.workers + extra, "cdtwist-grpc")
        server = self._new_server()
        _register(server, instances, "register_grpc", self.interceptor)
        if server.add_insecure_port("unix:" + self.address) == 0:
            raise OSError(f"failed to listen on {self.address}")
        self._bound = True
        secure_socket(self.address, cfg.uid, cfg.gid, self.mode)
        server.start()
        self.server = server
        if cfg.tcp_address:
            # grpcio binds only a private UNIX socket; Twisted owns the TCP
            # listener (TLS with verified client certificates, or any endpoint
            # string) and bridges each connection to it.
            tcp = self._new_server()
            _register(tcp, instances, "register_tcp", self.interceptor)
            prepare_unix_path(self.bridge_socket)
            if tcp.add_insecure_port("unix:" + self.bridge_socket) == 0:
                raise OSError(f"failed to listen on {self.bridge_socket}")
            self._bridge_bound = True
            secure_socket(self.bridge_socket, mode=0o600)
            tcp.start()
            self.tcp_server = tcp

    def tcp_description(self) -> str:
        """The Twisted endpoint the TCP API listens on (TLS when configured)."""
        cfg = self.config
        from cdtwist.tls import PREFIX, tls_server_description

        address = cfg.tcp_address
        if address.startswith(PREFIX + ":") or address.startswith("ssl:"):
            return address
        inner = server_description(address)
        if cfg.tcp_tls_cert or cfg.tcp_tls_key:
            return tls_server_description(inner, cfg.tcp_tls_cert, cfg.tcp_tls_key, cfg.tcp_tls_ca or None)
        return inner

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            await deferToThreadPool(self.reactor, self.io_pool, self._start_blocking)
        except BaseException:
            await deferToThreadPool(self.reactor, self.io_pool, self._stop_blocking)
            raise
        log.info("serving...", address=self.address)
        if self.tcp_server is not None:
            from cdtwist.bridge import BridgeService

            bridge = BridgeService(self.reactor, self.tcp_description(), self.bridge_socket)
            try:
                await bridge.startService()
            except BaseException:
                await self.stopService()
                raise
            self.bridge = bridge
            log.info("serving...", address=self.config.tcp_address)

    def _begin_stop(self) -> None:
        # Stop both first so their grace periods run side by side; new calls
        # are refused from here on, unary calls in flight finish.
        events = [s.stop(STOP_GRACE) for s in (self.server, self.tcp_server) if s is not None]
        # Streams that would run forever (event subscriptions) end now
        # instead of holding shutdown for the whole grace period.
        for instance in self.servicers():
            drain = getattr(instance, "drain", None)
            if callable(drain):
                drain()
        for event in events:
            event.wait(STOP_GRACE + 1)

    def _finish_stop(self) -> None:
        self.server = self.tcp_server = None
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        if self._bound:
            remove_socket(self.address)
            self._bound = False
        if self._bridge_bound:
            remove_socket(self.bridge_socket)
            self._bridge_bound = False

    def _stop_blocking(self) -> None:
        self._begin_stop()
        self._finish_stop()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Calls in flight over TCP drain through the bridge during the grace
        # period; only then are the bridged connections cut.
        await deferToThreadPool(self.reactor, self.io_pool, self._begin_stop)
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            await bridge.stopService()
        await deferToThreadPool(self.reactor, self.io_pool, self._finish_stop)


class _Task:
    """One submitted call; the part of ``concurrent.futures.Future`` grpcio uses."""

    __slots__ = ("args", "callbacks", "done", "fn", "pool")

    def __init__(self, pool: HandoffPool, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.pool = pool
        self.fn = fn
        self.args = args
        self.callbacks: list[Callable[[_Task], Any]] | None = None
        self.done = False

    def add_done_callback(self, callback: Callable[[_Task], Any]) -> None:
        with self.pool._lock:
            if not self.done:
                if self.callbacks is None:
                    self.callbacks = [callback]
                else:
                    self.callbacks.append(callback)
                return
        callback(self)

    def _finish(self) -> None:
        with self.pool._lock:
            self.done = True
            callbacks, self.callbacks = self.callbacks, None
        if callbacks:
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.failure("gRPC pool: done callback failed", failure=None)


class _Parked:
    """An idle worker, blocked on its own lock until a task is handed to it."""

    __slots__ = ("gate", "task")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.task: _Task | None = None


class HandoffPool:
    """The gRPC handlers' thread pool: grpcio's ``submit`` hands a call straight to an idle worker.

    Same contract as the ``ThreadPoolExecutor`` it replaces (threads made on
    demand up to ``max_workers``, never retired; calls past that wait in a
    FIFO backlog), but cheaper per call, which is what bounds a grpcio server
    holding the GIL: a submit wakes exactly one parked worker through its own
    lock (no shared queue, semaphore or ``Future`` condition), and the worker
    that finished last is the one woken next (LIFO), so a sequential client
    keeps meeting the same warm thread instead of a round-robin of them.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Parked] = []
        self._backlog: deque[_Task] = deque()
        self._threads: set[threading.Thread] = set()
        self._made = 0
        self._shutdown = False

    def queue_length(self) -> int:
        """Calls submitted and waiting for a worker."""
        return len(self._backlog)

    def worker_count(self) -> int:
        return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> _Task:
        task = _Task(self, fn, args)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                parked = self._idle.pop()
                parked.task = task
                parked.gate.release()
                return task
            self._backlog.append(task)
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}_{self._made}", daemon=True)
                self._made += 1
                self._threads.add(thread)
                thread.start()
        return task

    def _work(self) -> None:
        me = _Parked()
        lock = self._lock
        task: _Task | None = None
        try:
            while True:
                with lock:
                    if self._backlog:
                        task = self._backlog.popleft()
                    elif self._shutdown:
                        return
                    else:
                        self._idle.append(me)
                if task is None:
                    me.gate.acquire()
                    task, me.task = me.task, None
                    if task is None:  # woken by shutdown
                        return
                try:
                    task.fn(*task.args)
                except BaseException:
                    # grpcio's own call bodies catch everything; this is a last resort.
                    log.failure("gRPC pool: task failed", failure=None)
                task._finish()
                task = None
        finally:
            with lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            dropped: list[_Task] = []
            if cancel_futures:
                dropped = list(self._backlog)
                self._backlog.clear()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for parked in idle:
            parked.gate.release()  # task None: exit
        for task in dropped:
            task._finish()
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class _RecordingServer:
    """Passes registrations to the grpcio server, each handler wrapped, and remembers the service names."""

    def __init__(self, server: grpc.Server, interceptor: ErrorAndMetricsInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor
        self.services: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name):
                self.services.add(name())
        self._server.add_generic_rpc_handlers(
            tuple(InterceptedGenericHandler(h, self._interceptor) for h in handlers)
        )

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        self.services.add(service_name)
        wrap = self._interceptor.wrap
        self._server.add_registered_method_handlers(
            service_name, {name: wrap(f"/{service_name}/{name}", h) for name, h in handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _UnknownHandler(grpc.GenericRpcHandler):
    """Last in line: answers what no servicer claimed with grpc-go's words."""

    def __init__(self, services: set[str]) -> None:
        self.services = services

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if service in self.services:
            message = f"unknown method {method} for service {service}"
        else:
            message = f"unknown service {service}"

        def abort(request_iterator: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return grpc.stream_stream_rpc_method_handler(abort)


def _register(server: grpc.Server, instances: list[Any], method: str, interceptor: ErrorAndMetricsInterceptor) -> None:
    recorder = _RecordingServer(server, interceptor)
    for instance in instances:
        register = getattr(instance, method, None)
        if callable(register):
            register(recorder)
    recorder.add_generic_rpc_handlers((_UnknownHandler(recorder.services),))
