"""Plugin registrations: what a plugin is, what it needs, how it starts.

Every plugin module declares a :class:`Registration` next to its code and
hands it to :func:`register`.  Types and ids keep containerd's names so that
``ctr plugins ls`` and ``config.toml`` sections read the same as on
containerd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# containerd's plugin types, verbatim.
CONTENT = "io.containerd.content.v1"
SNAPSHOTTER = "io.containerd.snapshotter.v1"
METADATA = "io.containerd.metadata.v1"
DIFFER = "io.containerd.differ.v1"
EVENT = "io.containerd.event.v1"
GC = "io.containerd.gc.v1"
SERVICE = "io.containerd.service.v1"
GRPC = "io.containerd.grpc.v1"
TTRPC = "io.containerd.ttrpc.v1"
RUNTIME_V2 = "io.containerd.runtime.v2"
MONITOR = "io.containerd.monitor.v1"
INTERNAL = "io.containerd.internal.v1"
LEASE = "io.containerd.lease.v1"
STREAM_PROCESSOR = "io.containerd.streamprocessor.v1"
TRACING_PROCESSOR = "io.containerd.tracing.processor.v1"

ALL = "*"


class SkipPlugin(Exception):
    """Raised by an init that does not apply on this machine or config.

    Mirrors containerd's ``ErrSkipPlugin``: the plugin is recorded as
    skipped with the message as its reason, never as a failure.
    """


class PluginError(Exception):
    """A registration or graph that cannot be used."""


@dataclass
class Registration:
    """What containerd calls a plugin registration.

    ``init`` receives an :class:`~cdtwist.plugin.context.InitContext` and
    returns the plugin instance, or a Deferred firing with it.  An instance
    may expose ``start()``/``stop()`` (either may return a Deferred); the
    plugin service calls them as it is started and stopped.
    """

    type: str
    id: str
    init: Callable[[Any], Any]
    requires: tuple[str, ...] = ()
    #: a dataclass type; its defaults are the plugin's default config.
    config: type | None = None
    #: containerd's capability strings shown by introspection.
    capabilities: tuple[str, ...] = ()
    #: True when the instance can take a new config on SIGHUP (``reload(config)``).
    reloadable: bool = False
    #: set by the v1 config migration; never set by hand.
    disable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.type:
            raise PluginError("plugin: no type")
        if not self.id:
            raise PluginError(f"plugin {self.type}: no id")
        if ALL in self.requires and len(self.requires) > 1:
            raise PluginError(f"plugin {self.uri}: '*' cannot be combined with other requirements")

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


class Registry:
    """An ordered set of registrations, unique by URI."""

    def __init__(self) -> None:
        self._regs: dict[str, Registration] = {}

    def register(self, reg: Registration) -> Registration:
        if reg.uri in self._regs:
            raise PluginError(f"plugin {reg.uri}: already registered")
        self._regs[reg.uri] = reg
        return reg

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._regs.values()))

    def __len__(self) -> int:
        return len(self._regs)

    def get(self, uri: str) -> Registration | None:
        return self._regs.get(uri)


#: the process-wide registry that plugin modules add themselves to on import.
registry = Registry()


def register(reg: Registration) -> Registration:
    return registry.register(reg)
