"""Helpers for the ``cdtwist.diff`` tests: tar builders, tree snapshots, overlay mounts.

No tests here; the ``test_diff_`` prefix only keeps the diff tests together.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable

from cdtwist.diff import tarstream
from cdtwist.diff.tarstream import Header, TarWriter

MTIME = 1_700_000_000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# A valid v2 file capability: cap_net_raw permitted, effective.
CAPABILITY = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12


def entry(
    name: str | bytes,
    kind: str = "file",
    data: bytes = b"",
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    link: str | bytes = b"",
    mtime: int = MTIME,
    pax: dict[str, bytes] | None = None,
    dev: tuple[int, int] = (0, 0),
    atime: int | None = None,
    size: int | None = None,
) -> tuple[Header, bytes]:
    """One member for :func:`layer`, written with cdtwist's Go-style writer."""
    typeflag = {
        "file": tarstream.TYPE_REG,
        "dir": tarstream.TYPE_DIR,
        "symlink": tarstream.TYPE_SYMLINK,
        "link": tarstream.TYPE_LINK,
        "char": tarstream.TYPE_CHAR,
        "block": tarstream.TYPE_BLOCK,
        "fifo": tarstream.TYPE_FIFO,
    }[kind]
    if mode is None:
        mode = 0o755 if kind == "dir" else 0o644
    hdr = Header(
        name=os.fsencode(name),
        typeflag=typeflag,
        linkname=os.fsencode(link),
        size=len(data) if size is None else size,
        mode=mode,
        uid=uid,
        gid=gid,
        mtime_ns=mtime * 1_000_000_000,
        atime_ns=None if atime is None else atime * 1_000_000_000,
        devmajor=dev[0],
        devminor=dev[1],
        pax=dict(pax or {}),
    )
    return hdr, data


def whiteout(name: str) -> tuple[Header, bytes]:
    return entry(name)


def layer(entries: Iterable[tuple[Header, bytes]], trailer: bool = True) -> bytes:
    out = io.BytesIO()
    tw = TarWriter(out.write)
    for hdr, data in entries:
        tw.write_header(hdr, pax=True)
        if hdr.typeflag == tarstream.TYPE_REG and data:
            tw.write(data)
    if trailer:
        tw.close()
    else:
        tw._flush()
    return out.getvalue()


def pytar(members: Iterable[tuple[tarfile.TarInfo, bytes | None]], format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar written by Python's tarfile (another writer's dialect)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tarinfo(name: str, type: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.mtime = MTIME
    ti.mode = 0o755 if type == tarfile.DIRTYPE else 0o644
    ti.size = len(data) if type == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for k in keys:
        try:
            out[k] = os.getxattr(path, k, follow_symlinks=False)
        except OSError:
            pass
    return out


def snapshot(root: str, times: bool = True, atimes: bool = False, root_meta: bool = False) -> dict:
    """Everything about a tree that a layer carries, keyed by relative path.

    Hard links appear as the sorted group of paths sharing an inode.
    """
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ([""] if dirpath == root and root_meta else []):
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                content,
                st.st_mtime_ns if times and not stat.S_ISLNK(st.st_mode) else None,
                st.st_atime_ns if atimes else None,
                tuple(sorted(_xattrs(path).items())),
                (st.st_dev, st.st_ino) if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 else None,
            )
    groups = {k: tuple(sorted(v)) for k, v in inodes.items()}
    return {rel: v[:-1] + (groups.get(v[-1]) if v[-1] else None,) for rel, v in out.items()}


def outside_state(top: str, exclude: str) -> dict:
    """The tree under ``top`` except ``exclude`` (the apply root), times included."""
    ex = os.path.relpath(exclude, top)
    snap = snapshot(top, atimes=False, root_meta=True)
    return {k: v for k, v in snap.items() if k != ex and not k.startswith(ex + "/")}


def mount(source: str, target: str, fstype: str, options: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), 0, os.fsencode(options)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} {options}: {os.strerror(e)}")


def umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 2) != 0:
        e = ctypes.get_errno()
        if e != errno.EINVAL:
            raise OSError(e, os.strerror(e))


class Chunked(io.RawIOBase):
    """A raw stream serving ``data`` in small uneven reads (as a pipe would)."""

    def __init__(self, data: bytes, step: int = 7919) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n
