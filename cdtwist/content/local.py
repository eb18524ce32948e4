# -*- test-case-name: tests.test_content_local -*-
"""containerd's local content store (``content/local``): blobs on disk, keyed by digest.

The layout is containerd's, so an existing containerd root can be read and
tools that poke at it keep working::

    <root>/blobs/sha256/<hex>              committed, read-only (0444) blobs
    <root>/ingest/<sha256(ref) hex>/ref        the writer's ref, verbatim
                                    /data       bytes received so far
                                    /startedat  RFC 3339 (nanoseconds) timestamps,
                                    /updatedat  written as Go's time.MarshalText does
                                    /total      expected size, decimal (only if known)

Everything here is blocking file I/O meant to run in a thread pool, and the
store may be used from many threads at once.  A blob only ever appears under
``blobs/`` by an atomic rename of a fully written and fsynced ingest file, so
a crash (even ``kill -9``) leaves either no blob or a complete one, and an
interrupted ingest is resumed from what actually reached the data file (its
digest state is recomputed by reading it back, as Go does).

Error texts and classes are containerd's; the few places where Go's
behaviour is clearly accidental are noted where they are handled.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import random
import re
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from twisted.logger import Logger

from cdtwist.errors import (
    AlreadyExists,
    CdtwistError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cdtwist.filters import FieldsAdaptor, parse_all

__all__ = [
    "CANONICAL",
    "Info",
    "LabelStore",
    "LocalStore",
    "ReaderAt",
    "Status",
    "Writer",
    "digest_from_bytes",
    "validate_digest",
]

_log = Logger()

#: The algorithm every blob is written with (go-digest's ``Canonical``).
CANONICAL = "sha256"

#: Algorithms accepted in digests, with their hash size in bytes.  containerd
#: also accepts sha384/sha512 where it only *reads*, but it never writes them.
_ALGORITHMS = {"sha256": 32}

_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX_RE = re.compile(r"[a-f0-9]+")

#: Read size for hashing and streaming (Go's bufPool uses 1 MiB buffers too).
_CHUNK = 1 << 20
#: Small writes are gathered up to this size before reaching the file ...
_COALESCE_LIMIT = 1 << 20
#: ... and writes at least this large go straight to the file.
_DIRECT_WRITE = 128 << 10

#: Writer() tries this many times to take a busy ref, sleeping rand(2**n) ms
#: between tries, like containerd.
DEFAULT_LOCK_RETRIES = 10


# ---------------------------------------------------------------------------
# Public records


@dataclass
class Info:
    """A committed blob (``content.Info``); times are nanoseconds since the epoch.

    ``created_at`` is the blob's mtime (the commit time) and ``updated_at``
    its atime, which :meth:`LocalStore.update` sets, as in containerd.
    """

    digest: str
    size: int = 0
    created_at: int = 0
    updated_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Status:
    """Progress of one ingest (``content.Status``); times in nanoseconds since the epoch.

    ``expected`` stays empty: containerd's local store does not record it
    either (the metadata store above does).
    """

    ref: str
    offset: int = 0
    total: int = 0
    expected: str = ""
    started_at: int = 0
    updated_at: int = 0


class LabelStore(Protocol):
    """Mutable labels for digests, for a store used without the metadata database."""

    def get(self, digest: str) -> dict[str, str] | None:
        """All labels of ``digest``."""
        ...

    def set(self, digest: str, labels: dict[str, str]) -> None:
        """Replace all labels of ``digest``."""
        ...

    def update(self, digest: str, labels: dict[str, str]) -> dict[str, str]:
        """Merge ``labels`` (an empty value deletes a key); return the result."""
        ...


# ---------------------------------------------------------------------------
# Digests (go-digest)


def validate_digest(digest: str) -> None:
    """go-digest's ``Digest.Validate``, with its error texts.

    :raises ValueError: ``invalid checksum digest format``, ``invalid checksum
        digest length`` or ``unsupported digest algorithm``.
    """
    i = digest.find(":")
    if i <= 0 or i + 1 == len(digest):
        raise ValueError("invalid checksum digest format")
    algorithm, encoded = digest[:i], digest[i + 1 :]
    size = _ALGORITHMS.get(algorithm)
    if size is None:
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError("invalid checksum digest format")
        raise ValueError("unsupported digest algorithm")
    if len(encoded) != size * 2:
        raise ValueError("invalid checksum digest length")
    if not _HEX_RE.fullmatch(encoded):
        raise ValueError("invalid checksum digest format")


def digest_from_bytes(data: bytes) -> str:
    """The canonical digest of ``data`` (``digest.FromBytes``)."""
    return f"{CANONICAL}:{hashlib.sha256(data).hexdigest()}"


# ---------------------------------------------------------------------------
# Go formatting: timestamps in the ingest files and the lock error text

_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def _ymd_hms(lt: time.struct_time, sep: str) -> str:
    # strftime's %Y does not pad years below 1000 (Go's zero time is year 1).
    return f"{lt.tm_year:04d}-{lt.tm_mon:02d}-{lt.tm_mday:02d}{sep}{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}"


def format_timestamp(ns: int) -> str:
    """``time.Time.MarshalText`` of a local time: RFC 3339 with trimmed nanoseconds."""
    secs, frac = divmod(ns, 1_000_000_000)
    lt = time.localtime(secs)
    text = _ymd_hms(lt, "T")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    off = lt.tm_gmtoff or 0
    if off == 0:
        return text + "Z"
    sign = "+" if off > 0 else "-"
    hours, minutes = divmod(abs(off) // 60, 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def parse_timestamp(text: str) -> int:
    """``time.Time.UnmarshalText`` (RFC 3339) to nanoseconds since the epoch.

    :raises ValueError: when ``text`` is not an RFC 3339 timestamp.
    """
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"parsing time {text!r} as RFC 3339: cannot parse")
    year, month, day, hour, minute, sec = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 4, month)[1]):
        raise ValueError(f"parsing time {text!r}: day out of range")
    if hour > 23 or minute > 59 or sec > 59:
        raise ValueError(f"parsing time {text!r}: out of range")
    frac = int((m.group(7) or "0")[:9].ljust(9, "0"))
    offset = 0
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        if m.group(9) == "-":
            offset = -offset
    secs = calendar.timegm((year, month, day, hour, minute, sec, 0, 0, 0)) - offset
    return secs * 1_000_000_000 + frac


_MONOTONIC_BASE = time.monotonic_ns()


def go_duration(ns: int) -> str:
    """``time.Duration.String``: ``1.5ms``, ``2m3.25s``, ``0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000_000_000:
        if u < 1000:
            return f"{sign}{u}ns"
        prec, unit = (3, "µs") if u < 1_000_000 else (6, "ms")
        whole, frac = divmod(u, 10**prec)
        text = str(whole) + ("." + f"{frac:0{prec}d}".rstrip("0") if frac else "")
        return f"{sign}{text}{unit}"
    secs, frac = divmod(u, 1_000_000_000)
    text = f"{secs % 60}" + ("." + f"{frac:09d}".rstrip("0") if frac else "") + "s"
    if secs >= 60:
        text = f"{secs // 60 % 60}m{text}"
    if secs >= 3600:
        text = f"{secs // 3600}h{text}"
    return sign + text


