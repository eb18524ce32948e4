# -*- test-case-name: tests.test_snapshots_overlay -*-
"""``io.containerd.snapshotter.v1.overlayfs``: layers as overlayfs lower dirs.

Layout under the root, as containerd's: ``metadata.sqlite`` (bolt's
``metadata.db`` there) and ``snapshots/<id>/fs`` (the layer's files: the
upper dir while active) plus ``snapshots/<id>/work`` for active snapshots.
A snapshot without parent, or a view of a single layer, is a bind mount;
anything else is an overlay mount whose ``lowerdir`` lists the parents top
first.  Removal only forgets the snapshot; :meth:`OverlaySnapshotter.cleanup`
(run by the garbage collector) deletes directories no snapshot owns,
unless the engine is built with ``async_remove=False``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.threads import deferToThreadPool

from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger
from cdtwist.mount import Mount, unmount_all
from cdtwist.plugin import SNAPSHOTTER, Registration, SkipPlugin
from cdtwist.snapshots import Info, Kind, WalkFunc, default_platform, wrap_error
from cdtwist.snapshots import fs as sfs
from cdtwist.snapshots.storage import Snapshot, Transaction
from cdtwist.snapshots.stored import StoredSnapshotter, open_root

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

#: Label giving, in Stat/Update/Walk, where a snapshot's upper dir is.
UPPERDIR_KEY = "containerd.io/snapshot/overlay.upperdir"

_INDEX_PARAM = "/sys/module/overlay/parameters/index"


class OverlayUnsupported(CdtwistError):
    """overlayfs cannot work under this root: the plugin is skipped."""


class OverlaySnapshotter(StoredSnapshotter):
    """containerd's overlay snapshotter (``snapshots/overlay``).

    :param async_remove: leave directories of removed snapshots for
        :meth:`cleanup` (containerd 1.6's plugin always does).
    :param upperdir_label: report :data:`UPPERDIR_KEY` in infos.
    """

    def __init__(self, root: str, *, async_remove: bool = False, upperdir_label: bool = False) -> None:
        os.makedirs(root, 0o700, exist_ok=True)
        if not sfs.supports_d_type(root):
            raise CdtwistError(_d_type_message(root))
        self.root = root
        self.async_remove = async_remove
        self.upperdir_label = upperdir_label
        self._ms = open_root(root)
        try:
            self.userxattr = needs_userxattr(root)
        except Exception as e:
            self.userxattr = False
            log.warn('cannot detect whether "userxattr" option needs to be used, assuming to be false', error=str(e))
        self.index_off = supports_index()

    # -- paths -------------------------------------------------------------

    def upper_path(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid, "fs")

    data_dir = upper_path
    mounts_error = "failed to get active mount"

    def work_path(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid, "work")

    def _with_upperdir(self, sid: str, info: Info) -> Info:
        if self.upperdir_label:
            info.labels[UPPERDIR_KEY] = self.upper_path(sid)
        return info

    # -- Snapshotter -------------------------------------------------------

    def stat(self, key: str) -> Info:
        with self._ms.transaction(False) as t:
            sid, info, _ = t.get_info(key)
        return self._with_upperdir(sid, info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        with self._ms.transaction(True) as t:
            updated = t.update_info(info, *fieldpaths)
            if self.upperdir_label:
                sid, _, _ = t.get_info(updated.name)
                self._with_upperdir(sid, updated)
        return updated

    def remove(self, key: str) -> None:
        """Forget ``key`` at once; its directory goes now or at the next :meth:`cleanup`."""
        removals: list[str] = []
        with self._ms.transaction(True) as t:
            try:
                t.remove(key)
            except Exception as e:
                raise wrap_error("failed to remove", e) from e
            if not self.async_remove:
                try:
                    removals = self._cleanup_directories(t)
                except Exception as e:
                    raise wrap_error("unable to get directories for removal", e) from e
        # Committed: the key is gone whatever happens to the directories now.
        for path in removals:
            _remove_logged(path)

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        with self._ms.transaction(False) as t:
            infos = t.list_info(*filters)
            ids = t.id_map() if self.upperdir_label and infos else {}
        if self.upperdir_label:
            by_key = {key: sid for sid, key in ids.items()}
            for info in infos:
                self._with_upperdir(by_key[info.name], info)
        for info in infos:
            fn(info)

    def cleanup(self) -> None:
        """Delete snapshot directories that no snapshot owns (removed, or left by a crash)."""
        # The write transaction keeps creations out while the directory is scanned.
        with self._ms.transaction(True) as t:
            dirs = self._cleanup_directories(t)
            t.rollback()
        for path in dirs:
            _remove_logged(path)

    def close(self) -> None:
        self._ms.close()

    # -- internals ---------------------------------------------------------

    def _cleanup_directories(self, t: Transaction) -> list[str]:
        ids = t.id_map()
        snapshot_dir = os.path.join(self.root, "snapshots")
        return [os.path.join(snapshot_dir, d) for d in sorted(os.listdir(snapshot_dir)) if d not in ids]

    def _create_snapshot(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        snapshot_dir = os.path.join(self.root, "snapshots")
        with self._ms.transaction(True) as t:
            td = path = ""
            try:
                try:
                    td = self._prepare_directory(snapshot_dir, kind)
                except Exception as e:
                    raise wrap_error("failed to create prepare snapshot dir", e) from e
                try:
                    s = t.create_snapshot(kind, key, parent, labels)
                except Exception as e:
                    raise wrap_error("failed to create snapshot", e) from e
                if s.parent_ids:
                    try:
                        st = os.stat(self.upper_path(s.parent_ids[0]))
                    except OSError as e:
                        raise wrap_error("failed to stat parent", e) from e
                    try:
                        os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)
                    except OSError as e:
                        raise wrap_error("failed to chown", e) from e
                path = os.path.join(snapshot_dir, s.id)
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
                t.rollback()
                if td:
                    try:
                        sfs.remove_all(td)
                    except OSError as e:
                        log.warn("failed to cleanup temp snapshot directory", error=str(e))
                if path:
                    try:
                        sfs.remove_all(path)
                    except OSError as e:
                        log.error(
                            "failed to reclaim snapshot directory, directory may need removal", path=path, error=str(e)
                        )
                raise
        return self._mounts(s)

    def _prepare_directory(self, snapshot_dir: str, kind: Kind) -> str:
        td = tempfile.mkdtemp(prefix="new-", dir=snapshot_dir)
        # Explicit modes: the daemon's umask must not change a rootfs's root (0755).
        os.mkdir(os.path.join(td, "fs"))
        os.chmod(os.path.join(td, "fs"), 0o755)
        if kind == Kind.ACTIVE:
            os.mkdir(os.path.join(td, "work"))
            os.chmod(os.path.join(td, "work"), 0o711)
        return td

    def _mounts(self, s: Snapshot) -> list[Mount]:
        if not s.parent_ids:
            # No parent: overlay needs a lower dir, so the layer is bound directly.
            ro = "ro" if s.kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=self.upper_path(s.id), options=[ro, "rbind"])]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if self.userxattr:
            options.append("userxattr")
        if s.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(s.id)}", f"upperdir={self.upper_path(s.id)}"]
        elif len(s.parent_ids) == 1:
            return [Mount(type="bind", source=self.upper_path(s.parent_ids[0]), options=["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(self.upper_path(p) for p in s.parent_ids))
        return [Mount(type="overlay", source="overlay", options=options)]


def _remove_logged(path: str) -> None:
    try:
        sfs.remove_all(path)
    except OSError as e:
        log.warn("failed to remove directory", path=path, error=str(e))


def _d_type_message(root: str) -> str:
    return (
        f"{root} does not support d_type. If the backing filesystem is xfs, "
        "please reformat with ftype=1 to enable d_type support"
    )


def supports_index() -> bool:
    """Whether the kernel knows overlay's ``index=`` option (then cdtwist sets ``index=off``)."""
    return os.path.exists(_INDEX_PARAM)


def running_in_user_ns() -> bool:
    """Go's ``userns.RunningInUserNS``: anything but the full identity uid map."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return not (len(lines) == 1 and lines[0] == ["0", "0", "4294967295"])


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release
    parts = []
    for piece in release.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return (parts[0], parts[1]) >= (major, minor)


def _overlay_check_dirs(td: str) -> tuple[str, str]:
    for d in ("lower1", "lower2", "upper", "work", "merged"):
        os.mkdir(os.path.join(td, d), 0o755)
    opts = "lowerdir={}:{},upperdir={},workdir={}".format(
        os.path.join(td, "lower2"), os.path.join(td, "lower1"), os.path.join(td, "upper"), os.path.join(td, "work")
    )
    return opts, os.path.join(td, "merged")


def needs_userxattr(d: str) -> bool:
    """Whether overlay must be mounted with ``userxattr`` (only inside a user namespace, kernel >= 5.11)."""
    if not running_in_user_ns():
        return False
    if sfs.statfs_type(d) == sfs.TMPFS_MAGIC:
        return False
    if _kernel_at_least(5, 11):
        return True
    root = os.path.join(d, "userxattr-check")
    sfs.remove_all(root)
    os.makedirs(root, 0o700, exist_ok=True)
    try:
        td = tempfile.mkdtemp(dir=root)
        opts, dest = _overlay_check_dirs(td)
        try:
            Mount("overlay", "overlay", [opts, "userxattr"]).mount(dest)
        except OSError as e:
            log.debug(
                'cannot mount overlay with "userxattr", probably the kernel does not support userxattr', error=str(e)
            )
            return False
        try:
            unmount_all(dest)
        except OSError as e:
            log.warn("Failed to unmount check directory {dir}", dir=dest, error=str(e))
        return True
    finally:
        sfs.remove_all(root)


def supports_multiple_lower_dir(d: str) -> None:
    """Mount a two-lower overlay under ``d``: raises :class:`OverlayUnsupported` when the kernel cannot."""
    td = tempfile.mkdtemp(prefix="multiple-lowerdir-check", dir=d)
    try:
        opts, dest = _overlay_check_dirs(td)
        try:
            Mount("overlay", "overlay", [opts]).mount(dest)
        except OSError as e:
            raise OverlayUnsupported(f"failed to mount overlay: {os.strerror(e.errno or 0).lower()}") from e
        try:
            unmount_all(dest)
        except OSError as e:
            log.warn("Failed to unmount check directory {dir}", dir=dest, error=str(e))
    finally:
        try:
            sfs.remove_all(td)
        except OSError as e:
            log.warn("Failed to remove check directory {dir}", dir=td, error=str(e))


def supported(root: str) -> None:
    """overlayutils.Supported: d_type on the backing filesystem and a working overlay mount.

    :raises OverlayUnsupported: with containerd's wording.
    """
    os.makedirs(root, 0o700, exist_ok=True)
    if not sfs.supports_d_type(root):
        raise OverlayUnsupported(_d_type_message(root))
    supports_multiple_lower_dir(root)


# -- plugin -------------------------------------------------------------------


@dataclass
class OverlayConfig:
    """``[plugins."io.containerd.snapshotter.v1.overlayfs"]``, containerd 1.6's keys."""

    #: root directory for the plugin (default: the plugin's dir under the daemon root).
    root_path: str = ""
    #: add ``containerd.io/snapshot/overlay.upperdir`` to snapshot infos.
    upperdir_label: bool = False


def _new_plugin_snapshotter(root: str, config: OverlayConfig, ic: InitContext) -> OverlaySnapshotter:
    try:
        supported(root)
    except OverlayUnsupported as e:
        raise SkipPlugin(str(e)) from e
    snapshotter = OverlaySnapshotter(root, async_remove=True, upperdir_label=config.upperdir_label)
    snapshotter.plugin_io = (ic.reactor, ic.io_pool)
    return snapshotter


def _init(ic: InitContext) -> Deferred[OverlaySnapshotter]:
    ic.meta.platforms.append(default_platform())
    config: OverlayConfig = ic.config
    root = config.root_path or ic.root
    ic.meta.exports["root"] = root
    return deferToThreadPool(ic.reactor, ic.io_pool, _new_plugin_snapshotter, root, config, ic)  # type: ignore[arg-type]


#: registered by :mod:`cdtwist.snapshots.plugin`, in containerd's order.
registration = Registration(type=SNAPSHOTTER, id="overlayfs", config=OverlayConfig, init=_init)
