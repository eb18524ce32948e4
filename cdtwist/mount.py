# -*- test-case-name: tests.test_snapshots_mount,tests.test_tap -*-
"""Mounting what snapshotters return (containerd's ``mount`` package, Linux).

:meth:`Mount.mount` is Go's ``Mount.Mount``: fstab-style options split into
mount(2) flags and data, a bind mount remounted read-only when ``ro`` is
asked (a bind ignores ``MS_RDONLY`` on its first call), and overlay
``lowerdir`` lists longer than a page shortened to paths relative to their
common directory.  Go forks a child to ``chdir`` there; cdtwist mounts
from a short-lived thread that first unshares its working directory
(``unshare(CLONE_FS)``), so the daemon's own cwd never moves.

Every function blocks; call them from a pool thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import posixpath
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
CLONE_FS = 0x200

_PTYPES = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

#: Go's option table: name -> (clear, flag).
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

_HELPER_BINARIES = ("mount.fuse", "mount.fuse3")
_PAGESIZE = os.sysconf("SC_PAGESIZE")


@dataclass
class Mount:
    """One mount(2) call: what a snapshotter hands to whoever mounts the snapshot."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)

    def mount(self, target: str) -> None:
        """Mount onto ``target`` (Go's ``Mount.Mount``).

        :raises OSError: from mount(2), errno intact.
        """
        for helper in _HELPER_BINARIES:
            prefix = helper.removeprefix("mount.") + "."
            if self.type.startswith(prefix):
                _mount_with_helper(self, helper, prefix, target)
                return
        chdir = ""
        options = list(self.options)
        # Stay clear of the one-page limit of mount(2)'s data argument.
        if self.type == "overlay" and _options_size(options) >= _PAGESIZE - 512:
            chdir, options = compact_lowerdir_option(options)
        flags, data, losetup = parse_mount_options(options)
        if len(data) > _PAGESIZE:
            raise CdtwistError("mount options is too long")
        if losetup:
            raise CdtwistError("loop mounts are not supported by cdtwist")
        oflags = flags & ~_PTYPES
        if flags & MS_REMOUNT == 0 or data:
            _mount_at(chdir, self.source, target, self.type, oflags, data)
        if flags & _PTYPES:
            _sys_mount("", target, "", flags & (_PTYPES | MS_REC | MS_SILENT), "")
        if oflags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            # A bind ignores MS_RDONLY: remount it to apply read-only.
            _sys_mount("", target, "", oflags | MS_REMOUNT, "")


def parse_mount_options(options: Sequence[str]) -> tuple[int, str, bool]:
    """Split fstab options into ``(flags, data, loop)`` as Go's ``parseMountOptions``."""
    flag = 0
    losetup = False
    data: list[str] = []
    for o in options:
        entry = _FLAGS.get(o)
        if entry is not None and entry[1] != 0:
            clear, f = entry
            flag = flag & ~f if clear else flag | f
        elif o == "loop":
            losetup = True
        else:
            data.append(o)
    return flag, ",".join(data), losetup


def _options_size(options: Sequence[str]) -> int:
    return sum(len(o) for o in options)


def _longest_common_prefix(strs: Sequence[str]) -> str:
    if not strs:
        return ""
    lo, hi = min(strs), max(strs)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        if a != b:
            return lo[:i]
    return lo


def compact_lowerdir_option(options: Sequence[str]) -> tuple[str, list[str]]:
    """Rewrite ``lowerdir=`` relative to the lower dirs' common parent (Go's ``compactLowerdirOption``).

    Returns ``(dir to mount from, new options)``; ``("", options)`` when
    nothing can be shortened.  The snapshot ids are digits, so the common
    prefix is taken back to its parent directory (``.../snapshots``).
    """
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx == -1:
        return "", list(options)
    dirs = options[idx][len("lowerdir=") :].split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = _longest_common_prefix(dirs)
    if common == "":
        return "", list(options)
    common = posixpath.dirname(common)
    if common == "/":
        return "", list(options)
    common += "/"
    new = [o for i, o in enumerate(options) if i != idx]
    new.append("lowerdir=" + ":".join(d[len(common) :] for d in dirs))
    return common, new


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
        flags,
        os.fsencode(data) if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # a bare errno, as Go reports it


