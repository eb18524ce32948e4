# -*- test-case-name: tests.test_snapshots_native -*-
"""Filesystem helpers the snapshotters share (continuity's ``fs`` package, v0.3.0).

``disk_usage`` counts what Go's ``fs.DiskUsage`` counts (allocated blocks,
each inode once), ``copy_dir`` is ``fs.CopyDir`` (owners, modes, times,
xattrs, hard links, symlinks, devices, FIFOs and sockets) and
``supports_d_type`` is ``fs.SupportsDType``.  All block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable

from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger
from cdtwist.snapshots import Usage, go_error_text, os_error

log = get_logger(__name__)

#: ``st_blocks`` unit.
BLOCK_UNIT = 512
TMPFS_MAGIC = 0x01021994

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def disk_usage(*roots: str) -> Usage:
    """Inodes and allocated bytes under ``roots``, counting each inode once and not following symlinks.

    :raises CdtwistError: Go's ``lstat <path>: ...`` when a path cannot be read.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    for root in roots:
        try:
            st = os.lstat(root)
        except OSError as e:
            raise os_error("lstat", root, e) from e
        todo = [(root, st)]
        while todo:
            path, st = todo.pop()
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                size += st.st_blocks * BLOCK_UNIT
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError as e:
                raise os_error("open", path, e) from e
            for entry in entries:
                try:
                    todo.append((entry.path, entry.stat(follow_symlinks=False)))
                except OSError as e:
                    raise os_error("lstat", entry.path, e) from e
    return Usage(inodes=len(seen), size=size)


XAttrErrorHandler = Callable[[str, str, str, BaseException], BaseException | None]


def ignore_xattr_errors(dst: str, src: str, key: str, err: BaseException) -> BaseException | None:
    """``security.*`` and friends often cannot be copied: log and go on (the native snapshotter's handler)."""
    log.debug("failed to copy xattr {key!r}", key=key, error=str(err))
    return None


def copy_dir(dst: str, src: str, xattr_errors: XAttrErrorHandler | None = None) -> None:
    """Copy the tree ``src`` into ``dst`` preserving everything ``fs.CopyDir`` does.

    Regular files sharing an inode stay hard links of each other; xattr
    errors go to ``xattr_errors`` (return ``None`` to ignore one).  Unlike
    Go, directory times are set again once their entries are written, so
    they survive the copy like ``cp -a``.
    """
    _copy_directory(dst, src, {}, xattr_errors)


def _copy_directory(dst: str, src: str, inodes: dict[int, str], xeh: XAttrErrorHandler | None) -> None:
    try:
        st = os.stat(src)
    except OSError as e:
        raise os_error("failed to stat", src, e) from e
    if not stat.S_ISDIR(st.st_mode):
        raise CdtwistError(f"source {src} is not directory")
    try:
        dst_st = os.stat(dst)
    except FileNotFoundError:
        try:
            os.mkdir(dst, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise CdtwistError(f"failed to mkdir {dst}: {go_error_text(e)}") from e
    else:
        if not stat.S_ISDIR(dst_st.st_mode):
            raise CdtwistError(f"cannot copy to non-directory: {dst}")
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise CdtwistError(f"failed to read {src}: {go_error_text(e)}") from e
    try:
        _copy_file_info(st, dst)
    except OSError as e:
        raise CdtwistError(f"failed to copy file info for {dst}: {go_error_text(e)}") from e
    _copy_xattrs(dst, src, xeh)

    for entry in entries:
        source = os.path.join(src, entry.name)
        target = os.path.join(dst, entry.name)
        fi = entry.stat(follow_symlinks=False)
        mode = fi.st_mode
        if stat.S_ISDIR(mode):
            _copy_directory(target, source, inodes, xeh)
            continue
        try:
            if stat.S_ISREG(mode):
                link = _link_source(target, fi, inodes)
                if link:
                    os.link(link, target)
                else:
                    copy_file(target, source)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(source), target)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                rdev = fi.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
                os.mknod(target, mode, rdev)
            else:
                log.warn("unsupported mode: {path}: {mode:o}", path=source, mode=mode)
                continue
            _copy_file_info(fi, target)
        except OSError as e:
            raise CdtwistError(f"failed to copy {source}: {go_error_text(e)}") from e
        _copy_xattrs(target, source, xeh)
    # Writing the entries moved the directory's mtime: put it back.
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _link_source(name: str, fi: os.stat_result, inodes: dict[int, str]) -> str:
    """The first copy of a multiply-linked inode, or ``""`` (recording ``name`` as that copy)."""
    if fi.st_nlink <= 1:
        return ""
    first = inodes.get(fi.st_ino)
    if first is None:
        inodes[fi.st_ino] = name
        return ""
    return first


def _copy_file_info(st: os.stat_result, name: str) -> None:
    try:
        os.chown(name, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        # Some filesystems refuse a no-op chown (NFS): fine when nothing changes.
        now = os.lstat(name)
        if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
            raise
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode))
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_file(target: str, source: str) -> None:
    """Copy content with ``copy_file_range``, falling back to read/write across filesystems."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        first = True
        while size > 0:
            try:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(size, 1 << 30))
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP) or not first:
                    raise
                shutil.copyfileobj(src, dst, 1 << 20)
                return
            if n == 0:
                break
            first = False
            size -= n


def _copy_xattrs(dst: str, src: str, xeh: XAttrErrorHandler | None) -> None:
    try:
        keys = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        err: BaseException | None = CdtwistError(f"failed to list xattrs on {src}: {go_error_text(e)}")
        if xeh is not None:
            err = xeh(dst, src, "", err)  # type: ignore[arg-type]
        if err is not None:
            raise err
        return
    for key in keys:
        try:
            value = os.getxattr(src, key, follow_symlinks=False)
        except OSError as e:
            err = CdtwistError(f'failed to get xattr "{key}" on {src}: {go_error_text(e)}')
            if xeh is not None and xeh(dst, src, key, err) is None:
                continue
            raise err from e
        try:
            os.setxattr(dst, key, value, 0, follow_symlinks=False)
        except OSError as e:
            err = CdtwistError(f'failed to set xattr "{key}" on {dst}: {go_error_text(e)}')
            if xeh is not None and xeh(dst, src, key, err) is None:
                continue
            raise err from e


def remove_all(path: str) -> None:
    """Go's ``os.RemoveAll``: the tree at ``path``; a missing path is success."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return

    def onerror(func: Callable[..., object], p: str, info: tuple[type, BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(path, onerror=onerror)


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
DT_UNKNOWN = 0


def supports_d_type(directory: str) -> bool:
    """Whether ``readdir`` reports entry types on ``directory``'s filesystem (overlay needs it)."""
    fd, dummy = tempfile.mkstemp(prefix=".continuity-dtype-check-", dir=directory)
    os.close(fd)
    try:
        handle = _libc.opendir(os.fsencode(directory))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), directory)
        try:
            while True:
                ctypes.set_errno(0)
                ent = _libc.readdir(handle)
                if not ent:
                    err = ctypes.get_errno()
                    if err:
                        raise OSError(err, os.strerror(err), directory)
                    return True
                name = ent.contents.d_name
                if name in (b".", b".."):
                    continue
                if ent.contents.d_type == DT_UNKNOWN:
                    return False
        finally:
            _libc.closedir(handle)
    finally:
        os.unlink(dummy)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def statfs_type(path: str) -> int:
    """``statfs(2)``'s ``f_type`` (filesystem magic) of ``path``."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type & 0xFFFFFFFF
