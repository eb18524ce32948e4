"""twistd dropin: ``twistd -n cdtwist -c config.toml``.

Kept tiny on purpose: twistd imports every dropin to list subcommands, so
this names the tap module and nothing more.
"""

from twisted.application.service import ServiceMaker

cdtwist = ServiceMaker(
    "cdtwist",
    "cdtwist.tap",
    "A containerd 1.6 compatible container daemon",
    "cdtwist",
)