def _mount_at(chdir: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2), resolving relative paths in ``data`` against ``chdir`` when given."""
    if not chdir:
        _sys_mount(source, target, fstype, flags, data)
        return
    if not os.path.isdir(chdir):
        raise CdtwistError(f"failed to mountat: {chdir} is not dir")
    target = os.path.abspath(target)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            # This thread gets its own cwd; the rest of the process keeps its own.
            if _libc.unshare(CLONE_FS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FS): {os.strerror(err)}")
            os.chdir(chdir)
            _sys_mount(source, target, fstype, flags, data)
            outcome.append(None)
        except BaseException as e:  # handed back to the calling thread
            outcome.append(e)

    thread = threading.Thread(target=run, name="cdtwist-mountat", daemon=True)
    thread.start()
    thread.join()
    if outcome and outcome[0] is not None:
        raise outcome[0]


def _mount_with_helper(m: Mount, helper: str, prefix: str, target: str) -> None:
    """FUSE types go through ``mount.fuse``/``mount.fuse3`` as in containerd."""
    args = [m.source, target]
    for o in m.options:
        args += ["-o", o]
    args += ["-t", m.type.removeprefix(prefix)]
    try:
        proc = subprocess.run([helper, *args], capture_output=True, check=False)
    except OSError as e:
        raise CdtwistError(f"mount helper [{helper} {args}] failed: {e}") from e
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        raise CdtwistError(f"mount helper [{helper} {args}] failed: {out!r}: exit status {proc.returncode}")


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mount each in order onto ``target`` (Go's ``mount.All``); stops at the first failure."""
    for m in mounts:
        m.mount(target)


def unmount(target: str, flags: int = 0) -> None:
    """umount2, retrying while busy; "not a mount point" (EINVAL) is not an error."""
    try:
        _unmount_retry(target, flags)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def _unmount_retry(target: str, flags: int) -> None:
    for _ in range(50):
        try:
            _umount2(target, flags)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    raise OSError(errno.EBUSY, f"failed to unmount target {target}: device or resource busy")


def unmount_all(target: str, flags: int = 0) -> None:
    """Unmount until nothing is mounted on ``target`` (Go's ``UnmountAll``).

    No-op for ``""`` and for a path that does not exist.
    """
    if not target or not os.path.lexists(target):
        return
    while True:
        try:
            _unmount_retry(target, flags)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return
            raise


def readonly_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    """The same mounts made read-only (Go's ``readonlyMounts``); an overlay's upper becomes a lower."""
    out = []
    for m in mounts:
        if m.type == "overlay":
            out.append(Mount(m.type, m.source, _readonly_overlay(m.options)))
            continue
        opts = [o for o in m.options if o not in ("rw", "ro")]
        opts.append("ro")
        out.append(Mount(m.type, m.source, opts))
    return out


def _readonly_overlay(options: Sequence[str]) -> list[str]:
    out = []
    upper = ""
    for o in options:
        if o.startswith("upperdir="):
            upper = o.removeprefix("upperdir=")
        elif not o.startswith("workdir="):
            out.append(o)
    if upper:
        out = [f"lowerdir={upper}:{o.removeprefix('lowerdir=')}" if o.startswith("lowerdir=") else o for o in out]
    return out


def _default_temp_location() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


_temp_mount_location = _default_temp_location()


def set_temp_mount_location(path: str) -> None:
    """Where :func:`with_temp_mount` mounts by default: the daemon sets ``<root>/tmpmounts``.

    Mirrors ``mount.SetTempMountLocation``: the directory is created (0700).
    """
    global _temp_mount_location
    path = os.path.abspath(path)
    os.makedirs(path, 0o700, exist_ok=True)
    _temp_mount_location = path