def go_time_string(ns: int, monotonic_ns: int | None = None) -> str:
    """``time.Time.String`` of a local ``time.Now()``, monotonic reading included."""
    secs, frac = divmod(ns, 1_000_000_000)
    lt = time.localtime(secs)
    text = _ymd_hms(lt, " ")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    hours, minutes = divmod(abs(off) // 60, 60)
    text += f" {sign}{hours:02d}{minutes:02d} {lt.tm_zone}"
    if monotonic_ns is not None:
        m = monotonic_ns - _MONOTONIC_BASE
        msign = "+" if m >= 0 else "-"
        msecs, mfrac = divmod(abs(m), 1_000_000_000)
        text += f" m={msign}{msecs}.{mfrac:09d}"
    return text


def _os_error(op: str, path: str, exc: OSError) -> CdtwistError:
    """An unclassified error worded like Go's ``*PathError`` (gRPC UNKNOWN, as in Go)."""
    reason = (exc.strerror or str(exc)).lower()
    return CdtwistError(f"{op} {path}: {reason}")


# ---------------------------------------------------------------------------
# Ref locks (locks.go)


@dataclass
class _RefLock:
    ref: str
    since_ns: int
    since_mono: int
    token: object


#: In-process locks on ingests, keyed by (store root, ingest directory name).
#: containerd keys them by ref alone; the root is added so two stores in one
#: process (tests) do not see each other's writers.
_locks: dict[tuple[str, str], _RefLock] = {}
# Reentrant: a writer's finalizer may run (and unlock) in the middle of _try_lock.
_locks_mu = threading.RLock()


def _try_lock(key: tuple[str, str], ref: str) -> object:
    """Take the lock for ``key`` and return its token, or raise Unavailable."""
    with _locks_mu:
        held = _locks.get(key)
        if held is not None:
            age = time.monotonic_ns() - held.since_mono
            raise Unavailable(
                f"ref {held.ref} locked for {go_duration(age)} (since {go_time_string(held.since_ns, held.since_mono)})"
            )
        token = object()
        _locks[key] = _RefLock(ref, time.time_ns(), time.monotonic_ns(), token)
        return token


def _unlock(key: tuple[str, str], token: object) -> None:
    """Release ``key`` only if ``token`` still holds it.

    Go unlocks by ref, so committing a stale, already closed writer frees the
    lock of whichever writer holds the ref now; the token prevents that.
    """
    with _locks_mu:
        held = _locks.get(key)
        if held is not None and held.token is token:
            del _locks[key]


def _is_locked(key: tuple[str, str]) -> bool:
    with _locks_mu:
        return key in _locks


# ---------------------------------------------------------------------------
# Small file helpers


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def _write_to_completion(path: str, data: bytes, mode: int = 0o666) -> None:
    """Go's ``writeToCompletion``: an O_SYNC temp file renamed over ``path``."""
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_SYNC | os.O_CLOEXEC, mode)
    except OSError as e:
        raise CdtwistError(f"create tmp file: {_os_error('open', tmp, e)}") from e
    try:
        _write_all(fd, data, 0)
    except OSError as e:
        raise CdtwistError(f"write tmp file: {_os_error('write', tmp, e)}") from e
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError as e:
        raise CdtwistError(f"rename tmp file: {_os_error('rename', tmp, e)}") from e


