# -*- test-case-name: tests.test_proxy -*-
"""``[proxy_plugins.<name>]``: registrations made from the config, not from code.

As containerd: ``type = "snapshot"`` (or the full plugin type) registers
``io.containerd.snapshotter.v1.<name>``, ``type = "content"`` registers
``io.containerd.content.v1.<name>``; any other type is warned about and
skipped.  The plugin exports its ``address``; the metadata plugin wraps it
like a built-in one (namespaces, labels, leases, GC).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from cdtwist.errors import InvalidArgument
from cdtwist.plugin import CONTENT, SNAPSHOTTER, Registration

if TYPE_CHECKING:
    from cdtwist.config import ProxyPlugin
    from cdtwist.plugin.context import InitContext
    from cdtwist.proxy.channel import ProxyChannel

_TYPES = {"snapshot": SNAPSHOTTER, SNAPSHOTTER: SNAPSHOTTER, "content": CONTENT, CONTENT: CONTENT}


def _snapshotter(name: str, channel: ProxyChannel) -> Any:
    from cdtwist.proxy.snapshotter import ProxySnapshotter

    return ProxySnapshotter(name, channel)


def _content(name: str, channel: ProxyChannel) -> Any:
    from cdtwist.proxy.content import ProxyContentStore

    return ProxyContentStore(name, channel)


_FACTORIES: dict[str, Callable[[str, ProxyChannel], Any]] = {SNAPSHOTTER: _snapshotter, CONTENT: _content}


async def _init(name: str, address: str, plugin_type: str, ic: InitContext) -> Any:
    from cdtwist.proxy.channel import ProxyChannel

    ic.meta.exports["address"] = address
    if not address:
        raise InvalidArgument(f"proxy plugin {name}: address is empty")
    channel = ProxyChannel(name, address, reactor=ic.reactor, io_pool=ic.io_pool, bridge_dir=ic.state)
    await channel.start()
    return _FACTORIES[plugin_type](name, channel)


def registrations(proxy_plugins: Mapping[str, ProxyPlugin], warnings: list[str]) -> list[Registration]:
    """One registration per usable ``[proxy_plugins]`` entry; unknown types add to ``warnings``."""
    out = []
    for name, pp in proxy_plugins.items():
        plugin_type = _TYPES.get(pp.type)
        if plugin_type is None:
            warnings.append(f'proxy_plugins.{name}: unknown proxy plugin type "{pp.type}", skipped')
            continue
        init = partial(_init, name, pp.address, plugin_type)
        out.append(
            Registration(
                type=plugin_type,
                id=name,
                init=lambda ic, init=init: Deferred.fromCoroutine(init(ic)),
                extra={"proxy": True},
            )
        )
    return out
