# -*- test-case-name: tests.test_snapshots_native -*-
"""``io.containerd.snapshotter.v1.native``: every snapshot a full copy, bind mounted.

Works on any filesystem.  ``snapshots/<id>`` is the snapshot's whole tree:
an active snapshot starts as a copy of its parent (owners, modes, times,
xattrs, hard links, symlinks, devices kept), a view of a committed snapshot
binds the parent's directory read-only.  Removal renames the directory to
``rm-<id>`` inside the transaction and deletes it after the commit, so a
failed commit can put it back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.threads import deferToThreadPool

from cdtwist.log import get_logger
from cdtwist.mount import Mount
from cdtwist.plugin import SNAPSHOTTER, Registration
from cdtwist.snapshots import Info, Kind, WalkFunc, default_platform, wrap_error
from cdtwist.snapshots import fs as sfs
from cdtwist.snapshots.storage import Snapshot
from cdtwist.snapshots.stored import StoredSnapshotter, open_root

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

MOUNT_TYPE = "bind"
DEFAULT_MOUNT_OPTIONS = ("rbind",)


class NativeSnapshotter(StoredSnapshotter):
    """containerd's native snapshotter (``snapshots/native``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._ms = open_root(root)

    def snapshot_dir(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid)

    data_dir = snapshot_dir

    def stat(self, key: str) -> Info:
        with self._ms.transaction(False) as t:
            _, info, _ = t.get_info(key)
        return info

    def update(self, info: Info, *fieldpaths: str) -> Info:
        with self._ms.transaction(True) as t:
            return t.update_info(info, *fieldpaths)

    def remove(self, key: str) -> None:
        t = self._ms.transaction(True)
        try:
            try:
                sid, _ = t.remove(key)
            except Exception as e:
                raise wrap_error("failed to remove", e) from e
            path = self.snapshot_dir(sid)
            renamed = os.path.join(self.root, "snapshots", "rm-" + sid)
            try:
                os.rename(path, renamed)
            except FileNotFoundError:
                renamed = ""
            except OSError as e:
                raise wrap_error("failed to rename", e) from e
        except BaseException:
            t.rollback()
            raise
        try:
            t.commit()
        except Exception as e:
            if renamed:
                try:
                    os.rename(renamed, path)
                except OSError as e1:
                    log.error("failed to rename after failed commit", path=renamed, error=str(e1))
            raise wrap_error("failed to commit", e) from e
        if renamed:
            try:
                sfs.remove_all(renamed)
            except OSError as e:
                # Must be cleaned up: any rm-* can go once no transaction is open.
                log.warn("failed to remove root filesystem", path=renamed, error=str(e))

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        with self._ms.transaction(False) as t:
            infos = t.list_info(*filters)
        for info in infos:
            fn(info)

    def close(self) -> None:
        self._ms.close()

    def _create_snapshot(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        td = path = ""
        # A view of a committed snapshot binds the parent itself: no directory of its own.
        if kind == Kind.ACTIVE or parent == "":
            td = tempfile.mkdtemp(prefix="new-", dir=os.path.join(self.root, "snapshots"))
            os.chmod(td, 0o755)
        try:
            with self._ms.transaction(True) as t:
                try:
                    s = t.create_snapshot(kind, key, parent, labels)
                except Exception as e:
                    raise wrap_error("failed to create snapshot", e) from e
                if td:
                    if s.parent_ids:
                        try:
                            sfs.copy_dir(td, self.snapshot_dir(s.parent_ids[0]), sfs.ignore_xattr_errors)
                        except Exception as e:
                            raise wrap_error("copying of parent failed", e) from e
                    path = self.snapshot_dir(s.id)
                    try:
                        os.rename(td, path)
                    except OSError as e:
                        raise wrap_error("failed to rename", e) from e
                    td = ""
                try:
                    t.commit()
                except Exception as e:
                    raise wrap_error("commit failed", e) from e
        except BaseException:
            for leftover in (td, path):
                if leftover:
                    try:
                        sfs.remove_all(leftover)
                    except OSError as e:
                        log.warn("failed to remove {path}", path=leftover, error=str(e))
            raise
        return self._mounts(s)

    def _mounts(self, s: Snapshot) -> list[Mount]:
        ro = "ro" if s.kind == Kind.VIEW else "rw"
        if not s.parent_ids or s.kind == Kind.ACTIVE:
            source = self.snapshot_dir(s.id)
        else:
            source = self.snapshot_dir(s.parent_ids[0])
        return [Mount(type=MOUNT_TYPE, source=source, options=[*DEFAULT_MOUNT_OPTIONS, ro])]


# -- plugin -------------------------------------------------------------------


@dataclass
class NativeConfig:
    """``[plugins."io.containerd.snapshotter.v1.native"]``."""

    #: root directory for the plugin (default: the plugin's dir under the daemon root).
    root_path: str = ""


def _new_plugin_snapshotter(root: str, ic: InitContext) -> NativeSnapshotter:
    snapshotter = NativeSnapshotter(root)
    snapshotter.plugin_io = (ic.reactor, ic.io_pool)
    return snapshotter


def _init(ic: InitContext) -> Deferred[NativeSnapshotter]:
    # containerd 1.6's native plugin exports no "root" (overlayfs does).
    ic.meta.platforms.append(default_platform())
    config: NativeConfig = ic.config
    root = config.root_path or ic.root
    return deferToThreadPool(ic.reactor, ic.io_pool, _new_plugin_snapshotter, root, ic)  # type: ignore[arg-type]


#: registered by :mod:`cdtwist.snapshots.plugin`, in containerd's order.
registration = Registration(type=SNAPSHOTTER, id="native", config=NativeConfig, init=_init)