def _write_timestamp(path: str, ns: int) -> None:
    _write_to_completion(path, format_timestamp(ns).encode())


def _read_timestamp(path: str) -> int:
    try:
        text = _read_text(path)
    except FileNotFoundError as e:
        raise NotFound(f"open {path}: no such file or directory") from e
    try:
        return parse_timestamp(text)
    except ValueError as e:
        raise CdtwistError(f"could not parse timestamp file {path}: {e}") from e


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str, mode: int = 0o755) -> None:
    """``MkdirAll``, fsyncing each parent that gained an entry so a rename into it survives power loss."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs_durable(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    _fsync_dir(parent)


def _hash_file(path: str, hasher: hashlib._Hash) -> int:
    """Feed ``path`` to ``hasher`` in chunks; return the number of bytes read."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            hasher.update(view[:n])
            total += n


# ---------------------------------------------------------------------------
# Reading (readerat.go)


class ReaderAt:
    """A committed blob opened for reading; positional reads, safe across threads."""

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = fd

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer only at the end of the blob."""
        fd = self._fd
        if fd is None:
            raise CdtwistError(f"read {self.path}: file already closed")
        if offset < 0:
            raise CdtwistError(f"readat {self.path}: negative offset")
        parts: list[bytes] = []
        while n > 0:
            chunk = os.pread(fd, n, offset)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_chunks(self, offset: int = 0, size: int = -1, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Stream ``size`` bytes (all, if negative) from ``offset`` without holding them in memory."""
        end = self.size if size < 0 else min(self.size, offset + size)
        while offset < end:
            chunk = self.read_at(offset, min(chunk_size, end - offset))
            if not chunk:
                return
            yield chunk
            offset += len(chunk)

    def read_all(self) -> bytes:
        """The whole blob (``content.ReadBlob``); avoid for large layers."""
        return self.read_at(0, self.size)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> ReaderAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------
# The store (store.go)


