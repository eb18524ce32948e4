# -*- test-case-name: tests.test_snapshots_plugins -*-
"""Registers the snapshotter plugins: the module the plugin loader lists.

Each engine module holds its own :class:`~cdtwist.plugin.Registration`;
registering them here, and only here, keeps containerd 1.6's order (the
order ``ctr plugins ls`` shows) whatever imports the engine modules first.
"""

from __future__ import annotations

from cdtwist.plugin import register
from cdtwist.snapshots import native, overlay, skipped

REGISTRATIONS = (
    skipped.aufs,
    skipped.btrfs,
    skipped.devmapper,
    native.registration,
    overlay.registration,
    skipped.zfs,
)

for _registration in REGISTRATIONS:
    register(_registration)
