# -*- test-case-name: tests.test_daemon -*-
"""The root service: what containerd's ``main`` does around its plugins.

``twistd`` calls ``startService`` before the reactor runs, so the real boot
waits for ``callWhenRunning``; a fatal boot error is logged, what started
is stopped in reverse, and the reactor stops with exit status 1 (a
``sys.exit`` inside a reactor callback would be swallowed).

Boot order: root/state dirs (0711) and the root lock, leftover temp mounts,
OOM score, signals; then the children, one by one: the plugin tree in
graph order, the gRPC server (it collects the plugins' servicers), the
metrics endpoint; then ``READY=1``.  Stop runs the same list in reverse.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import sdnotify
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from cdtwist import SERVER_VERSION, revision
from cdtwist.config import Config
from cdtwist.debug import DebugService
from cdtwist.grpc.server import GRPCServerService
from cdtwist.log import LogObserver, dump_stacks, get_logger
from cdtwist.metrics import MetricsService, new_registry
from cdtwist.mount import cleanup_temp_mounts, set_temp_mount_location
from cdtwist.plugin import Registration
from cdtwist.plugin.service import OrderedMultiService, PluginTree
from cdtwist.ttrpc.service import TTRPCServerService

if TYPE_CHECKING:
    from twisted.application.service import IServiceCollection

log = get_logger(__name__)

LOCK_FILE = "cdtwist.lock"
IO_POOL_SIZE = 16


class BootError(Exception):
    """Boot cannot go on; the message is for the operator."""


class Daemon(OrderedMultiService):
    def __init__(
        self,
        config: Config,
        ordered: list[Registration],
        *,
        decode_config: Callable[[Registration], Any],
        log_observer: LogObserver | None = None,
        reload_config: Callable[[], Config] | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.log_observer = log_observer
        self.reload_config = reload_config
        self.io_pool = ThreadPool(minthreads=0, maxthreads=IO_POOL_SIZE, name="cdtwist-io")
        self.exit_code = 0
        self.booted = Deferred()  # fires when serving (tests, sd_notify)
        self._lock_fd: int | None = None
        self.signals = Signals(reactor)
        self._notifier = sdnotify.SystemdNotifier()
        self.metrics_registry = new_registry()

        self.tree = PluginTree(
            ordered,
            root=config.root,
            state=config.state,
            daemon_config=config,
            decode_config=decode_config,
            required={reg.uri for reg in ordered if config.is_required(reg)} | _unknown_required(config, ordered),
            reactor=reactor,
            io_pool=self.io_pool,
            address=config.grpc.address,
            ttrpc_address=config.ttrpc.address,
        )
        self.tree.setServiceParent(self)
        self.grpc = GRPCServerService(
            config.grpc,
            self.tree.instances,
            reactor=reactor,
            io_pool=self.io_pool,
            metrics_registry=self.metrics_registry,
            histogram=config.metrics.grpc_histogram,
            bridge_socket=os.path.join(config.state, "grpc-tcp.sock"),
        )
        self.grpc.setServiceParent(self)
        self.ttrpc = TTRPCServerService(
            config.ttrpc.address, config.ttrpc.uid, config.ttrpc.gid, self.tree.instances, reactor
        )
        self.ttrpc.setServiceParent(self)
        if config.metrics.address:
            MetricsService(config.metrics.address, self.metrics_registry, reactor, self.io_pool).setServiceParent(self)
        if config.debug.address:
            DebugService(
                config.debug.address,
                config.debug.uid,
                config.debug.gid,
                reactor,
                self.io_pool,
                counters={"grpc_pool_queue": self.grpc.queue_length, "grpc_pool_workers": self.grpc.worker_count},
            ).setServiceParent(self)

    # -- twistd integration ------------------------------------------------

    def setServiceParent(self, parent: IServiceCollection) -> None:  # noqa: N802
        super().setServiceParent(parent)
        # twistd starts its log observer after building the application and
        # before starting it: handing ours over here makes every line,
        # twistd's own included, come out in containerd's format.
        set_component = getattr(parent, "setComponent", None)
        if self.log_observer is not None and callable(set_component):
            from twisted.logger import ILogObserver

            set_component(ILogObserver, self.log_observer)

    def startService(self) -> None:  # noqa: N802
        from twisted.application.service import Service

        Service.startService(self)
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit_if_failed)
        self.reactor.callWhenRunning(lambda: ensureDeferred(self._boot()))

    # -- boot --------------------------------------------------------------

    async def _boot(self) -> None:
        started = time.monotonic()
        rev = revision()
        log.info("starting cdtwist", version=SERVER_VERSION, revision=rev)
        for warning in self.config.warnings:
            log.warn("{warning}", warning=warning)
        self.io_pool.start()
        self.tree.revision = rev
        try:
            await deferToThreadPool(self.reactor, self.io_pool, self._prepare)
            self._install_signals()
            await self._start_all()
        except Exception as e:
            await self._fail_boot(e)
            return
        self._notifier.notify("READY=1")
        log.info(f"cdtwist successfully booted in {time.monotonic() - started:f}s")
        self.booted.callback(None)

    async def _fail_boot(self, err: Exception) -> None:
        log.fatal("failed to boot: {error}", error=str(err) or type(err).__name__)
        if not isinstance(err, BootError) and not getattr(err, "expected", False):
            log.failure("boot failure", failure=None)
        self.exit_code = 1
        await self._stop_all()
        self._release()
        if self.reactor.running:
            self.reactor.stop()

    def _prepare(self) -> None:
        """Blocking: dirs, the single-daemon lock, leftover temp mounts, OOM score."""
        cfg = self.config
        # containerd 1.6: root is private (0700), state traversable (0711).
        for path, mode in ((cfg.root, 0o700), (cfg.state, 0o711)):
            os.makedirs(path, mode, exist_ok=True)
            os.chmod(path, mode)
        self._lock_root()
        if cfg.temp:
            os.makedirs(cfg.temp, 0o711, exist_ok=True)
        tmpmounts = os.path.join(cfg.root, "tmpmounts")
        set_temp_mount_location(tmpmounts)
        for mountpoint in cleanup_temp_mounts(tmpmounts):
            log.info("unmounted leftover temp mount", mountpoint=mountpoint)
        if cfg.oom_score:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(cfg.oom_score))
            except PermissionError:
                # containerd fails here too; say why.
                raise BootError(
                    f"failed to apply oom_score {cfg.oom_score}: permission denied "
                    "(lowering it needs CAP_SYS_RESOURCE)"
                ) from None

    def _lock_root(self) -> None:
        self._lock_fd = lock_root(self.config.root, LOCK_FILE, "daemon")

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- signals -----------------------------------------------------------

    def _install_signals(self) -> None:
        self.signals.install(
            {
                # twistd re-raises SIGTERM/SIGINT after the reactor stops, so the
                # process would die "killed by signal"; containerd exits 0.
                signal.SIGTERM: self.signals.stop_reactor,
                signal.SIGINT: self.signals.stop_reactor,
                signal.SIGHUP: self.reload,
                signal.SIGUSR1: self.dump_stacks,
                signal.SIGPIPE: signal.SIG_IGN,
            }
        )

    def dump_stacks(self) -> Deferred[None]:
        """SIGUSR1: every thread's stack to the log and to a file, as containerd does."""
        stacks = dump_stacks()
        log.info("=== BEGIN goroutine stack dump ===\n{stacks}\n=== END goroutine stack dump ===", stacks=stacks)
        path = os.path.join(self.config.temp or "/tmp", f"cdtwist.{os.getpid()}.stacks.log")

        def write() -> None:
            with open(path, "w") as f:
                f.write(stacks)

        d = deferToThreadPool(self.reactor, self.io_pool, write)
        d.addCallback(lambda _: log.info("goroutine stack dump written to {path}", path=path))
        d.addErrback(lambda f: log.failure("writing stack dump", f))
        return d

    def reload(self) -> Deferred[None]:
        """SIGHUP: re-read the config; apply the log level and reloadable plugins."""
        return ensureDeferred(self._reload())

    async def _reload(self) -> None:
        if self.reload_config is None:
            return
        log.info("reloading configuration")
        try:
            config = await deferToThreadPool(self.reactor, self.io_pool, self.reload_config)
        except Exception as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return
        if self.log_observer is not None and config.debug.level:
            self.log_observer.set_level(config.debug.level)
        for plugin in self.tree.plugins.all():
            reg = plugin.registration
            if not reg.reloadable or plugin.error is not None:
                continue
            try:
                await maybe_deferred(plugin.instance.reload, config.plugin_config(reg))
                log.info("reloaded plugin", id=reg.uri)
            except Exception:
                log.failure("reloading plugin {id}", id=reg.uri)
        self.config = config

    # -- stop --------------------------------------------------------------

    def stopService(self) -> Deferred[None]:  # noqa: N802
        from twisted.application.service import Service

        Service.stopService(self)
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        self._notifier.notify("STOPPING=1")
        log.info("stopping cdtwist")
        await self._stop_all()
        self.signals.restore()
        self._release()
        if self.io_pool.started:
            self.io_pool.stop()
        log.info("cdtwist stopped")

    def _exit_if_failed(self) -> None:
        if self.exit_code:
            exit_now(self.exit_code)


