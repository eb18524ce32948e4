# -*- test-case-name: tests.test_proxy -*-
"""``cdtwist serve-plugin``: one built-in store served for another daemon's ``[proxy_plugins]``.

``overlayfs`` or ``native`` serves ``containerd.services.snapshots.v1.Snapshots``
over that engine; ``content`` serves ``containerd.services.content.v1.Content``
over a local blob store.  No namespaces: the calling daemon keeps those
in its own metadata, as containerd expects of an external plugin.  The
root holds the engine's files (as the built-in plugin's dir would) and a
lock, so two servers never share a root.

It is a twistd application (``twistd -n cdtwist-serve-plugin ...``, which
``cdtwist serve-plugin`` runs) built like the daemon: a service tree whose
children start in order (the store, then grpcio in its own thread pool),
stop in reverse on SIGTERM/SIGINT, and log in containerd's format.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import sdnotify
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from cdtwist import SERVER_VERSION
from cdtwist.config import GRPCConfig
from cdtwist.daemon import Signals, exit_now, lock_root
from cdtwist.grpc.server import GRPCServerService
from cdtwist.log import get_logger, make_observer, parse_level
from cdtwist.plugin.service import OrderedMultiService

if TYPE_CHECKING:
    from twisted.application.service import IServiceCollection

log = get_logger(__name__)

KINDS = ("overlayfs", "native", "content")
LOCK_FILE = "cdtwist-serve-plugin.lock"
IO_POOL_SIZE = 8


class ServeOptions(usage.Options):
    synopsis = "overlayfs|native|content --root DIR --address SOCKET [options]"
    longdesc = (
        "Serve one of cdtwist's snapshotters (overlayfs, native) or its content store on a socket, "
        "without namespaces, for a daemon's [proxy_plugins] (cdtwist or containerd)."
    )
    optParameters = [
        ["root", None, None, "directory holding the snapshots or blobs (required)"],
        ["address", "a", None, "UNIX socket to serve on: a path or unix: endpoint string (required)"],
        ["tcp-address", None, None, "also serve on this address: host:port or a Twisted endpoint string"],
        ["tls-cert", None, None, "TLS certificate for --tcp-address"],
        ["tls-key", None, None, "TLS key for --tcp-address"],
        ["tls-ca", None, None, "CA bundle: require client certificates it signed on --tcp-address"],
        ["uid", None, 0, "owner of the socket", int],
        ["gid", None, 0, "group of the socket", int],
        ["log-level", "l", "info", "log level: trace, debug, info, warn, error"],
        ["log-format", None, "text", "log format: text or json"],
    ]
    optFlags = [
        ["upperdir-label", None, "overlayfs: report each snapshot's upper dir in its labels"],
    ]

    def opt_version(self) -> None:
        print(f"cdtwist {SERVER_VERSION}")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802 - Twisted's name
        # Twisted stops reading options at the first argument; the kind is
        # written first (`serve-plugin overlayfs --root ...`), so move it last.
        args = list(sys.argv[1:] if options is None else options)
        if args and args[0] in KINDS:
            args.append(args.pop(0))
        super().parseOptions(args)

    def parseArgs(self, kind: str) -> None:  # noqa: N802 - Twisted's name
        if kind not in KINDS:
            raise usage.UsageError(f"cannot serve {kind!r}: choose one of {', '.join(KINDS)}")
        self["kind"] = kind

    def postOptions(self) -> None:  # noqa: N802
        for name in ("root", "address"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        self["root"] = os.path.abspath(self["root"])
        try:
            parse_level(self["log-level"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"unknown log format {self['log-format']!r}")
        if self["upperdir-label"] and self["kind"] != "overlayfs":
            raise usage.UsageError("--upperdir-label applies to overlayfs only")


def open_store(kind: str, root: str, upperdir_label: bool = False) -> Any:
    """The engine behind the API (blocking: disk and sqlite)."""
    if kind == "overlayfs":
        from cdtwist.snapshots.overlay import OverlaySnapshotter, supported

        supported(root)
        # As the built-in plugin: removal is finished by Cleanup, which the
        # calling daemon's garbage collector sends.
        return OverlaySnapshotter(root, async_remove=True, upperdir_label=upperdir_label)
    if kind == "native":
        from cdtwist.snapshots.native import NativeSnapshotter

        return NativeSnapshotter(root)
    from cdtwist.content.local import LocalStore

    return LocalStore(root)


def servicer_for(kind: str, store: Any) -> Any:
    if kind == "content":
        from cdtwist.content.plain import PlainContentServicer

        return PlainContentServicer(store)
    from cdtwist.snapshots.plain import PlainSnapshotsServicer

    return PlainSnapshotsServicer(store)


class StoreService(Service):
    """Opens the store under the locked root; closes it after the API has stopped."""

    name = "store"

    def __init__(self, kind: str, root: str, upperdir_label: bool, reactor: Any, io_pool: ThreadPool) -> None:
        self.kind = kind
        self.root = root
        self.upperdir_label = upperdir_label
        self.reactor = reactor
        self.io_pool = io_pool
        self.store: Any = None
        self._lock_fd: int | None = None

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return deferToThreadPool(self.reactor, self.io_pool, self._open)

    def _open(self) -> None:
        os.makedirs(self.root, 0o700, exist_ok=True)
        self._lock_fd = lock_root(self.root, LOCK_FILE, "serve-plugin")
        try:
            self.store = open_store(self.kind, self.root, self.upperdir_label)
        except BaseException:
            self._unlock()
            raise

    def servicers(self) -> list[Any]:
        return [servicer_for(self.kind, self.store)] if self.store is not None else []

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return deferToThreadPool(self.reactor, self.io_pool, self._close)

    def _close(self) -> None:
        store, self.store = self.store, None
        close = getattr(store, "close", None)
        if callable(close):
            close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class PluginServer(OrderedMultiService):
    """The root service: the store, then the gRPC API over it."""

    def __init__(self, options: ServeOptions, *, reactor: Any = None, log_observer: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.kind: str = options["kind"]
        self.log_observer = log_observer
        self.exit_code = 0
        self.serving: Deferred[None] = Deferred()
        self.io_pool = ThreadPool(minthreads=0, maxthreads=IO_POOL_SIZE, name="cdtwist-serve-io")
        self.store = StoreService(self.kind, options["root"], bool(options["upperdir-label"]), reactor, self.io_pool)
        self.store.setServiceParent(self)
        grpc_config = GRPCConfig(
            address=options["address"],
            tcp_address=options["tcp-address"] or "",
            tcp_tls_cert=options["tls-cert"] or "",
            tcp_tls_key=options["tls-key"] or "",
            tcp_tls_ca=options["tls-ca"] or "",
            uid=options["uid"],
            gid=options["gid"],
        )
        self.grpc = GRPCServerService(
            grpc_config,
            self.store.servicers,
            reactor=reactor,
            io_pool=self.io_pool,
            workers=32,
            bridge_socket=os.path.join(options["root"], "grpc-tcp.sock"),
        )
        self.grpc.setServiceParent(self)
        self.signals = Signals(reactor)

    def setServiceParent(self, parent: IServiceCollection) -> None:  # noqa: N802
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if self.log_observer is not None and callable(set_component):
            from twisted.logger import ILogObserver

            set_component(ILogObserver, self.log_observer)

    def startService(self) -> None:  # type: ignore[override] # noqa: N802
        Service.startService(self)
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit_if_failed)
        self.reactor.callWhenRunning(lambda: ensureDeferred(self._boot()))

    async def _boot(self) -> None:
        started = time.monotonic()
        log.info("starting cdtwist serve-plugin", version=SERVER_VERSION, kind=self.kind, root=self.store.root)
        self.io_pool.start()
        self.signals.install({signal.SIGTERM: self.signals.stop_reactor, signal.SIGINT: self.signals.stop_reactor})
        try:
            await self._start_all()
        except Exception as e:
            log.fatal("failed to serve: {error}", error=str(e) or type(e).__name__)
            self.exit_code = 1
            await self._stop_all()
            if self.reactor.running:
                self.reactor.stop()
            return
        log.info(f"serve-plugin {self.kind} serving in {time.monotonic() - started:f}s", address=self.grpc.address)
        sdnotify.SystemdNotifier().notify("READY=1")  # Type=notify units start their clients after this
        self.serving.callback(None)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        await self._stop_all()
        self.signals.restore()
        if self.io_pool.started:
            self.io_pool.stop()
        log.info("serve-plugin stopped")

    def _exit_if_failed(self) -> None:
        if self.exit_code:
            exit_now(self.exit_code)


def makeService(options: ServeOptions) -> PluginServer:  # noqa: N802 - twistd's name
    observer = make_observer(sys.__stderr__, options["log-format"], options["log-level"])
    return PluginServer(options, log_observer=observer)


#: what twistd's ServiceMaker looks up in this module
Options = ServeOptions
