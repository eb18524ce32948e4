# -*- test-case-name: tests.test_diff_compare -*-
"""The walking differ: an OCI layer of what changed between two directories.

:func:`changes` is continuity's ``fs.Changes`` (a double walk of lower and
upper in path order) or, with ``overlay_upper=True``, its ``DiffDirChanges``
for an overlay upperdir (only the upperdir is walked; 0/0 character devices
are deletions, an opaque directory is a deletion of ``<dir>/.wh..opq``).
:class:`ChangeWriter` is containerd's ``archive.ChangeWriter``: headers as
Go writes them (USTAR, or PAX when xattrs or long fields need it), parents
included before their children, deletions as ``.wh.`` whiteouts, hard links
within the layer.  :func:`compare` is the walking differ's ``Compare``
without the content store: the layer (``tar`` or ``tar+gzip``) is written to
a stream with its digest and the uncompressed digest (the
``containerd.io/uncompressed`` label) computed on the way.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cdtwist.diff import tarstream
from cdtwist.diff.apply import OVERLAY_OPAQUE_XATTR, OVERLAY_USER_OPAQUE_XATTR, WHITEOUT_PREFIX
from cdtwist.diff.compression import (
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    UNCOMPRESSED_LABEL,
    Compression,
    compress_stream,
)
from cdtwist.diff.tarstream import Header, TarWriter
from cdtwist.errors import CdtwistError, NotImplemented_

CAPABILITY_XATTR = "security.capability"
_COMPARE_CHUNK = 32 * 1024
_COPY_CHUNK = 1 << 20


class ChangeKind(enum.IntEnum):
    UNMODIFIED = 0
    ADD = 1
    MODIFY = 2
    DELETE = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    path: bytes  # absolute within the tree: b"/a/b"
    stat: os.stat_result | None


# -- walking --


def _walk(root: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """``filepath.Walk`` below ``root``: lexical order per directory, lstat, root itself skipped."""
    stack: list[tuple[bytes, Iterator[bytes]]] = [(b"", iter(sorted(os.listdir(root))))]
    while stack:
        rel, it = stack[-1]
        name = next(it, None)
        if name is None:
            stack.pop()
            continue
        path = rel + b"/" + name
        st = os.lstat(root + path)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(root + path))
            except FileNotFoundError:
                continue
            stack.append((path, iter(names)))


def _key(path: bytes) -> bytes:
    """Continuity's ``directoryCompare`` order: the separator sorts before everything."""
    return path.replace(b"/", b"\x00")


