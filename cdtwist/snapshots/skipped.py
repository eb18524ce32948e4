# -*- test-case-name: tests.test_snapshots_plugins -*-
"""The snapshotters containerd 1.6 also registers and cdtwist does not implement.

``btrfs``, ``zfs``, ``devmapper`` and ``aufs`` register with containerd's
ids, configs, platforms and exports, and fail their init exactly where and
how containerd's do on a machine without them, so ``ctr plugins ls`` reads
the same: btrfs and zfs *skip* unless their root is on such a filesystem,
aufs *skips* unless the module loads, and devmapper is an *error* until a
``pool_name`` is configured (containerd 1.6 does not skip it).  Where
containerd would go on to work, cdtwist says it has no such engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from twisted.internet.threads import deferToThreadPool

from cdtwist.errors import CdtwistError
from cdtwist.mount import lookup
from cdtwist.plugin import SNAPSHOTTER, Registration, SkipPlugin
from cdtwist.snapshots import default_platform, go_quote

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cdtwist.plugin.context import InitContext


def _in_pool(ic: InitContext, fn: object, *args: object) -> Deferred[NoReturn]:
    return deferToThreadPool(ic.reactor, ic.io_pool, fn, *args)  # type: ignore[arg-type]


def _not_implemented(name: str) -> NoReturn:
    raise SkipPlugin(f"the {name} snapshotter is not implemented by cdtwist")


# -- btrfs ----------------------------------------------------------------------


@dataclass
class BtrfsConfig:
    root_path: str = ""


def btrfs_check(root: str) -> NoReturn:
    """The start of btrfs.NewSnapshotter: root made 0700, then it must be on btrfs."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        os.mkdir(root, 0o700)
    else:
        if st.st_mode & 0o777 != 0o700:
            os.chmod(root, 0o700)
    mnt = lookup(root)
    if mnt.fstype != "btrfs":
        raise SkipPlugin(f"path {root} ({mnt.fstype}) must be a btrfs filesystem to be used with the btrfs snapshotter")
    _not_implemented("btrfs")


def _init_btrfs(ic: InitContext) -> Deferred[NoReturn]:
    ic.meta.platforms[:] = [default_platform()]
    config: BtrfsConfig = ic.config
    root = config.root_path or ic.root
    ic.meta.exports.clear()
    ic.meta.exports["root"] = root
    return _in_pool(ic, btrfs_check, root)


# -- zfs ------------------------------------------------------------------------


@dataclass
class ZfsConfig:
    root_path: str = ""


def zfs_check(root: str) -> NoReturn:
    """The start of zfs.NewSnapshotter (the root is not created)."""
    mnt = lookup(root)
    if mnt.fstype != "zfs":
        raise SkipPlugin(f"path {root} must be a zfs filesystem to be used with the zfs snapshotter")
    _not_implemented("zfs")


def _init_zfs(ic: InitContext) -> Deferred[NoReturn]:
    ic.meta.platforms.append(default_platform())
    config: ZfsConfig = ic.config
    root = config.root_path or ic.root
    ic.meta.exports["root"] = root
    return _in_pool(ic, zfs_check, root)


# -- devmapper ------------------------------------------------------------------


@dataclass
class DevmapperConfig:
    """containerd's ``devmapper.Config`` keys."""

    root_path: str = ""
    pool_name: str = ""
    base_image_size: str = ""
    async_remove: bool = False
    discard_blocks: bool = False
    fs_type: str = ""
    fs_options: str = ""


def _init_devmapper(ic: InitContext) -> NoReturn:
    ic.meta.platforms.append(default_platform())
    config: DevmapperConfig = ic.config
    if config.pool_name == "":
        # A plain error, not a skip, in containerd 1.6 ("error" in ctr plugins ls).
        raise CdtwistError("devmapper not configured")
    raise CdtwistError("the devmapper snapshotter is not implemented by cdtwist")


# -- aufs -----------------------------------------------------------------------


@dataclass
class AufsConfig:
    root_path: str = ""


def aufs_check(root: str) -> NoReturn:
    """containerd/aufs's check: ``modprobe aufs``, then aufs listed in /proc/filesystems."""
    modprobe = shutil.which("modprobe")
    if modprobe is None:
        raise SkipPlugin(
            'aufs is not supported (modprobe aufs failed: exec: "modprobe": executable file not found in $PATH "")'
        )
    proc = subprocess.run([modprobe, "aufs"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        status = f"exit status {proc.returncode}" if proc.returncode > 0 else f"signal: {-proc.returncode}"
        out = go_quote(proc.stdout.decode("utf-8", "surrogateescape"))
        raise SkipPlugin(f"aufs is not supported (modprobe aufs failed: {status} {out})")
    with open("/proc/filesystems") as f:
        if not any("aufs" in line for line in f):
            raise SkipPlugin("aufs is not supported")
    _not_implemented("aufs")


def _init_aufs(ic: InitContext) -> Deferred[NoReturn]:
    ic.meta.platforms.append(default_platform())
    config: AufsConfig = ic.config
    root = config.root_path or ic.root
    ic.meta.exports["root"] = root
    return _in_pool(ic, aufs_check, root)


# Registered, in containerd's order, by :mod:`cdtwist.snapshots.plugin`.
aufs = Registration(type=SNAPSHOTTER, id="aufs", config=AufsConfig, init=_init_aufs)
btrfs = Registration(type=SNAPSHOTTER, id="btrfs", config=BtrfsConfig, init=_init_btrfs)
devmapper = Registration(type=SNAPSHOTTER, id="devmapper", config=DevmapperConfig, init=_init_devmapper)
zfs = Registration(type=SNAPSHOTTER, id="zfs", config=ZfsConfig, init=_init_zfs)