def temp_mount_location() -> str:
    return _temp_mount_location


def with_temp_mount(mounts: Sequence[Mount], fn: Callable[[str], T], tmpdir: str | None = None) -> T:
    """Mount into a fresh ``containerd-mount*`` dir, call ``fn(root)``, then unmount and remove it.

    ``tmpdir`` defaults to :func:`temp_mount_location` (``<root>/tmpmounts``
    in the daemon, which unmounts leftovers there at boot).  Errors are
    prefixed like Go's (``failed to mount <dir>: ...``, ``mount callback
    failed on <dir>: ...``) when they are containerd classes; other
    exceptions from ``fn`` propagate unchanged.
    """
    from cdtwist.snapshots import wrap_error

    root = tempfile.mkdtemp(prefix="containerd-mount", dir=tmpdir or _temp_mount_location)
    try:
        failure: BaseException | None = None
        result: T | None = None
        try:
            try:
                mount_all(mounts, root)
            except Exception as e:
                raise wrap_error(f"failed to mount {root}", e) from e
            try:
                result = fn(root)
            except CdtwistError as e:
                raise wrap_error(f"mount callback failed on {root}", e) from e
        except BaseException as e:
            failure = e
        try:
            unmount_all(root, 0)
        except OSError as e:
            uerr = wrap_error(f"failed to unmount {root}", e)
            if failure is None:
                raise uerr from e
            log.error("failed to unmount {dir}", dir=root, error=str(e))
        if failure is not None:
            raise failure
        return result  # type: ignore[return-value]
    finally:
        try:
            os.rmdir(root)
        except OSError as e:
            log.error("failed to remove mount temp dir", dir=root, error=str(e))


def with_readonly_temp_mount(mounts: Sequence[Mount], fn: Callable[[str], T], tmpdir: str | None = None) -> T:
    """:func:`with_temp_mount` of :func:`readonly_mounts` (Go's ``WithReadonlyTempMount``)."""
    return with_temp_mount(readonly_mounts(mounts), fn, tmpdir)


@dataclass
class MountInfo:
    """One line of ``/proc/self/mountinfo`` (the fields containerd uses)."""

    id: int
    parent: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    vfs_options: str


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Parse the mount table, in kernel order."""
    table = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10:
                continue
            sep = fields.index("-", 6)
            table.append(
                MountInfo(
                    id=int(fields[0]),
                    parent=int(fields[1]),
                    root=_unescape(fields[3]),
                    mountpoint=_unescape(fields[4]),
                    options=fields[5],
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    vfs_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                )
            )
    return table


def lookup(directory: str) -> MountInfo:
    """The mount holding ``directory`` (Go's ``mount.Lookup``): longest mountpoint prefix wins."""
    directory = posixpath.normpath(directory)
    try:
        directory = os.path.realpath(directory, strict=True)
    except OSError:
        pass
    candidates = [m for m in mount_table() if directory.startswith(m.mountpoint)]
    if not candidates:
        raise CdtwistError(f'failed to find the mount info for "{directory}"')
    best = candidates[0]
    for m in candidates[1:]:
        if len(m.mountpoint) > len(best.mountpoint):
            best = m
    return best


def mounted_under(directory: str) -> list[str]:
    """Mountpoints at or below ``directory``, deepest first (for leak checks and cleanups)."""
    directory = directory.rstrip("/")
    found = [
        m.mountpoint for m in mount_table() if m.mountpoint == directory or m.mountpoint.startswith(directory + "/")
    ]
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def cleanup_temp_mounts(directory: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Unmount everything below ``directory``, deepest first (containerd's CleanupTempMounts).

    At boot, before anything mounts there: what is found was left by a crash.
    """
    prefix = directory.rstrip("/") + "/"
    found = [m.mountpoint for m in mount_table(mountinfo) if m.mountpoint.startswith(prefix)]
    found.sort(key=lambda p: p.count("/"), reverse=True)
    for target in found:
        _umount2(target, MNT_DETACH)
    return found
