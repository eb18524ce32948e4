"""twistd dropins: ``twistd -n cdtwist -c config.toml`` and ``twistd -n cdtwist-serve-plugin ...``.

Kept tiny on purpose: twistd imports every dropin to list subcommands, so
this names the tap modules and nothing more.
"""

from twisted.application.service import ServiceMaker

cdtwist = ServiceMaker(
    "cdtwist",
    "cdtwist.tap",
    "A containerd 1.6 compatible container daemon",
    "cdtwist",
)

cdtwist_serve_plugin = ServiceMaker(
    "cdtwist-serve-plugin",
    "cdtwist.proxy.serve",
    "Serve a cdtwist snapshotter or content store for another daemon's [proxy_plugins]",
    "cdtwist-serve-plugin",
)
