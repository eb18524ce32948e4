# -*- test-case-name: tests.test_plugin_tree -*-
"""Plugins as Twisted services, started one by one in graph order.

Twisted's ``MultiService`` starts children without waiting for their
Deferreds and stops them concurrently; a plugin must not start before what
it requires is ready, nor stop while something that depends on it still
runs.  :class:`OrderedMultiService` is a ``MultiService`` that awaits each
child's start in order and stops them one at a time in reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed

from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger
from cdtwist.plugin import Registration, SkipPlugin
from cdtwist.plugin.context import InitContext, Meta, Plugin, PluginSet, plugin_dirs

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore
    from twisted.python.threadpool import ThreadPool

log = get_logger(__name__)


class RequiredPluginError(Exception):
    """A plugin listed in ``required_plugins`` is missing or failed."""

    #: an operator's mistake, not a bug: boot fails with the message alone.
    expected = True


class OrderedMultiService(MultiService):
    """A MultiService whose children start in order, each awaited, and stop in reverse.

    A child whose start fails is not stopped; the failure is the caller's
    to judge (:meth:`startChild` may swallow it, as plugins do).
    """

    def __init__(self) -> None:
        super().__init__()
        self._started: list[IService] = []

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        Service.startService(self)
        return ensureDeferred(self._start_all())

    async def _start_all(self) -> None:
        for child in list(self):
            await self.startChild(child)

    async def startChild(self, child: IService) -> None:  # noqa: N802
        await maybeDeferred(child.startService)
        self._started.append(child)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        return ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        while self._started:
            child = self._started.pop()
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name}", name=getattr(child, "name", repr(child)))

    def addService(self, service: IService) -> None:  # noqa: N802
        # Unlike MultiService, never start a child behind the ordered walk.
        if service.name is not None:
            if service.name in self.namedServices:
                raise RuntimeError(f"cannot have two services named {service.name!r}")
            self.namedServices[service.name] = service
        self.services.append(service)


class PluginService(Service):
    """One registration: init (maybe async), then the instance's ``start``/``stop``."""

    def __init__(self, registration: Registration, tree: PluginTree) -> None:
        self.registration = registration
        self.tree = tree
        self.setName(registration.uri)
        self.plugin: Plugin | None = None

    def startService(self) -> Deferred[None]:  # noqa: N802
        Service.startService(self)
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        reg = self.registration
        tree = self.tree
        meta = Meta(capabilities=list(reg.capabilities))
        plugin = Plugin(registration=reg, meta=meta)
        self.plugin = plugin
        plog = get_logger(__name__, type=reg.type)
        plog.info('loading plugin "{uri}"...', uri=reg.uri)
        try:
            plugin.config = tree.decode_config(reg)
            root, state = plugin_dirs(tree.root, tree.state, reg)
            ic = InitContext(
                registration=reg,
                root=root,
                state=state,
                config=plugin.config,
                meta=meta,
                plugins=tree.plugins,
                reactor=tree.reactor,
                io_pool=tree.io_pool,
                daemon_config=tree.daemon_config,
                address=tree.address,
                ttrpc_address=tree.ttrpc_address,
                revision=tree.revision,
            )
            instance = await maybeDeferred(reg.init, ic)
            start = getattr(instance, "start", None)
            if callable(start):
                await maybeDeferred(start)
            plugin.instance = instance
        except SkipPlugin as e:
            plugin.error = e
            plog.info('skip loading plugin "{uri}"...', uri=reg.uri, error=plugin.error_message())
        except CdtwistError as e:
            # An expected refusal (not configured, unsupported): one line, as containerd logs it.
            plugin.error = e
            plog.warn("failed to load plugin {uri}", uri=reg.uri, error=plugin.error_message())
        except Exception as e:
            plugin.error = e
            plog.failure('failed to load plugin "{uri}"', uri=reg.uri)
        tree.plugins.add(plugin)
        if plugin.error is not None and reg.uri in tree.required:
            raise RequiredPluginError(f"load required plugin {reg.uri}: {plugin.error_message()}")

    def stopService(self) -> Deferred[None]:  # noqa: N802
        Service.stopService(self)
        instance = self.plugin.instance if self.plugin else None
        for name in ("stop", "close"):
            method: Callable[[], Any] | None = getattr(instance, name, None)
            if callable(method):
                return maybeDeferred(method)
        return succeed(None)


class PluginTree(OrderedMultiService):
    """Every enabled plugin as a child service, in dependency order."""

    def __init__(
        self,
        ordered: list[Registration],
        *,
        root: str,
        state: str,
        daemon_config: Any,
        decode_config: Callable[[Registration], Any],
        required: set[str],
        reactor: IReactorCore,
        io_pool: ThreadPool,
        address: str = "",
        ttrpc_address: str = "",
    ) -> None:
        super().__init__()
        self.setName("plugins")
        self.root = root
        self.state = state
        self.daemon_config = daemon_config
        self.decode_config = decode_config
        self.required = required
        self.reactor = reactor
        self.io_pool = io_pool
        self.address = address
        self.ttrpc_address = ttrpc_address
        self.revision = ""
        self.plugins = PluginSet()
        for reg in ordered:
            PluginService(reg, self).setServiceParent(self)

    async def _start_all(self) -> None:
        missing = sorted(self.required - {s.name for s in self})
        if missing:
            raise RequiredPluginError("required plugin(s) not registered or disabled: " + ", ".join(missing))
        await super()._start_all()

    def instances(self) -> list[Any]:
        return [p.instance for p in self.plugins.all() if p.error is None]