class LocalStore:
    """A content store rooted at ``root`` (containerd's ``local.NewLabeledStore``).

    :param label_store: where labels live when no metadata database wraps
        this store; without one labels are empty and :meth:`update` fails.
    :param lock_retries: attempts :meth:`writer` makes on a busy ref.
    """

    def __init__(
        self,
        root: str,
        label_store: LabelStore | None = None,
        *,
        lock_retries: int = DEFAULT_LOCK_RETRIES,
    ) -> None:
        self.root = os.path.abspath(root)
        self.label_store = label_store
        self.lock_retries = lock_retries
        self._lock_root = os.path.realpath(root)
        os.makedirs(os.path.join(self.root, "ingest"), 0o777, exist_ok=True)

    # -- paths

    def blob_path(self, digest: str) -> str:
        """Where ``digest`` lives; :class:`InvalidArgument` for a bad digest."""
        try:
            validate_digest(digest)
        except ValueError as e:
            raise InvalidArgument(f"cannot calculate blob path from invalid digest: {e}") from None
        algorithm, encoded = digest.split(":", 1)
        return os.path.join(self.root, "blobs", algorithm, encoded)

    def _blob_path(self, digest: str, what: str) -> str:
        try:
            return self.blob_path(digest)
        except InvalidArgument as e:
            raise InvalidArgument(f"{what}: {e.context}") from None

    def ingest_root(self, ref: str) -> str:
        """The ingest directory of ``ref``: named by the ref's sha256 to keep paths short."""
        return os.path.join(self.root, "ingest", _ingest_key(ref))

    def _lock_key(self, ingest_name: str) -> tuple[str, str]:
        return (self._lock_root, ingest_name)

    # -- blobs

    def info(self, digest: str) -> Info:
        """Size, times and labels of a committed blob."""
        p = self._blob_path(digest, "calculating blob info path")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None
        return self._info(digest, st, self._labels(digest))

    def _labels(self, digest: str) -> dict[str, str]:
        if self.label_store is None:
            return {}
        return dict(self.label_store.get(digest) or {})

    @staticmethod
    def _info(digest: str, st: os.stat_result, labels: dict[str, str]) -> Info:
        return Info(digest, st.st_size, st.st_mtime_ns, st.st_atime_ns, labels)

    def reader(self, digest: str) -> ReaderAt:
        """Open a blob for reading (``ReaderAt``)."""
        p = self._blob_path(digest, "calculating blob path for ReaderAt")
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} expected at {p}: blob not found") from None
        except OSError as e:
            raise CdtwistError(f"blob {digest} expected at {p}: {_os_error('open', p, e)}") from e
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return ReaderAt(p, fd, size)

    def delete(self, digest: str) -> None:
        """Remove a blob.

        Go calls ``os.RemoveAll``, which never reports a missing path, so its
        not-found branch is dead code; here a missing blob is NotFound.
        """
        p = self._blob_path(digest, "calculating blob path for delete")
        try:
            os.unlink(p)
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None
        except IsADirectoryError:
            shutil.rmtree(p)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change a blob's labels (the only mutable field); needs a label store."""
        if self.label_store is None:
            raise FailedPrecondition("update not supported on immutable content store")
        p = self._blob_path(info.digest, "calculating blob path for update")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise NotFound(f"content {info.digest}") from None

        replace_all = False
        labels: dict[str, str] | None = None
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    if labels is None:
                        labels = {}
                    key = path[len("labels.") :]
                    labels[key] = info.labels.get(key, "")
                    continue
                if path == "labels":
                    replace_all = True
                    labels = dict(info.labels)
                else:
                    raise InvalidArgument(f'cannot update "{path}" field on content info "{info.digest}"')
        else:
            replace_all = True
            labels = dict(info.labels)

        assert labels is not None
        if replace_all:
            self.label_store.set(info.digest, labels)
        else:
            labels = dict(self.label_store.update(info.digest, labels))

        result = self._info(info.digest, st, labels)
        result.updated_at = time.time_ns()
        try:
            os.utime(p, ns=(result.updated_at, result.created_at))
        except OSError as e:
            _log.warn("could not change access time for {digest}: {error}", digest=info.digest, error=e)
        return result

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        """Call ``fn`` for each blob matching ``filters`` (fields ``digest``, ``labels.<key>``).

        Blobs are visited in lexical order like ``filepath.Walk``; ``fn``
        stops the walk by raising.  Entries whose names are not valid digests
        are logged and skipped (Go logs them and still reports them), and a
        store with no ``blobs`` directory yet is empty (Go fails to lstat it).
        """
        root = os.path.join(self.root, "blobs")
        flt = parse_all(*filters)
        try:
            algorithms = sorted(os.listdir(root))
        except FileNotFoundError:
            return
        for alg in algorithms:
            if alg not in _ALGORITHMS:
                continue
            alg_dir = os.path.join(root, alg)
            try:
                names = sorted(os.listdir(alg_dir))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                path = os.path.join(alg_dir, name)
                digest = f"{alg}:{name}"
                try:
                    validate_digest(digest)
                except ValueError as e:
                    _log.error("invalid digest for blob path {path}: {error}", path=path, error=e)
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # deleted while walking
                if not stat.S_ISREG(st.st_mode):
                    continue
                info = self._info(digest, st, self._labels(digest))
                adaptor = FieldsAdaptor({"digest": info.digest, "labels": info.labels}, always_present=("digest",))
                if flt.match(adaptor):
                    fn(info)

    # -- ingests

    def status(self, ref: str) -> Status:
        """Progress of the ingest ``ref``, read from disk."""
        return self._status(self.ingest_root(ref))

    def _status(self, ingest_path: str) -> Status:
        dp = os.path.join(ingest_path, "data")
        try:
            st = os.stat(dp)
        except FileNotFoundError:
            raise NotFound(f"stat {dp}: no such file or directory") from None
        rp = os.path.join(ingest_path, "ref")
        try:
            ref = _read_text(rp)
        except FileNotFoundError:
            raise NotFound(f"open {rp}: no such file or directory") from None
        try:
            started_at = _read_timestamp(os.path.join(ingest_path, "startedat"))
        except CdtwistError as e:
            raise type(e)(f"could not read startedat: {e.context}") from None
        try:
            updated_at = _read_timestamp(os.path.join(ingest_path, "updatedat"))
        except CdtwistError as e:
            raise type(e)(f"could not read updatedat: {e.context}") from None
        # updatedat is only written on close; the data's mtime may be newer.
        updated_at = max(updated_at, st.st_mtime_ns)
        return Status(
            ref=ref,
            offset=st.st_size,
            total=self._total(ingest_path),
            started_at=started_at,
            updated_at=updated_at,
        )

    @staticmethod
    def _total(ingest_path: str) -> int:
        try:
            return int(_read_text(os.path.join(ingest_path, "total")))
        except (OSError, ValueError):
            return 0

    def _ingest_names(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "ingest")))

    def list_statuses(self, *filters: str) -> list[Status]:
        """Active ingests matching ``filters`` (field ``ref``).

        Ingests without data or ref (being committed, or half created before
        a crash) are skipped, as Go's code intends; Go's ``os.IsNotExist``
        does not see through its own wrapping, so it fails the whole listing.
        """
        names = self._ingest_names()
        flt = parse_all(*filters)
        active: list[Status] = []
        for name in names:
            try:
                st = self._status(os.path.join(self.root, "ingest", name))
            except NotFound:
                continue
            if flt.match(FieldsAdaptor({"ref": st.ref}, always_present=("ref",))):
                active.append(st)
        return active

    def walk_status_refs(self, fn: Callable[[str], object]) -> None:
        """Call ``fn`` with the ref of every ingest directory (what containerd's GC uses)."""
        for name in self._ingest_names():
            rp = os.path.join(self.root, "ingest", name, "ref")
            try:
                ref = _read_text(rp)
            except OSError as e:
                _log.error("failed to read ingest ref {path}: {error}", path=rp, error=e)
                continue
            fn(ref)

    def abort(self, ref: str) -> None:
        """Remove the ingest of ``ref``, even if a writer is still open on it (as Go does).

        Go's ``os.RemoveAll`` ignores a missing directory; here it is NotFound.
        """
        root = self.ingest_root(ref)
        try:
            shutil.rmtree(root)
        except FileNotFoundError:
            raise NotFound(f'ingest ref "{ref}"') from None

    def expire_ingests(self, older_than_seconds: float, now_ns: int | None = None) -> list[str]:
        """Remove ingests not written to for ``older_than_seconds``; return their refs.

        Ingests with an open writer in this process are kept.  Directories
        too damaged to have a status (a crash while one was created) age by
        their newest file and are reported by directory name if their ref
        cannot be read.
        """
        if now_ns is None:
            now_ns = time.time_ns()
        cutoff = now_ns - int(older_than_seconds * 1_000_000_000)
        removed: list[str] = []
        for name in self._ingest_names():
            key = self._lock_key(name)
            try:
                token = _try_lock(key, name)
            except Unavailable:
                continue
            try:
                path = os.path.join(self.root, "ingest", name)
                try:
                    st = self._status(path)
                    updated, ref = st.updated_at, st.ref
                except CdtwistError:
                    updated, ref = _newest_mtime(path), ""
                    try:
                        ref = _read_text(os.path.join(path, "ref"))
                    except OSError:
                        ref = name
                if updated is None or updated >= cutoff:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                _log.info("expired ingest {ref} last updated {updated}", ref=ref, updated=format_timestamp(updated))
                removed.append(ref)
            finally:
                _unlock(key, token)
        return removed

    # -- writing

    def writer(self, ref: str, total: int = 0, expected: str = "") -> Writer:
        """Begin or resume the ingest ``ref``; only one writer per ref at a time.

        :raises Unavailable: another writer holds ``ref`` (after retrying).
        :raises AlreadyExists: ``expected`` is already committed.
        """
        if ref == "":
            raise InvalidArgument("ref must not be empty")
        key = self._lock_key(_ingest_key(ref))
        token: object | None = None
        for count in range(self.lock_retries):
            try:
                token = _try_lock(key, ref)
                break
            except Unavailable:
                if count == self.lock_retries - 1:
                    raise
            time.sleep(random.randrange(1 << count) / 1000)
        if token is None:  # lock_retries < 1: a single attempt
            token = _try_lock(key, ref)
        try:
            return self._writer(ref, total, expected, key, token)
        except BaseException:
            _unlock(key, token)
            raise

    def _resume_status(self, ref: str, total: int, hasher: hashlib._Hash) -> Status:
        path = self.ingest_root(ref)
        try:
            st = self._status(path)
        except CdtwistError as e:
            raise CdtwistError(f"failed reading status of resume write: {e}") from None
        if st.ref != ref:
            # layout corruption or a hash collision of the ref key
            raise CdtwistError(f"ref key does not match: {ref} != {st.ref}")
        if total > 0 and st.total > 0 and total != st.total:
            raise CdtwistError(f"provided total differs from status: {total} != {st.total}")
        # The data is read back rather than trusted: the offset is what was hashed.
        st.offset = _hash_file(os.path.join(path, "data"), hasher)
        return st

    def _writer(self, ref: str, total: int, expected: str, key: tuple[str, str], token: object) -> Writer:
        if expected:
            p = self._blob_path(expected, "calculating expected blob path for writer")
            if os.path.exists(p):
                raise AlreadyExists(f"content {expected}")

        path = self.ingest_root(ref)
        data = os.path.join(path, "data")
        hasher = hashlib.sha256()
        resumed: Status | None = None
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            try:
                resumed = self._resume_status(ref, total, hasher)
            except (CdtwistError, OSError) as e:
                _log.info(
                    "failed to resume the status from path {path}: {error}. will recreate them", path=path, error=e
                )
                hasher = hashlib.sha256()

        if resumed is not None:
            offset, total = resumed.offset, resumed.total
            started_at, updated_at = resumed.started_at, resumed.updated_at
            flags = os.O_WRONLY | os.O_CREAT
        else:
            offset = 0
            started_at = updated_at = time.time_ns()
            _write_to_completion(os.path.join(path, "ref"), ref.encode("utf-8", "surrogateescape"))
            _write_timestamp(os.path.join(path, "startedat"), started_at)
            _write_timestamp(os.path.join(path, "updatedat"), started_at)
            total_path = os.path.join(path, "total")
            if total > 0:
                _write_to_completion(total_path, str(total).encode())
            else:
                # Go would keep a stale total from the ingest it recreates.
                with _suppress_missing():
                    os.unlink(total_path)
            # Go keeps the old bytes here and writes over them from offset 0,
            # so a shorter rewrite would commit a file its digest does not match.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

        try:
            fd = _open_data(data, flags)
        except OSError as e:
            raise CdtwistError(f"failed to open data file: {_os_error('open', data, e)}") from e
        return Writer(self, ref, path, fd, offset, total, hasher, started_at, updated_at, key, token)


