# -*- test-case-name: tests.test_diff_apply -*-
"""Apply an OCI layer tar onto a directory, as containerd's ``archive.Apply``.

Two modes, as containerd's walking applier picks them:

* native (``overlay=False``): a whiteout ``.wh.<name>`` deletes ``<name>``, an
  opaque marker ``.wh..wh..opq`` clears what the directory held before this
  layer;
* overlay (``overlay=True``, ``root`` is the snapshot's upperdir): whiteouts
  become 0/0 character devices and opaque directories get
  ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` with ``userxattr``),
  and missing parent directories copy their attributes from ``parents`` (the
  lowerdirs), as ``archive.WithParents`` does.

Containment is Go's (``fs.RootPath``): names, symlinks and hard-link targets
are resolved as if ``root`` were ``/`` — ``..`` stops at root, absolute link
targets restart at root — so a hostile layer is redirected inside, not
rejected.  Unlike Go, which resolves to a path string and then calls path
based syscalls, every directory on the way is opened with ``O_NOFOLLOW``
relative to its verified parent and every entry is made with ``*at`` calls
on that descriptor, so no symlink (even one swapped in concurrently) can
carry a write outside ``root``.

Everything here blocks; run it in a thread.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from cdtwist.diff import tarstream
from cdtwist.diff.tarstream import HashingInput, Header, TarReader
from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger

_log = get_logger(__name__)

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
WHITEOUT_OPAQUE_DIR = WHITEOUT_META_PREFIX + b".opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_USER_OPAQUE_XATTR = "user.overlay.opaque"

_MAX_LINKS = 255
_MAX_TIME_NS = (1 << 63) - 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 128

Filter = Callable[[Header], bool]


class InvalidArchive(CdtwistError):
    """Go's ``errInvalidArchive`` (a plain error: gRPC UNKNOWN)."""

    text = "invalid archive"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What containerd's applier reports: the uncompressed stream's digest and length."""

    digest: str
    size: int
    # Sum of the members' sizes (what Go's archive.Apply returns).
    content_size: int = 0


def running_in_userns() -> bool:
    """True inside a user namespace (containerd's ``userns.RunningInUserNS``)."""
    try:
        with open("/proc/self/uid_map") as f:
            line = f.readline().split()
    except OSError:
        return False
    return not (len(line) == 3 and line == ["0", "0", "4294967295"])


def _join(a: bytes, b: bytes) -> bytes:
    return a + b"/" + b if a else b


def _clean(name: bytes) -> bytes:
    """Go's ``filepath.Clean`` (``""`` is ``"."``)."""
    return posixpath.normpath(name) if name else b"."


class _Resolver:
    """Directories under a root, resolved as ``fs.RootPath`` does and held open.

    Descriptors are cached by canonical path (symlink-free, relative to the
    root); a removal drops the entries at and below what it removed.
    """

    def __init__(self, root: str | bytes, mkdir_hook: Callable[[int, bytes, bytes], None] | None = None) -> None:
        self.root = os.fsencode(root)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: dict[bytes, int] = {b"": self.fd}
        self._mkdir_hook = mkdir_hook

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def trim(self) -> None:
        """Bound the open descriptors; only between entries, as resolved fds are borrowed."""
        if len(self._cache) > _FD_CACHE:
            for key in list(self._cache)[1 : len(self._cache) - _FD_CACHE // 2]:
                os.close(self._cache.pop(key))

    def invalidate(self, canon: bytes, children_only: bool = False) -> None:
        prefix = canon + b"/" if canon else b""
        for key in [k for k in self._cache if k.startswith(prefix) or (k == canon and not children_only)]:
            if key:
                os.close(self._cache.pop(key))

    def resolve(self, path: bytes, create: bool = False) -> tuple[int, bytes]:
        """The directory ``path`` names inside the root: (borrowed fd, canonical path).

        Missing components raise :class:`FileNotFoundError`, or are made
        (0755, Go's ``mkparent``) when ``create``; a non-directory on the way
        raises :class:`NotADirectoryError`.
        """
        todo = [c for c in path.split(b"/") if c and c != b"."]
        todo.reverse()
        names: list[bytes] = []
        fd = self.fd
        links = 0
        while todo:
            comp = todo.pop()
            if comp == b"..":
                if names:
                    names.pop()
                    fd = self._open_canon(names)
                continue
            canon = b"/".join(names + [comp])
            cached = self._cache.get(canon)
            if cached is not None:
                names.append(comp)
                fd = cached
                continue
            try:
                st = os.lstat(comp, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                self._mkdir(fd, comp, canon)
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise CdtwistError("too many links")
                target = os.readlink(comp, dir_fd=fd)
                base = b"/" if target.startswith(b"/") else b"/" + b"/".join(names)
                new = [c for c in posixpath.normpath(base + b"/" + target).split(b"/") if c and c != b"."]
                # Re-walk from the deepest common prefix with what we have.
                common = 0
                while common < len(names) and common < len(new) and names[common] == new[common]:
                    common += 1
                names = names[:common]
                fd = self._open_canon(names)
                todo.extend(reversed(new[common:]))
                continue
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fsdecode(canon))
            fd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            self._cache[canon] = fd
            names.append(comp)
        return fd, b"/".join(names)

    def _open_canon(self, names: list[bytes]) -> int:
        cached = self._cache.get(b"/".join(names))
        if cached is not None:
            return cached
        fd = self.fd
        for i in range(len(names)):
            canon = b"/".join(names[: i + 1])
            cached = self._cache.get(canon)
            if cached is None:
                cached = os.open(names[i], _DIR_FLAGS, dir_fd=fd)
                self._cache[canon] = cached
            fd = cached
        return fd

    def _mkdir(self, fd: int, comp: bytes, canon: bytes) -> None:
        try:
            os.mkdir(comp, 0o755, dir_fd=fd)
        except FileExistsError:
            return
        os.chmod(comp, 0o755, dir_fd=fd)
        if self._mkdir_hook is not None:
            self._mkdir_hook(fd, comp, canon)


def _proc_path(fd: int, name: bytes | None = None) -> bytes:
    p = b"/proc/self/fd/%d" % fd
    return p + b"/" + name if name is not None else p


def _lstat(fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


def _remove_all(fd: int, name: bytes) -> None:
    """``os.RemoveAll`` of one entry of a directory, never following symlinks."""
    st = _lstat(fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(os.fsdecode(name), dir_fd=fd)
    else:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass


def _bound_time(ns: int) -> int:
    return 0 if ns < 0 or ns > _MAX_TIME_NS else ns


def _times(hdr: Header) -> tuple[int, int]:
    atime = hdr.atime_ns if hdr.atime_ns is not None and hdr.atime_ns > hdr.mtime_ns else hdr.mtime_ns
    return _bound_time(atime), _bound_time(hdr.mtime_ns)


def _copy_dir_info(src_fd: int, dst_fd: int, name: bytes) -> None:
    """Go's ``copyDirInfo`` + ``copyUpXAttrs``: a new upper dir takes its lower's attributes."""
    st = os.fstat(src_fd)
    try:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
    except PermissionError:
        cur = os.lstat(name, dir_fd=dst_fd)
        if (cur.st_uid, cur.st_gid) != (st.st_uid, st.st_gid):
            raise
    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)
    try:
        keys = os.listxattr(src_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise
    target = _proc_path(dst_fd, name)
    for key in keys:
        if key.startswith("trusted."):
            continue
        try:
            value = os.getxattr(src_fd, key)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.ENODATA):
                continue
            raise
        try:
            os.setxattr(target, key, value, os.XATTR_CREATE, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                raise


class _Applier:
    def __init__(
        self,
        root: str,
        overlay: bool,
        userxattr: bool,
        parents: Sequence[str],
        filter: Filter | None,
        skip_devices: bool,
    ) -> None:
        self.overlay = overlay
        self.opaque_xattr = OVERLAY_USER_OPAQUE_XATTR if userxattr else OVERLAY_OPAQUE_XATTR
        self.filter = filter
        self.skip_devices = skip_devices
        self.parents = [_Resolver(p) for p in parents]
        self.root = _Resolver(root, self._copy_parent_info if self.parents else None)
        self.unpacked: set[bytes] = set()
        self.dirs: list[Header] = []
        self.content_size = 0

    def close(self) -> None:
        self.root.close()
        for p in self.parents:
            p.close()

    def _copy_parent_info(self, fd: int, name: bytes, canon: bytes) -> None:
        for parent in self.parents:
            try:
                src_fd, _ = parent.resolve(canon)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                break  # replaced: do not copy attributes
            _copy_dir_info(src_fd, fd, name)
            return
        _log.debug("parent directory {path!r} not found: default permissions(0755) used", path=canon)

    # -- the member loop (Go's applyNaive) --

    def run(self, reader: TarReader) -> None:
        while (hdr := reader.next()) is not None:
            self.root.trim()
            try:
                self._entry(reader, hdr)
            except OSError as e:
                raise CdtwistError(f"{os.fsdecode(hdr.name)}: {_errno_text(e)}") from e
        for hdr in self.dirs:
            try:
                fd, _ = self.root.resolve(hdr.name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed or replaced later in the layer
            os.utime(fd, ns=_times(hdr))

    def _entry(self, reader: TarReader, hdr: Header) -> None:
        self.content_size += hdr.size
        if hdr.typeflag == tarstream.TYPE_XGLOBAL:
            _log.debug("PAX Global Extended Headers found and ignored")
            return
        hdr.name = _clean(hdr.name)
        if self.filter is not None and not self.filter(hdr):
            return
        if self.skip_devices and hdr.typeflag in (tarstream.TYPE_CHAR, tarstream.TYPE_BLOCK):
            _log.warn("file {name!r} ignored: archive may not be supported on system", name=hdr.name)
            return
        ppath, _, base = hdr.name.rpartition(b"/")
        if hdr.name.startswith(b"/") and not ppath:
            ppath = b"/"
        if base in (b"", b".", b".."):
            _log.debug("file {name!r} ignored: resolved to root", name=hdr.name)
            return
        try:
            pfd, pcanon = self.root.resolve(ppath, create=True)
        except NotADirectoryError as e:
            raise CdtwistError(f"mkparent {os.fsdecode(ppath)}: not a directory") from e
        except CdtwistError as e:
            raise CdtwistError(f"failed to get root path: {e}") from e
        self._validate_whiteout(base)
        try:
            write = self._convert_whiteout(hdr, pfd, pcanon, base)
        except OSError as e:
            raise CdtwistError(f"failed to convert whiteout file {os.fsdecode(hdr.name)!r}: {e.strerror or e}") from e
        if not write:
            return
        canon = _join(pcanon, base)
        st = _lstat(pfd, base)
        if st is not None and not (stat.S_ISDIR(st.st_mode) and hdr.typeflag == tarstream.TYPE_DIR):
            _remove_all(pfd, base)
            self.root.invalidate(canon)
        self._create(reader, hdr, pfd, base)
        if hdr.typeflag == tarstream.TYPE_DIR:
            self.dirs.append(hdr)
        self.unpacked.add(canon)

    @staticmethod
    def _validate_whiteout(base: bytes) -> None:
        if base != WHITEOUT_OPAQUE_DIR and base.startswith(WHITEOUT_PREFIX):
            original = base[len(WHITEOUT_PREFIX) :]
            if original in (b"", b".", b".."):
                raise InvalidArchive(f"invalid whiteout name: {os.fsdecode(base)}")

    def _convert_whiteout(self, hdr: Header, pfd: int, pcanon: bytes, base: bytes) -> bool:
        if base == WHITEOUT_OPAQUE_DIR:
            if self.overlay:
                os.setxattr(pfd, self.opaque_xattr, b"y")
            else:
                self._clear_opaque(pfd, pcanon)
            return False
        if not base.startswith(WHITEOUT_PREFIX):
            return True
        original = base[len(WHITEOUT_PREFIX) :]
        if self.overlay:
            os.mknod(original, stat.S_IFCHR, 0, dir_fd=pfd)
            os.chown(original, hdr.uid, hdr.gid, dir_fd=pfd, follow_symlinks=False)
        else:
            _remove_all(pfd, original)
            self.root.invalidate(_join(pcanon, original))
        return False

    def _clear_opaque(self, dfd: int, canon: bytes) -> None:
        """Remove what this layer did not unpack below an opaque directory (iteratively: no depth limit)."""
        stack: list[tuple[int, bytes, bool]] = [(dfd, canon, False)]
        try:
            while stack:
                fd, dcanon, owned = stack.pop()
                try:
                    scan_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        with os.scandir(scan_fd) as it:
                            entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
                    finally:
                        os.close(scan_fd)
                    for name, is_dir in entries:
                        child = _join(dcanon, name)
                        if child not in self.unpacked:
                            _remove_all(fd, name)
                            self.root.invalidate(child)
                        elif is_dir:
                            stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), child, True))
                finally:
                    if owned:
                        os.close(fd)
        finally:
            for fd, _, owned in stack:
                if owned:
                    os.close(fd)

    # -- one member (Go's createTarFile) --

    def _create(self, reader: TarReader, hdr: Header, pfd: int, base: bytes) -> None:
        t = hdr.typeflag
        mode = hdr.mode & 0o7777
        if t == tarstream.TYPE_DIR:
            st = _lstat(pfd, base)
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(base, mode & 0o777, dir_fd=pfd)
        elif t in (tarstream.TYPE_REG, tarstream.TYPE_GNU_SPARSE, tarstream.TYPE_CONT):
            self._write_file(reader, hdr, pfd, base, mode)
        elif t in (tarstream.TYPE_CHAR, tarstream.TYPE_BLOCK, tarstream.TYPE_FIFO):
            kind = {tarstream.TYPE_CHAR: stat.S_IFCHR, tarstream.TYPE_BLOCK: stat.S_IFBLK}.get(t, stat.S_IFIFO)
            os.mknod(base, mode | kind, os.makedev(hdr.devmajor & 0xFFFFFFFF, hdr.devminor & 0xFFFFFFFF), dir_fd=pfd)
        elif t == tarstream.TYPE_LINK:
            self._hardlink(hdr, pfd, base)
        elif t == tarstream.TYPE_SYMLINK:
            os.symlink(hdr.linkname, base, dir_fd=pfd)
        else:
            raise CdtwistError(f"unhandled tar header type {t}")

        try:
            os.chown(base, hdr.uid, hdr.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            msg = f"failed to Lchown {os.fsdecode(_proc_path(pfd, base))!r} for UID {hdr.uid}, GID {hdr.gid}: {e}"
            if e.errno == errno.EINVAL and running_in_userns():
                msg += " (Hint: try increasing the number of subordinate IDs in /etc/subuid and /etc/subgid)"
            raise CdtwistError(msg) from e

        st = None
        for key, value in hdr.xattrs.items():
            if key.startswith("trusted."):
                _log.warn("ignored xattr {key} in archive: admin attributes from archive not supported", key=key)
                continue
            try:
                os.setxattr(_proc_path(pfd, base), key, value, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.EPERM and key.startswith("user."):
                    st = st or os.lstat(base, dir_fd=pfd)
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        _log.warn("ignored xattr {key} in archive", key=key)
                        continue
                if e.errno == errno.ENOTSUP:
                    _log.warn("ignored xattr {key} in archive", key=key)
                    continue
                raise CdtwistError(f"failed to setxattr {os.fsdecode(hdr.name)!r} for key {key!r}: {e}") from e

        # chmod after chown, which may clear set-id bits; symlinks keep theirs.
        if t != tarstream.TYPE_SYMLINK:
            st = os.lstat(base, dir_fd=pfd) if t == tarstream.TYPE_LINK else None
            if st is None or not stat.S_ISLNK(st.st_mode):
                os.chmod(base, mode, dir_fd=pfd)
        try:
            os.utime(base, ns=_times(hdr), dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            raise CdtwistError(f"failed call to UtimesNanoAt for {os.fsdecode(hdr.name)}: {e}") from e

    def _write_file(self, reader: TarReader, hdr: Header, pfd: int, base: bytes, mode: int) -> None:
        fd = os.open(
            base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777, dir_fd=pfd
        )
        try:
            if hdr.sparse is None:
                write = os.write
                for _, mv in reader.data():
                    while mv:
                        mv = mv[write(fd, mv) :]
            else:
                for off, mv in reader.data():
                    while mv:
                        n = os.pwrite(fd, mv, off)
                        mv, off = mv[n:], off + n
                os.ftruncate(fd, hdr.size)
        finally:
            os.close(fd)

    def _hardlink(self, hdr: Header, pfd: int, base: bytes) -> None:
        """Link to ``linkname`` resolved inside root; a final symlink is linked, not followed."""
        lpath, _, lbase = hdr.linkname.rpartition(b"/")
        if hdr.linkname.startswith(b"/") and not lpath:
            lpath = b"/"
        try:
            try:
                src_fd, _ = self.root.resolve(lpath)
            except CdtwistError as e:
                raise CdtwistError(f"failed to get root path: {e}") from e
            if lbase in (b"", b".", b".."):
                raise PermissionError(errno.EPERM, "link to a directory", os.fsdecode(hdr.linkname))
            os.link(lbase, base, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            # Go resolves the target's path (missing parts simply joined), then
            # os.Link fails with a *LinkError: "link <old> <new>: <errno text>".
            root = os.fsdecode(self.root.root).rstrip("/")
            old_path = _root_path_text(root, os.fsdecode(hdr.linkname))
            new_path = posixpath.join(root, os.fsdecode(hdr.name).lstrip("/"))
            raise CdtwistError(f"link {old_path} {new_path}: {_errno_text(e)}") from e


def apply_layer(
    root: str,
    stream: BinaryIO | HashingInput,
    *,
    overlay: bool = False,
    userxattr: bool = False,
    parents: Sequence[str] = (),
    filter: Filter | None = None,
    skip_devices: bool | None = None,
) -> ApplyResult:
    """Apply the uncompressed layer read from ``stream`` onto ``root``.

    ``stream`` is read incrementally to its very end (trailing bytes after the
    archive count, as containerd's applier reads them); the result carries the
    sha256 digest and length of everything read — the layer's diff id.
    ``skip_devices`` defaults to :func:`running_in_userns` (device nodes
    cannot be made there).  Errors leave a partially applied ``root``, never
    anything outside it.
    """
    inp = stream if isinstance(stream, HashingInput) else HashingInput(stream)
    if skip_devices is None:
        skip_devices = running_in_userns()
    try:
        applier = _Applier(os.path.normpath(root), overlay, userxattr, parents, filter, skip_devices)
        try:
            applier.run(TarReader(inp))
        finally:
            applier.close()
        inp.drain()
        return ApplyResult(digest=inp.digest, size=inp.count, content_size=applier.content_size)
    finally:
        inp.close()


# -- from mounts to an apply plan (diff/apply/apply_linux.go) --


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    """Where and how to apply for a snapshot's mounts.

    ``root`` is None when the mounts must be mounted first (then apply in
    native mode onto the mount point).
    """

    root: str | None
    overlay: bool = False
    userxattr: bool = False
    parents: tuple[str, ...] = field(default_factory=tuple)


def overlay_paths(options: Iterable[str]) -> tuple[str, list[str]]:
    """``upperdir`` and ``lowerdir`` entries of overlay mount options (Go's getOverlayPath)."""
    upper, lower = "", []
    for o in options:
        if o.startswith("upperdir="):
            upper = o[len("upperdir=") :]
        elif o.startswith("lowerdir="):
            lower = o[len("lowerdir=") :].split(":")
    if not upper:
        from cdtwist.errors import InvalidArgument

        raise InvalidArgument("upperdir not found")
    return upper, lower


def plan_apply(mounts: Sequence[object]) -> ApplyPlan:
    """containerd's choice for ``apply(ctx, mounts, r)``.

    A single overlay mount with an upperdir is applied straight onto the
    upperdir with overlay whiteouts (not in a user namespace, where 0/0
    devices cannot be made); anything else is mounted and applied natively.
    Mount objects need ``type`` and ``options`` attributes.
    """
    if len(mounts) == 1 and getattr(mounts[0], "type", "") == "overlay" and not running_in_userns():
        options = list(getattr(mounts[0], "options", []))
        try:
            upper, lower = overlay_paths(options)
        except CdtwistError:
            return ApplyPlan(root=None)
        return ApplyPlan(root=upper, overlay=True, userxattr="userxattr" in options, parents=tuple(lower))
    return ApplyPlan(root=None)


def _errno_text(err: OSError) -> str:
    """Go prints errno texts in lower case ("no such file or directory")."""
    text = os.strerror(err.errno) if err.errno is not None else str(err)
    return text[:1].lower() + text[1:]


def _root_path_text(root: str, path: str) -> str:
    """``fs.RootPath`` as text, for error messages only (symlinks followed inside root).

    The link itself is made through the descriptor-based resolver; this only
    reproduces the path Go would print.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved = ""
    followed = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = posixpath.dirname(resolved)
            continue
        candidate = posixpath.join(resolved, part)
        full = posixpath.join(root, candidate)
        try:
            is_link = os.path.islink(full)
        except OSError:
            is_link = False
        if not is_link or followed >= 255:
            resolved = candidate
            continue
        followed += 1
        target = os.readlink(full)
        if target.startswith("/"):
            resolved = ""
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return posixpath.join(root, resolved)
