# -*- test-case-name: tests.test_plugin_tree -*-
"""Where registrations come from: built-ins, ``plugin_dir``, entry points.

Importing a plugin module is what registers it.  This runs in
``makeService``, before the reactor, so plugin modules must not touch the
reactor, sockets or threads at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points

from cdtwist.plugin import PluginError

ENTRY_POINT_GROUP = "cdtwist.plugins"

#: Built-in plugin modules, in registration order (which breaks graph ties,
#: as containerd's init order does).
BUILTIN_MODULES = (
    # storage first, as containerd registers them
    "cdtwist.content.plugin",
    "cdtwist.snapshots.plugin",
    "cdtwist.metadata.plugin",
    "cdtwist.diff.walking",
    "cdtwist.events.exchange",
    "cdtwist.gc.scheduler",
    # then service + gRPC pairs, in containerd's (alphabetical) order
    "cdtwist.introspection.service",
    "cdtwist.containers.service",
    "cdtwist.content.service",
    "cdtwist.diff.service",
    "cdtwist.events.service",
    "cdtwist.health.service",
    "cdtwist.images.service",
    "cdtwist.leases.service",
    "cdtwist.namespaces.service",
    "cdtwist.snapshots.service",
    # the v2 runtime and the task monitor, which the tasks service requires
    "cdtwist.runtime.manager",
    "cdtwist.monitor.cgroups",
    # tasks-service + tasks gRPC (alphabetically before version)
    "cdtwist.tasks.service",
    "cdtwist.version.service",
)


def load_builtin() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


def load_plugin_dir(path: str) -> list[str]:
    """Import every ``*.py`` in ``path``; a missing dir is not an error (containerd)."""
    if not path or not os.path.isdir(path):
        return []
    loaded = []
    for entry in sorted(os.listdir(path)):
        if not entry.endswith(".py") or entry.startswith("_"):
            continue
        module_name = f"cdtwist_plugin_dir.{entry[:-3]}"
        if module_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(path, entry))
        if spec is None or spec.loader is None:
            raise PluginError(f"cannot load plugin file {os.path.join(path, entry)}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise PluginError(f"loading plugin file {os.path.join(path, entry)}: {e}") from e
        loaded.append(module_name)
    return loaded


def load_entry_points() -> list[str]:
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise PluginError(f"loading plugin entry point {ep.name} ({ep.value}): {e}") from e
        loaded.append(ep.name)
    return loaded
