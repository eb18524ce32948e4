# -*- test-case-name: tests.test_snapshots_suite -*-
"""The snapshotter model shared by every engine (containerd's ``snapshots`` package).

A snapshot is a filesystem state with a parent: *active* ones (``prepare``)
are writable and may be committed, *views* are read-only, *committed* ones
are the only possible parents.  Engines (:mod:`.overlay`, :mod:`.native`)
implement :class:`Snapshotter` on top of :mod:`.storage`; every call blocks
(disk and sqlite work), so callers run them in a thread pool.  The namespaced
metadata layer and the gRPC service sit on top of this API.
"""

from __future__ import annotations

import abc
import enum
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cdtwist.errors import CdtwistError
from cdtwist.mount import Mount

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cdtwist.plugin.context import Platform

__all__ = [
    "Cleaner",
    "Info",
    "Kind",
    "Mount",
    "Snapshotter",
    "Usage",
    "WalkFunc",
    "default_platform",
    "filter_inherited_labels",
    "go_quote",
    "parse_kind",
    "wrap_error",
]

#: Key prefix of snapshots that images are unpacked into (``snapshots.UnpackKeyPrefix``).
UNPACK_KEY_PREFIX = "extract"
#: ``snapshots.UnpackKeyFormat``: ``extract-<unique> <chainID>``.
UNPACK_KEY_FORMAT = UNPACK_KEY_PREFIX + "-%s %s"
INHERITED_LABELS_PREFIX = "containerd.io/snapshot/"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"


class Kind(enum.IntEnum):
    """A snapshot's kind, numbered as in Go and in the gRPC API."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        """Go's ``Kind.String``: ``View``, ``Active``, ``Committed``, ``Unknown``."""
        return self.name.capitalize()


def parse_kind(s: str) -> Kind:
    """Go's ``ParseKind``: case-insensitive, ``UNKNOWN`` for anything else."""
    return {"view": Kind.VIEW, "active": Kind.ACTIVE, "committed": Kind.COMMITTED}.get(s.lower(), Kind.UNKNOWN)


@dataclass
class Info:
    """A snapshot's metadata; times are nanoseconds since the epoch (UTC)."""

    kind: Kind = Kind.UNKNOWN
    name: str = ""
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0
    updated: int = 0


@dataclass
class Usage:
    """Disk resources of one snapshot alone, not counting its parents."""

    inodes: int = 0
    size: int = 0

    def add(self, other: Usage) -> None:
        """Sum, assuming independent inodes (an upper bound, as in Go)."""
        self.size += other.size
        self.inodes += other.inodes


#: Called for each snapshot a walk selects; raising stops the walk.
WalkFunc = Callable[[Info], Any]


class Snapshotter(abc.ABC):
    """containerd's ``snapshots.Snapshotter``: every method blocks.

    ``key`` names an active or view snapshot, ``name`` a committed one and
    ``parent`` a committed one too; all share one key space.
    """

    #: ``(reactor, pool)`` set by the plugin registration so :meth:`stop`
    #: closes off the reactor thread.
    plugin_io: tuple[Any, Any] | None = None

    @abc.abstractmethod
    def stat(self, key: str) -> Info:
        """Info of an active, view or committed snapshot."""

    @abc.abstractmethod
    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change the mutable fields (labels): all of them, or only ``fieldpaths``."""

    @abc.abstractmethod
    def usage(self, key: str) -> Usage:
        """Usage of the snapshot alone; may walk the whole snapshot for active ones."""

    @abc.abstractmethod
    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot (again, after prepare/view)."""

    @abc.abstractmethod
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create an active snapshot on top of the committed ``parent``."""

    @abc.abstractmethod
    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create a read-only view of the committed ``parent``."""

    @abc.abstractmethod
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn the active ``key`` into the committed ``name`` (labels are replaced, not inherited)."""

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Remove a snapshot; one with children cannot be removed."""

    @abc.abstractmethod
    def walk(self, fn: WalkFunc, *filters: str) -> None:
        """Call ``fn`` for each snapshot matching any of ``filters`` (name, parent, kind, labels.*)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; closing twice is fine."""

    def stop(self) -> Deferred[None] | None:
        """Plugin shutdown: :meth:`close` in the I/O pool the plugin was set up with."""
        if self.plugin_io is None:
            self.close()
            return None
        from twisted.internet.threads import deferToThreadPool

        reactor, pool = self.plugin_io
        return deferToThreadPool(reactor, pool, self.close)


@runtime_checkable
class Cleaner(Protocol):
    """Snapshotters that free disk space later, in bulk (``snapshots.Cleaner``)."""

    def cleanup(self) -> None:
        """Remove what no snapshot refers to any more."""
        ...


def filter_inherited_labels(labels: Mapping[str, str] | None) -> dict[str, str] | None:
    """Only ``containerd.io/snapshot/*`` and ``containerd.io/snapshot.ref`` (``FilterInheritedLabels``)."""
    if labels is None:
        return None
    return {k: v for k, v in labels.items() if k == LABEL_SNAPSHOT_REF or k.startswith(INHERITED_LABELS_PREFIX)}


_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(s: str) -> str:
    """Go's ``%q`` of a string (``strconv.Quote``), for messages that must read the same."""
    out = ['"']
    for c in s:
        cp = ord(c)
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[c])
        elif 0xDC80 <= cp <= 0xDCFF:  # a surrogate escape stands for an invalid byte
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif cp < 0x80:
            out.append(f"\\x{cp:02x}")
        elif cp <= 0xFFFF:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


def wrap_error(prefix: str, err: BaseException) -> CdtwistError:
    """Go's ``fmt.Errorf("<prefix>: %w", err)``: same class, context prefixed.

    Errors that are not containerd classes (OS errors...) become a plain
    :class:`CdtwistError` (gRPC UNKNOWN), as Go reports them.
    """
    if isinstance(err, CdtwistError):
        cls = type(err)
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(err.__dict__)
        wrapped.context = f"{prefix}: {err.context}" if err.context else prefix
        wrapped.args = (wrapped.message,)
        wrapped.__cause__ = err
        return wrapped
    out = CdtwistError(f"{prefix}: {go_error_text(err)}")
    out.__cause__ = err
    return out


def go_error_text(err: BaseException) -> str:
    """An error's text as Go would print it: ``<path>: no such file or directory``."""
    if isinstance(err, CdtwistError):
        return err.message
    if isinstance(err, OSError) and err.errno is not None:
        text = os.strerror(err.errno)
        text = text[:1].lower() + text[1:]
        if err.filename is not None:
            return f"{os.fsdecode(err.filename)}: {text}"
        return text
    return str(err)


def os_error(op: str, path: str, err: OSError) -> CdtwistError:
    """Go's ``*PathError`` text for an OS error: ``lstat /x: no such file or directory``."""
    text = os.strerror(err.errno) if err.errno is not None else str(err)
    out = CdtwistError(f"{op} {path}: {text[:1].lower() + text[1:]}")
    out.__cause__ = err
    return out


_GOARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv5l": ("arm", "v5"),
    "armv6l": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv8l": ("arm", "v8"),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}


def default_platform() -> Platform:
    """containerd's ``platforms.DefaultSpec()`` for this machine (``linux/amd64``, ``linux/arm64/v8``)."""
    from cdtwist.plugin.context import Platform

    machine = platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    return Platform(os="linux", architecture=arch, variant=variant)