class Signals:
    """Signal handlers whose callbacks run on the reactor thread, and the handlers they replaced."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._previous: dict[int, Any] = {}

    def install(self, handlers: Mapping[int, Callable[[], object] | signal.Handlers]) -> None:
        """Callables run on the reactor thread; ``signal.SIG_IGN``/``SIG_DFL`` are set as they are."""
        for signum, handler in handlers.items():
            action: Any = handler
            if callable(handler):
                action = lambda *_, run=handler: self.reactor.callFromThread(run)  # noqa: E731
            self._previous[signum] = signal.signal(signum, action)

    def stop_reactor(self) -> None:
        log.info("received signal, shutting down")
        if self.reactor.running:
            self.reactor.stop()

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def lock_root(root: str, lock_file: str, holder_kind: str) -> int:
    """Take the single-user lock of ``root`` (blocking I/O); the fd holds it.

    :raises BootError: naming the root and the pid that holds it.
    """
    path = os.path.join(root, lock_file)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BootError(
            f"root {root} is in use by another {holder_kind} (pid {holder}); "
            f"only one {holder_kind} may use a root at a time"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def exit_now(code: int) -> None:
    """Leave with ``code`` after the reactor stopped (twistd itself would exit 0)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def maybe_deferred(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(fn, *args)


def _unknown_required(config: Config, ordered: list[Registration]) -> set[str]:
    """Required names that match no enabled plugin: boot must fail naming them."""
    matched = {config.section_key(reg) for reg in ordered}
    return {name for name in config.required_plugins if name not in matched}