def _ingest_key(ref: str) -> str:
    return hashlib.sha256(ref.encode("utf-8", "surrogateescape")).hexdigest()


def _open_data(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o666)
    except PermissionError:
        # A commit killed between making the data read-only and renaming it.
        st = os.stat(path)
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        return os.open(path, flags | os.O_CLOEXEC, 0o666)


def _newest_mtime(path: str) -> int | None:
    try:
        newest = os.stat(path).st_mtime_ns
        with os.scandir(path) as it:
            for entry in it:
                with _suppress_missing():
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
    except FileNotFoundError:
        return None
    return newest


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return typ is not None and issubclass(typ, FileNotFoundError)


# ---------------------------------------------------------------------------
# The writer (writer.go)


class _Handle:
    """What a writer's finalizer needs, kept apart from the writer itself."""

    def __init__(self, fd: int, key: tuple[str, str], token: object) -> None:
        self.fd: int | None = fd
        self.key = key
        self.token = token

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        _unlock(self.key, self.token)


def _abandoned(handle: _Handle) -> None:
    if handle.fd is not None:
        _log.warn("content writer garbage collected without close; releasing lock")
    handle.release()


class Writer:
    """One write transaction into the store (``content.Writer``).

    Small writes are gathered in memory up to 1 MiB and large ones go
    straight to the file; either way the digest is updated as data arrives,
    and :meth:`status` counts everything accepted.  A writer dropped without
    :meth:`close` releases its ref when garbage collected.
    """

    def __init__(
        self,
        store: LocalStore,
        ref: str,
        path: str,
        fd: int,
        offset: int,
        total: int,
        hasher: hashlib._Hash,
        started_at: int,
        updated_at: int,
        lock_key: tuple[str, str],
        token: object,
    ) -> None:
        self._store = store
        self.ref = ref
        self.path = path
        self._offset = offset
        self._flushed = offset
        self._total = total
        self._hasher = hasher
        self._started_at = started_at
        self._updated_at = updated_at
        self._buf = bytearray()
        self._broken: BaseException | None = None
        self._mu = threading.Lock()
        self._handle = _Handle(fd, lock_key, token)
        self._finalizer = weakref.finalize(self, _abandoned, self._handle)

    # -- state

    def status(self) -> Status:
        with self._mu:
            return Status(
                ref=self.ref,
                offset=self._offset,
                total=self._total,
                started_at=self._started_at,
                updated_at=self._updated_at,
            )

    def digest(self) -> str:
        """Digest of everything written so far."""
        with self._mu:
            return f"{CANONICAL}:{self._hasher.hexdigest()}"

    # -- writing

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._mu:
            fd = self._fd_or_invalid()
            n = len(data)
            if len(self._buf) + n <= _COALESCE_LIMIT and n < _DIRECT_WRITE:
                self._buf += data
            else:
                self._flush(fd)
                self._pwrite(fd, data)
            self._hasher.update(data)
            self._offset += n
            self._updated_at = time.time_ns()
            return n

    def _fd_or_invalid(self) -> int:
        if self._broken is not None:
            raise CdtwistError(f"writer failed earlier: {self._broken}")
        fd = self._handle.fd
        if fd is None:
            # (*os.File)(nil).Write: os.ErrInvalid, unclassified.
            raise CdtwistError("invalid argument")
        return fd

    def _pwrite(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        try:
            _write_all(fd, data, self._flushed)
        except OSError as e:
            # The digest and the file no longer agree: only a fresh writer,
            # which rereads the data, can continue.
            self._broken = e
            raise _os_error("write", os.path.join(self.path, "data"), e) from e
        self._flushed += len(data)

    def _flush(self, fd: int) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._pwrite(fd, buf)

    def truncate(self, size: int) -> None:
        """Restart the ingest from nothing; only ``size == 0`` is supported, as in Go."""
        if size != 0:
            raise CdtwistError("Truncate: unsupported size")
        with self._mu:
            fd = self._handle.fd
            if fd is None:
                raise CdtwistError("invalid argument")
            self._buf = bytearray()
            self._offset = self._flushed = 0
            self._hasher = hashlib.sha256()
            self._broken = None
            os.ftruncate(fd, 0)

    # -- finishing

    def commit(self, size: int = 0, expected: str = "", labels: dict[str, str] | None = None) -> None:
        """Verify and publish the blob; always closes the writer, even on error.

        A size or digest mismatch keeps the ingest for a later writer; a blob
        that already exists removes it and raises AlreadyExists.
        """
        with self._mu:
            handle = self._handle
            fd = handle.fd
            if fd is None:
                raise FailedPrecondition("cannot commit on closed writer")
            handle.fd = None
            try:
                self._commit(fd, size, expected, labels)
            finally:
                handle.release()
                self._finalizer.detach()

    def _commit(self, fd: int, size: int, expected: str, labels: dict[str, str] | None) -> None:
        store = self._store
        ingest = os.path.join(self.path, "data")
        try:
            if self._broken is not None:
                raise CdtwistError(f"writer failed earlier: {self._broken}")
            self._flush(fd)
            try:
                actual = os.fstat(fd).st_size
            except OSError as e:
                raise CdtwistError(f"stat on ingest file failed: {e}") from e
            if size > 0 and size != actual:
                raise FailedPrecondition(f"unexpected commit size {actual}, expected {size}")
            dgst = f"{CANONICAL}:{self._hasher.hexdigest()}"
            if expected and expected != dgst:
                raise FailedPrecondition(f"unexpected commit digest {dgst}, expected {expected}")
            if actual != self._flushed:
                # Someone else wrote to or truncated the data file.
                raise CdtwistError(f"ingest data changed underneath writer: size {actual}, wrote {self._flushed}")
            # The blob must be final the moment it appears: read-only (the
            # creation mode minus write and exec bits) and timestamped before
            # the rename, with data and inode flushed.
            commit_time = time.time_ns()
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.fchmod(fd, mode & ~0o333)
            try:
                os.utime(fd, ns=(commit_time, commit_time))
            except OSError:
                _log.error("failed to change file time to commit time for {digest}", digest=dgst)
            try:
                os.fsync(fd)
            except OSError as e:
                os.fchmod(fd, mode)
                raise CdtwistError(f"sync failed: {e}") from e
        finally:
            try:
                os.close(fd)
            except OSError as e:
                raise CdtwistError(f"failed to close ingest file: {e}") from e

        target = store.blob_path(dgst)
        try:
            _makedirs_durable(os.path.dirname(target))
        except OSError as e:
            _restore_mode(ingest, mode)
            raise _os_error("mkdir", os.path.dirname(target), e) from e

        if os.path.exists(target):
            try:
                shutil.rmtree(self.path)
            except OSError:
                _log.error("failed to remove ingest directory {path} of {ref}", path=self.path, ref=self.ref)
            raise AlreadyExists(f"content {dgst}")

        try:
            os.rename(ingest, target)
        except OSError as e:
            _restore_mode(ingest, mode)
            raise _os_error("rename", f"{ingest} {target}", e) from e
        try:
            _fsync_dir(os.path.dirname(target))
        except OSError as e:
            _log.error("failed to sync blob directory after commit of {digest}: {error}", digest=dgst, error=e)

        # The blob is in place; what follows cannot be rolled back, so
        # failures are only logged.
        try:
            shutil.rmtree(self.path)
        except OSError:
            _log.error("failed to remove ingest directory {path} of {ref}", path=self.path, ref=self.ref)
        if store.label_store is not None and labels is not None:
            try:
                store.label_store.set(dgst, dict(labels))
            except Exception as e:
                _log.error("failed to set labels for {digest}: {error}", digest=dgst, error=e)

    def close(self) -> None:
        """Flush and release the ref, keeping the ingest to resume or abort; idempotent."""
        with self._mu:
            handle = self._handle
            fd = handle.fd
            if fd is None:
                return
            handle.fd = None
            error: CdtwistError | None = None
            data = os.path.join(self.path, "data")
            try:
                if self._broken is None:
                    self._flush(fd)
                    # Let the data's mtime say when data last came in, not
                    # when this flush happened: status() takes the newer.
                    os.utime(fd, ns=(os.fstat(fd).st_atime_ns, self._updated_at))
                os.fsync(fd)
            except CdtwistError as e:
                error = e
            except OSError as e:
                error = _os_error("sync", data, e)
            try:
                os.close(fd)
            except OSError as e:
                error = error or _os_error("close", data, e)
            try:
                _write_timestamp(os.path.join(self.path, "updatedat"), self._updated_at)
            except (OSError, CdtwistError):
                pass  # Go ignores this too; e.g. the ingest was aborted
            handle.release()
            self._finalizer.detach()
            if error is not None:
                raise error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _restore_mode(path: str, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError:
        pass
