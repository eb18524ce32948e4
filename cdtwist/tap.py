# -*- test-case-name: tests.test_tap -*-
"""``twistd cdtwist``: options and ``makeService``.

``makeService`` runs before twistd daemonizes and before the reactor runs:
it reads and validates the config, loads plugin registrations, orders them
and builds the service tree.  No sockets, threads or grpc objects here.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from cdtwist import SERVER_VERSION
from cdtwist.config import Config, ConfigError, Overrides, load
from cdtwist.daemon import Daemon
from cdtwist.errors import CdtwistError
from cdtwist.log import make_observer, parse_level
from cdtwist.plugin import PluginError, Registration, registry
from cdtwist.plugin.graph import graph
from cdtwist.plugin.loader import load_builtin, load_entry_points, load_plugin_dir


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run cdtwist, a containerd 1.6 compatible container daemon."
    optParameters = [
        ["config", "c", None, "path to the configuration file (default: built-in defaults)"],
        ["log-level", "l", None, "log level: trace, debug, info, warn, error, fatal, panic"],
        ["address", "a", None, "address for the gRPC API socket"],
        ["root", None, None, "cdtwist root directory"],
        ["state", None, None, "cdtwist state directory"],
        ["log-format", None, None, "log format: text or json"],
    ]

    def opt_version(self) -> None:
        print(f"cdtwist {SERVER_VERSION}")
        sys.exit(0)

    def overrides(self) -> Overrides:
        return Overrides(
            address=self["address"], root=self["root"], state=self["state"], log_level=self["log-level"]
        )

    def postOptions(self) -> None:  # noqa: N802
        if self["log-level"]:
            try:
                parse_level(self["log-level"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def load_registrations(config: Config) -> list[Registration]:
    """Import every plugin source, add the config's proxy plugins, order what the config enables."""
    from cdtwist.proxy.plugins import registrations as proxy_registrations

    load_builtin()
    load_plugin_dir(config.plugin_dir)
    load_entry_points()
    proxies = proxy_registrations(config.proxy_plugins, config.warnings)
    taken = {reg.uri for reg in registry}
    for reg in proxies:
        if reg.uri in taken:
            raise PluginError(f"proxy_plugins.{reg.id}: plugin {reg.uri} already registered")
    return graph([*registry, *proxies], disabled=config.is_disabled)


def load_config(options: Options) -> Config:
    return load(options["config"], options.overrides())


def makeService(options: Options) -> Daemon:  # noqa: N802 - twistd's name
    try:
        config = load_config(options)
        ordered = load_registrations(config)
        config.warnings.extend(config.plugin_section_warnings(registry))
        # Decode every plugin's section now so a bad value stops boot here,
        # with the file and key named, before anything starts.
        for reg in ordered:
            config.plugin_config(reg)
    except (ConfigError, PluginError) as e:
        print(f"cdtwist: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    level = config.debug.level or "info"
    log_format = options["log-format"] or config.debug.format or "text"
    # containerd logs to stderr; capture it before twistd redirects stdio into the log.
    log_observer = make_observer(sys.__stderr__, log_format, level)

    def reload_config() -> Config:
        return load_config(options)

    try:
        return Daemon(
            config,
            ordered,
            decode_config=config.plugin_config,
            log_observer=log_observer,
            reload_config=reload_config,
        )
    except CdtwistError as e:
        print(f"cdtwist: {e}", file=sys.stderr)
        raise SystemExit(1) from None


