# -*- test-case-name: tests.test_plugin_tree -*-
"""What a plugin's init sees: its dirs, its config and the plugins before it.

Shaped like containerd's ``plugin.InitContext`` so ports of its plugins
read naturally: ``ic.get(type)`` returns the first initialised instance of
a type, ``ic.get_by_type(type)`` all of them keyed by id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdtwist.errors import NotFound
from cdtwist.plugin import Registration, SkipPlugin

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore
    from twisted.python.threadpool import ThreadPool


@dataclass
class Platform:
    os: str = "linux"
    architecture: str = ""
    variant: str = ""


@dataclass
class Meta:
    """What introspection reports beside a plugin's registration."""

    platforms: list[Platform] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)


@dataclass
class Plugin:
    """One registration's outcome: an instance, or why there is none."""

    registration: Registration
    meta: Meta
    config: Any = None
    instance: Any = None
    error: BaseException | None = None

    @property
    def skipped(self) -> bool:
        return isinstance(self.error, SkipPlugin)

    def error_message(self) -> str:
        """containerd's text: a skip reads ``"<reason>: skip plugin"``."""
        if self.error is None:
            return ""
        if isinstance(self.error, SkipPlugin):
            reason = str(self.error)
            return f"{reason}: skip plugin" if reason else "skip plugin"
        return str(self.error) or type(self.error).__name__


class PluginSet:
    """Initialised plugins in init order, unique by type and id.

    Read from gRPC pool threads (introspection) while the reactor adds to
    it at boot; appends to a list and dict are atomic under the GIL, and
    readers take a snapshot with :meth:`all`.
    """

    def __init__(self) -> None:
        self._ordered: list[Plugin] = []
        self._by_type: dict[str, dict[str, Plugin]] = {}

    def add(self, plugin: Plugin) -> None:
        reg = plugin.registration
        by_id = self._by_type.setdefault(reg.type, {})
        if reg.id in by_id:
            from cdtwist.errors import AlreadyExists

            raise AlreadyExists(f"plugin {reg.uri} already initialized")
        by_id[reg.id] = plugin
        self._ordered.append(plugin)

    def all(self) -> list[Plugin]:
        return list(self._ordered)

    def get(self, type_: str) -> Any:
        """The first successfully initialised instance of ``type_``."""
        for plugin in self._by_type.get(type_, {}).values():
            if plugin.error is None:
                return plugin.instance
        raise NotFound(f"no plugins registered for {type_}")

    def get_by_type(self, type_: str) -> dict[str, Any]:
        return {
            pid: p.instance for pid, p in self._by_type.get(type_, {}).items() if p.error is None
        }

    def get_by_id(self, type_: str, id_: str) -> Any:
        plugin = self._by_type.get(type_, {}).get(id_)
        if plugin is None:
            raise NotFound(f"plugin {type_}.{id_}")
        if plugin.error is not None:
            raise plugin.error
        return plugin.instance

    def lookup(self, type_: str, id_: str) -> Plugin | None:
        return self._by_type.get(type_, {}).get(id_)


@dataclass
class InitContext:
    """Handed to ``Registration.init``; everything a plugin may use at init."""

    registration: Registration
    root: str
    state: str
    config: Any
    meta: Meta
    plugins: PluginSet
    reactor: IReactorCore
    #: thread pool for disk and database work (never the reactor thread).
    io_pool: ThreadPool
    #: the daemon-wide settings (cdtwist.config.Config).
    daemon_config: Any
    address: str = ""
    ttrpc_address: str = ""
    #: the daemon's source revision, as the Version service reports it.
    revision: str = ""

    def get(self, type_: str) -> Any:
        return self.plugins.get(type_)

    def get_by_type(self, type_: str) -> dict[str, Any]:
        return self.plugins.get_by_type(type_)

    def get_by_id(self, type_: str, id_: str) -> Any:
        return self.plugins.get_by_id(type_, id_)

    def timeout(self, key: str, default: float) -> float:
        """A ``[timeouts]`` entry in seconds (containerd's ``timeout.Get``)."""
        from cdtwist.config import parse_duration

        raw = (getattr(self.daemon_config, "timeouts", None) or {}).get(key)
        return parse_duration(raw) if raw else default


def plugin_dirs(root: str, state: str, reg: Registration) -> tuple[str, str]:
    """``<root>/<type>.<id>`` and ``<state>/<type>.<id>`` as containerd lays them out."""
    return os.path.join(root, reg.uri), os.path.join(state, reg.uri)