def _lgetxattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _same_fs_time(a: int, b: int) -> bool:
    return a == b or (a // 1_000_000_000 == b // 1_000_000_000 and (a % 1_000_000_000 == 0 or b % 1_000_000_000 == 0))


def _same_content(p1: bytes, p2: bytes) -> bool:
    with open(p1, "rb", buffering=0) as f1, open(p2, "rb", buffering=0) as f2:
        while True:
            b1 = f1.read(_COMPARE_CHUNK)
            b2 = f2.read(_COMPARE_CHUNK)
            if b1 != b2:
                return False
            if not b1:
                return True


def _same_file(p1: bytes, s1: os.stat_result, p2: bytes, s2: os.stat_result) -> bool:
    """Continuity's ``sameFile``: metadata, capabilities, then size, mtime and maybe content."""
    if (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino):
        return True
    if (s1.st_mode, s1.st_uid, s1.st_gid, s1.st_rdev) != (s2.st_mode, s2.st_uid, s2.st_gid, s2.st_rdev):
        return False
    if _lgetxattr(p1, CAPABILITY_XATTR) != _lgetxattr(p2, CAPABILITY_XATTR):
        return False
    if stat.S_ISDIR(s1.st_mode):
        return True
    if s1.st_size != s2.st_size:
        return False
    sec1, ns1 = divmod(s1.st_mtime_ns, 1_000_000_000)
    sec2, ns2 = divmod(s2.st_mtime_ns, 1_000_000_000)
    if sec1 != sec2:
        return False
    if ns1 == 0 and ns2 == 0:
        if stat.S_ISLNK(s1.st_mode):
            return os.readlink(p1) == os.readlink(p2)
        if s1.st_size == 0:
            return True
        return _same_content(p1, p2)
    return ns1 == ns2


def _is_linked(st: os.stat_result) -> bool:
    return not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1


def changes(lower: str | bytes | None, upper: str | bytes, *, overlay_upper: bool = False) -> Iterator[Change]:
    """Continuity's ``fs.Changes`` from ``lower`` to ``upper``, in path order.

    With ``overlay_upper`` the upper is an overlay upperdir whose lower view
    is ``lower``; only the upperdir is walked.
    """
    upper_b = os.fsencode(upper)
    if lower is None or lower == "" or lower == b"":
        for path, st in _walk(upper_b):
            yield Change(ChangeKind.ADD, path, st)
        return
    lower_b = os.fsencode(lower)
    if overlay_upper:
        yield from _overlay_changes(lower_b, upper_b)
    else:
        yield from _double_walk(lower_b, upper_b)


def _double_walk(a: bytes, b: bytes) -> Iterator[Change]:
    w1, w2 = _walk(a), _walk(b)
    f1 = next(w1, None)
    f2 = next(w2, None)
    rmdir: bytes | None = None
    while f1 is not None or f2 is not None:
        if f1 is None:
            kind = ChangeKind.ADD
        elif f2 is None:
            kind = ChangeKind.DELETE
        else:
            k1, k2 = _key(f1[0]), _key(f2[0])
            kind = ChangeKind.DELETE if k1 < k2 else ChangeKind.ADD if k1 > k2 else ChangeKind.MODIFY
        if kind == ChangeKind.ADD:
            assert f2 is not None
            rmdir = None
            yield Change(kind, f2[0], f2[1])
            f2 = next(w2, None)
        elif kind == ChangeKind.DELETE:
            assert f1 is not None
            p1, s1 = f1
            f1 = next(w1, None)
            if rmdir is not None and p1.startswith(rmdir):
                continue  # inside a directory already reported deleted
            rmdir = p1 + b"/" if stat.S_ISDIR(s1.st_mode) else None
            yield Change(kind, p1, None)
        else:
            assert f1 is not None and f2 is not None
            (p1, s1), (p2, s2) = f1, f2
            same = _same_file(a + p1, s1, b + p2, s2)
            rmdir = p1 + b"/" if stat.S_ISDIR(s1.st_mode) and not stat.S_ISDIR(s2.st_mode) else None
            f1, f2 = next(w1, None), next(w2, None)
            if same:
                if not _is_linked(s2):
                    continue
                kind = ChangeKind.UNMODIFIED
            yield Change(kind, p2, s2)


def _overlay_deleted(upper: bytes, path: bytes, st: os.stat_result) -> bytes | None:
    """Continuity's overlay whiteout conversion: what a upperdir entry deletes, if anything."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return path
    if stat.S_ISDIR(st.st_mode):
        for name in (OVERLAY_OPAQUE_XATTR, OVERLAY_USER_OPAQUE_XATTR):
            if _lgetxattr(upper + path, name) == b"y":
                return path + b"/.wh..opq"
    return None


def _overlay_changes(base: bytes, upper: bytes) -> Iterator[Change]:
    changed_dirs: set[bytes] = set()
    for path, st in _walk(upper):
        deleted = _overlay_deleted(upper, path, st)
        f: os.stat_result | None = st
        if deleted is not None:
            path, kind, f = deleted, ChangeKind.DELETE, None
        else:
            kind = ChangeKind.ADD
            try:
                bst = os.stat(base + path)
            except (FileNotFoundError, NotADirectoryError):
                bst = None
            if bst is not None:
                if (
                    stat.S_ISDIR(bst.st_mode)
                    and stat.S_ISDIR(st.st_mode)
                    and st.st_size == bst.st_size
                    and st.st_mode == bst.st_mode
                    and _same_fs_time(st.st_mtime_ns, bst.st_mtime_ns)
                ):
                    continue
                kind = ChangeKind.MODIFY
        if f is not None and stat.S_ISDIR(f.st_mode):
            changed_dirs.add(path)
        if kind in (ChangeKind.ADD, ChangeKind.DELETE):
            parent = os.path.dirname(path)
            if parent not in changed_dirs and parent != b"/":
                yield Change(ChangeKind.MODIFY, parent, os.stat(upper + parent))
                changed_dirs.add(parent)
        yield Change(kind, path, f)


# -- tar of the changes (archive.ChangeWriter) --


class _Write(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass
class ChangeWriter:
    """Turns changes into an OCI layer tar on ``out``.

    ``whiteout_time_ns`` defaults to now (as Go); pin it for reproducible
    layers.  ``all_xattrs`` exports every xattr but ``trusted.*`` instead of
    containerd's ``security.capability`` alone.
    """

    out: _Write
    source: bytes
    whiteout_time_ns: int = field(default_factory=time.time_ns)
    all_xattrs: bool = False

    def __post_init__(self) -> None:
        self.source = os.fsencode(self.source)
        self._tw = TarWriter(self.out.write)
        self._inode_src: dict[tuple[int, int], bytes] = {}
        self._inode_refs: dict[tuple[int, int], list[bytes]] = {}
        self._added_dirs: set[bytes] = set()

    def handle_change(self, kind: ChangeKind, path: bytes, st: os.stat_result | None) -> None:
        if kind == ChangeKind.DELETE:
            d, base = os.path.split(path)
            name = os.path.join(d, WHITEOUT_PREFIX + base)[1:]
            hdr = Header(
                name=name,
                typeflag=tarstream.TYPE_REG,
                mtime_ns=self.whiteout_time_ns,
                atime_ns=self.whiteout_time_ns,
                ctime_ns=self.whiteout_time_ns,
            )
            self._include_parents(hdr)
            self._tw.write_header(hdr, pax=False)
            return
        assert st is not None
        source = self.source + path
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        hdr = Header(
            name=path.lstrip(b"/"),
            mode=stat.S_IMODE(mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns // 1_000_000_000 * 1_000_000_000,
        )
        if stat.S_ISREG(mode):
            hdr.typeflag, hdr.size = tarstream.TYPE_REG, st.st_size
        elif stat.S_ISDIR(mode):
            hdr.typeflag = tarstream.TYPE_DIR
            hdr.name += b"/"
        elif stat.S_ISLNK(mode):
            hdr.typeflag, hdr.linkname = tarstream.TYPE_SYMLINK, os.readlink(source)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            hdr.typeflag = tarstream.TYPE_CHAR if stat.S_ISCHR(mode) else tarstream.TYPE_BLOCK
        elif stat.S_ISFIFO(mode):
            hdr.typeflag = tarstream.TYPE_FIFO
        else:
            raise CdtwistError(f"archive/tar: unknown file mode {oct(mode)}")
        # Go's statUnix tests S_IFBLK|S_IFCHR bits loosely: every non-regular, non-fifo entry gets rdev.
        if mode & (stat.S_IFBLK | stat.S_IFCHR) and not stat.S_ISFIFO(mode):
            hdr.devmajor, hdr.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)

        additional: list[bytes] | None = None
        inode = (st.st_dev, st.st_ino)
        if _is_linked(st):
            src = self._inode_src.get(inode)
            if src is not None:
                hdr.typeflag, hdr.linkname, hdr.size = tarstream.TYPE_LINK, src, 0
            else:
                if kind == ChangeKind.UNMODIFIED:
                    self._inode_refs.setdefault(inode, []).append(hdr.name)
                    return
                self._inode_src[inode] = hdr.name
                additional = self._inode_refs.pop(inode, None)
        elif kind == ChangeKind.UNMODIFIED:
            return

        hdr.pax = self._xattrs(source)
        self._include_parents(hdr)
        self._tw.write_header(hdr, pax=True)
        if hdr.typeflag == tarstream.TYPE_REG and hdr.size > 0:
            self._copy(source, hdr.size)
        if additional:
            target = hdr.name
            for extra in additional:
                hdr.name, hdr.typeflag, hdr.linkname, hdr.size = extra, tarstream.TYPE_LINK, target, 0
                self._include_parents(hdr)
                self._tw.write_header(hdr, pax=True)

    def _xattrs(self, source: bytes) -> dict[str, bytes]:
        if not self.all_xattrs:
            cap = _lgetxattr(source, CAPABILITY_XATTR)
            return {tarstream.PAX_SCHILY_XATTR + CAPABILITY_XATTR: cap} if cap else {}
        try:
            keys = os.listxattr(source, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.ENODATA):
                return {}
            raise
        out = {}
        for key in sorted(keys):
            if key.startswith("trusted."):
                continue
            value = _lgetxattr(source, key)
            if value is not None:
                out[tarstream.PAX_SCHILY_XATTR + key] = value
        return out

    def _copy(self, source: bytes, size: int) -> None:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = size
            while left:
                data = os.read(fd, min(_COPY_CHUNK, left))
                if not data:
                    raise CdtwistError("short write copying file")
                self._tw.write(data)
                left -= len(data)
        finally:
            os.close(fd)

    def _include_parents(self, hdr: Header) -> None:
        name = hdr.name.rstrip(b"/")
        parent = os.path.dirname(name)
        if name and parent:
            if parent not in self._added_dirs:
                self._added_dirs.add(parent)
                st = os.stat(self.source + b"/" + parent)
                self.handle_change(ChangeKind.MODIFY, b"/" + parent, st)
        if hdr.typeflag == tarstream.TYPE_DIR:
            self._added_dirs.add(name)

    def close(self) -> None:
        self._tw.close()


def write_diff(
    out: _Write,
    lower: str | bytes | None,
    upper: str | bytes,
    *,
    overlay_upper: bool = False,
    whiteout_time_ns: int | None = None,
    all_xattrs: bool = False,
) -> None:
    """containerd's ``archive.WriteDiff``: the uncompressed layer from ``lower`` to ``upper``."""
    cw = ChangeWriter(out, os.fsencode(upper), all_xattrs=all_xattrs)
    if whiteout_time_ns is not None:
        cw.whiteout_time_ns = whiteout_time_ns
    try:
        for ch in changes(lower, upper, overlay_upper=overlay_upper):
            cw.handle_change(ch.kind, ch.path, ch.stat)
    except OSError as e:
        raise CdtwistError(f"failed to create diff tar stream: {e}") from e
    cw.close()


class _Digester:
    """A writer that hashes and counts what passes to ``dest``."""

    def __init__(self, dest: _Write | None) -> None:
        self.dest = dest
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.dest is not None:
            self.dest.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@dataclass(frozen=True, slots=True)
class CompareResult:
    """The layer written: its descriptor fields and the content labels containerd sets."""

    media_type: str
    digest: str
    size: int
    uncompressed_digest: str
    uncompressed_size: int
    labels: dict[str, str]


Compressor = Callable[[_Write, str], object]


def compare(
    lower: str | bytes | None,
    upper: str | bytes,
    out: _Write,
    *,
    media_type: str = "",
    compressor: Compressor | None = None,
    labels: dict[str, str] | None = None,
    overlay_upper: bool = False,
    whiteout_time_ns: int | None = None,
    all_xattrs: bool = False,
) -> CompareResult:
    """The walking differ's ``Compare``, writing the layer to ``out``.

    ``media_type`` defaults to ``tar+gzip``; ``tar`` is written as is; any
    other needs a ``compressor(dest, media_type)`` returning a writer with
    ``write``/``close`` (Go's ``diff.WithCompressor``).  Compressed layers get
    the ``containerd.io/uncompressed`` label.
    """
    if compressor is not None:
        if not media_type:
            raise CdtwistError("media type must be explicitly specified when using custom compressor")
        compressed = True
    else:
        media_type = media_type or MEDIA_TYPE_IMAGE_LAYER_GZIP
        if media_type == MEDIA_TYPE_IMAGE_LAYER:
            compressed = False
        elif media_type == MEDIA_TYPE_IMAGE_LAYER_GZIP:
            compressed = True
        else:
            raise NotImplemented_(f"unsupported diff media type: {media_type}")

    outer = _Digester(out)
    labels = dict(labels or {})
    opts = {"overlay_upper": overlay_upper, "whiteout_time_ns": whiteout_time_ns, "all_xattrs": all_xattrs}
    if compressed:
        writer = compressor(outer, media_type) if compressor else compress_stream(outer, Compression.GZIP)
        inner = _Digester(writer)  # type: ignore[arg-type]
        try:
            write_diff(inner, lower, upper, **opts)  # type: ignore[arg-type]
        except CdtwistError as e:
            raise CdtwistError(f"failed to write compressed diff: {e}") from e
        finally:
            writer.close()  # type: ignore[attr-defined]
        labels[UNCOMPRESSED_LABEL] = inner.digest
        return CompareResult(media_type, outer.digest, outer.size, inner.digest, inner.size, labels)
    try:
        write_diff(outer, lower, upper, **opts)  # type: ignore[arg-type]
    except CdtwistError as e:
        raise CdtwistError(f"failed to write diff: {e}") from e
    return CompareResult(media_type, outer.digest, outer.size, outer.digest, outer.size, labels)
