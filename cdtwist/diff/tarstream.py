# -*- test-case-name: tests.test_diff_tar -*-
"""Streaming tar reading and writing, byte for byte as Go's ``archive/tar``.

Python's :mod:`tarfile` reads PAX and GNU long-name blocks of any claimed size
into memory and writes headers that differ from Go's, so layers are read and
written here instead:

* :class:`TarReader` pulls the stream through :class:`HashingInput`, which
  reads it in bounded chunks and hashes every byte (the layer's diff id) as it
  goes.  Special blocks (PAX records, GNU long names, sparse maps) are capped at
  Go's 1 MiB; file data is handed out as memoryviews of the chunks, so memory
  stays flat whatever a header claims.
* :class:`TarWriter` chooses USTAR or PAX exactly as Go's ``Writer.WriteHeader``
  does for the headers containerd writes, so a diff made here matches one made
  by containerd's ``archive.WriteDiff``.

Names and link names are ``bytes`` (as on disk); PAX records are ``str`` keys
(UTF-8, surrogate-escaped) with ``bytes`` values.
"""

from __future__ import annotations

import hashlib
import posixpath
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from cdtwist.errors import CdtwistError

BLOCK_SIZE = 512
MAX_SPECIAL_FILE_SIZE = 1 << 20  # Go's maxSpecialFileSize
CHUNK_SIZE = 1 << 20

TYPE_REG = ord("0")
TYPE_REGA = 0
TYPE_LINK = ord("1")
TYPE_SYMLINK = ord("2")
TYPE_CHAR = ord("3")
TYPE_BLOCK = ord("4")
TYPE_DIR = ord("5")
TYPE_FIFO = ord("6")
TYPE_CONT = ord("7")
TYPE_XHEADER = ord("x")
TYPE_XGLOBAL = ord("g")
TYPE_GNU_SPARSE = ord("S")
TYPE_GNU_LONGNAME = ord("L")
TYPE_GNU_LONGLINK = ord("K")

_HEADER_ONLY = frozenset({TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCK, TYPE_DIR, TYPE_FIFO})

PAX_PATH = "path"
PAX_LINKPATH = "linkpath"
PAX_SIZE = "size"
PAX_UID = "uid"
PAX_GID = "gid"
PAX_UNAME = "uname"
PAX_GNAME = "gname"
PAX_MTIME = "mtime"
PAX_ATIME = "atime"
PAX_CTIME = "ctime"
PAX_SCHILY_XATTR = "SCHILY.xattr."
_PAX_BASIC = frozenset(
    {PAX_PATH, PAX_LINKPATH, PAX_SIZE, PAX_UID, PAX_GID, PAX_UNAME, PAX_GNAME, PAX_MTIME, PAX_ATIME, PAX_CTIME}
)

_MAGIC_USTAR = b"ustar\x00"
_VERSION_USTAR = b"00"
_MAGIC_GNU = b"ustar "
_VERSION_GNU = b" \x00"
_TRAILER_STAR = b"tar\x00"
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_DECIMAL = re.compile(rb"-?[0-9]+")

_FORMAT_V7, _FORMAT_USTAR, _FORMAT_GNU, _FORMAT_STAR = range(4)


class TarError(CdtwistError):
    """A malformed or truncated archive (Go's plain ``archive/tar`` errors: gRPC UNKNOWN)."""


def err_header() -> TarError:
    return TarError("archive/tar: invalid tar header")


def err_unexpected_eof() -> TarError:
    return TarError("unexpected EOF")


def err_field_too_long() -> TarError:
    return TarError("archive/tar: header field too long")


def block_padding(n: int) -> int:
    return -n & (BLOCK_SIZE - 1)


@dataclass(slots=True)
class Header:
    """One archive member, as Go's ``tar.Header`` after PAX/GNU records are merged."""

    name: bytes
    typeflag: int = TYPE_REG
    linkname: bytes = b""
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    ctime_ns: int | None = None
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, bytes] = field(default_factory=dict)
    # Data fragments (offset, length) of a sparse file; None for a plain one.
    sparse: list[tuple[int, int]] | None = None

    @property
    def xattrs(self) -> dict[str, bytes]:
        n = len(PAX_SCHILY_XATTR)
        return {k[n:]: v for k, v in self.pax.items() if k.startswith(PAX_SCHILY_XATTR)}


def _hash_loop(q: queue.Queue[bytes | None], h: hashlib._Hash) -> None:
    while (data := q.get()) is not None:
        h.update(data)


class HashingInput:
    """A byte source read in bounded chunks, hashing and counting all it yields.

    The digest covers everything pulled from ``src``; :meth:`drain` pulls the
    rest (trailing data after the archive's end), as containerd's applier does
    before it reports the diff id.
    """

    def __init__(self, src: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        self._src = src
        self._chunk = chunk_size
        self._buf = b""
        self._pos = 0
        self._hash = hashlib.sha256()
        self.count = 0
        self._eof = False
        # sha256 releases the GIL: hash on a helper thread while the caller writes files.
        # The queue is bounded, so at most a few chunks are held for hashing; the
        # thread holds no reference to self, and a finalizer stops it if close() is skipped.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._hasher = threading.Thread(
            target=_hash_loop, args=(self._queue, self._hash), name="layer-digest", daemon=True
        )
        self._hasher.start()
        self._finalizer = weakref.finalize(self, self._queue.put, None)

    def _finish_hash(self) -> None:
        if self._finalizer.alive:
            self._finalizer()
            self._hasher.join()

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._src.read(self._chunk)
        if not data:
            self._eof = True
            return False
        data = bytes(data)
        self._queue.put(data)
        self.count += len(data)
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = bytes(data)
        self._pos = 0
        return True

    def read_block(self) -> bytes:
        """One 512-byte block; ``b""`` at a clean end, :func:`err_unexpected_eof` if cut."""
        while len(self._buf) - self._pos < BLOCK_SIZE:
            if not self._fill():
                if self._pos == len(self._buf):
                    return b""
                raise err_unexpected_eof()
        blk = self._buf[self._pos : self._pos + BLOCK_SIZE]
        self._pos += BLOCK_SIZE
        return blk

    def read_exact(self, n: int) -> bytes:
        parts = [bytes(mv) for mv in self.chunks(n)]
        return b"".join(parts)

    def chunks(self, n: int) -> Iterator[memoryview]:
        """Yield exactly ``n`` bytes as views (valid until the next call), or raise if cut."""
        while n > 0:
            if self._pos == len(self._buf) and not self._fill():
                raise err_unexpected_eof()
            take = min(n, len(self._buf) - self._pos)
            view = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            n -= take
            yield view

    def skip(self, n: int) -> None:
        for _ in self.chunks(n):
            pass

    def drain(self) -> int:
        """Read to the end of the source; returns how many bytes were left."""
        left = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while self._fill():
            left += len(self._buf)
            self._buf = b""
        return left

    def close(self) -> None:
        """Stop the hashing thread (the digest is final after this)."""
        self._finish_hash()

    def hexdigest(self) -> str:
        self._finish_hash()
        return self._hash.hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hexdigest()


# -- parsing -----------------------------------------------------------------


def _parse_string(b: bytes) -> bytes:
    i = b.find(b"\x00")
    return b if i < 0 else b[:i]


def _parse_octal(b: bytes) -> int:
    b = b.strip(b" \x00")
    if not b:
        return 0
    if b.strip(b"01234567"):
        raise err_header()
    v = int(b, 8)
    if v >= 1 << 64:
        raise err_header()
    return v


def _parse_numeric(b: bytes) -> int:
    if b and b[0] & 0x80:
        neg = bool(b[0] & 0x40)
        inv = 0xFF if neg else 0
        x = 0
        for i, c in enumerate(b):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                raise err_header()
            x = x << 8 | c
        if x >> 63:
            raise err_header()
        return ~x if neg else x
    return _parse_octal(b)


def _checksums(blk: bytes) -> tuple[int, int]:
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 0x20
    high = sum(1 for c in blk[:148] if c & 0x80) + sum(1 for c in blk[156:] if c & 0x80)
    return unsigned, unsigned - 256 * high


def _block_format(blk: bytes) -> int | None:
    try:
        value = _parse_octal(blk[148:156])
    except TarError:
        return None
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 0x20
    if value != unsigned and value != _checksums(blk)[1]:
        return None
    magic, version = blk[257:263], blk[263:265]
    if magic == _MAGIC_USTAR and blk[508:512] == _TRAILER_STAR:
        return _FORMAT_STAR
    if magic == _MAGIC_USTAR:
        return _FORMAT_USTAR
    if magic == _MAGIC_GNU and version == _VERSION_GNU:
        return _FORMAT_GNU
    return _FORMAT_V7


def parse_pax_time(s: bytes) -> int:
    """PAX ``%d.%d`` seconds as nanoseconds (Go's parsePAXTime)."""
    ss, _, sn = s.partition(b".")
    secs = _parse_int(ss)
    if not sn:
        return secs * 1_000_000_000
    if sn.strip(b"0123456789"):
        raise err_header()
    nsecs = int((sn + b"000000000")[:9])
    if ss.startswith(b"-"):
        return secs * 1_000_000_000 - nsecs
    return secs * 1_000_000_000 + nsecs


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records (Go's parsePAX), GNU sparse 0.0 offsets folded into ``GNU.sparse.map``."""
    records: dict[str, bytes] = {}
    sparse_map: list[bytes] = []
    while data:
        n_str, sp, rest = data.partition(b" ")
        if not sp or not n_str.isdigit():
            raise err_header()
        n = int(n_str)
        if n < 5 or n > len(data):
            raise err_header()
        n -= len(n_str) + 1
        if n <= 0:
            raise err_header()
        rec, nl, data = rest[: n - 1], rest[n - 1 : n], rest[n:]
        if nl != b"\n":
            raise err_header()
        k, eq, v = rec.partition(b"=")
        if not eq or not k:
            raise err_header()
        key = k.decode("utf-8", "surrogateescape")
        if key in (PAX_PATH, PAX_LINKPATH, PAX_UNAME, PAX_GNAME):
            if b"\x00" in v:
                raise err_header()
        elif b"\x00" in k:
            raise err_header()
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            want = "GNU.sparse.offset" if len(sparse_map) % 2 == 0 else "GNU.sparse.numbytes"
            if key != want or b"," in v:
                raise err_header()
            sparse_map.append(v)
        else:
            records[key] = v
    if sparse_map:
        records["GNU.sparse.map"] = b",".join(sparse_map)
    return records


def _parse_int(v: bytes) -> int:
    if not _DECIMAL.fullmatch(v):
        raise err_header()
    n = int(v, 10)
    if not -(1 << 63) <= n < 1 << 63:
        raise err_header()
    return n


def _merge_pax(hdr: Header, pax: dict[str, bytes]) -> None:
    for k, v in pax.items():
        if not v:
            continue
        if k == PAX_PATH:
            hdr.name = v
        elif k == PAX_LINKPATH:
            hdr.linkname = v
        elif k == PAX_UNAME:
            hdr.uname = v
        elif k == PAX_GNAME:
            hdr.gname = v
        elif k == PAX_UID:
            hdr.uid = _parse_int(v)
        elif k == PAX_GID:
            hdr.gid = _parse_int(v)
        elif k == PAX_ATIME:
            hdr.atime_ns = parse_pax_time(v)
        elif k == PAX_MTIME:
            hdr.mtime_ns = parse_pax_time(v)
        elif k == PAX_CTIME:
            hdr.ctime_ns = parse_pax_time(v)
        elif k == PAX_SIZE:
            hdr.size = _parse_int(v)
    hdr.pax = pax


def _validate_sparse(spd: list[tuple[int, int]], size: int) -> bool:
    if size < 0:
        return False
    end = 0
    for off, length in spd:
        if off < 0 or length < 0 or off > (1 << 63) - 1 - length or off + length > size or end > off:
            return False
        end = off + length
    return True


class TarReader:
    """Iterate the members of a tar stream (Go's ``tar.Reader``), never buffering file data.

    Call :meth:`next` for each header, then optionally :meth:`data` to stream
    the member's contents; whatever is not read is skipped by the next
    :meth:`next`.
    """

    def __init__(self, src: HashingInput | BinaryIO) -> None:
        self.input = src if isinstance(src, HashingInput) else HashingInput(src)
        self._remaining = 0  # physical bytes of the current member not yet consumed
        self._pad = 0
        self._current: Header | None = None
        self._done = False

    def _skip_current(self) -> None:
        if self._remaining:
            self.input.skip(self._remaining)
            self._remaining = 0
        if self._pad:
            self.input.skip(self._pad)
            self._pad = 0

    def _set_regular(self, hdr: Header) -> None:
        nb = 0 if hdr.typeflag in _HEADER_ONLY else hdr.size
        if nb < 0:
            raise err_header()
        self._remaining = nb
        self._pad = block_padding(nb)

    def _read_special(self) -> bytes:
        if self._remaining > MAX_SPECIAL_FILE_SIZE:
            raise err_field_too_long()
        data = self.input.read_exact(self._remaining)
        self._remaining = 0
        return data

    def _read_header(self) -> tuple[Header, bytes, int] | None:
        blk = self.input.read_block()
        if not blk:
            return None
        if blk == _ZERO_BLOCK:
            blk2 = self.input.read_block()
            if not blk2 or blk2 == _ZERO_BLOCK:
                return None
            raise err_header()
        fmt = _block_format(blk)
        if fmt is None:
            raise err_header()
        hdr = Header(
            name=_parse_string(blk[0:100]),
            typeflag=blk[156],
            linkname=_parse_string(blk[157:257]),
            size=_parse_numeric(blk[124:136]),
            mode=_parse_numeric(blk[100:108]),
            uid=_parse_numeric(blk[108:116]),
            gid=_parse_numeric(blk[116:124]),
            mtime_ns=_parse_numeric(blk[136:148]) * 1_000_000_000,
        )
        if fmt != _FORMAT_V7:
            hdr.uname = _parse_string(blk[265:297])
            hdr.gname = _parse_string(blk[297:329])
            hdr.devmajor = _parse_numeric(blk[329:337])
            hdr.devminor = _parse_numeric(blk[337:345])
            prefix = b""
            if fmt == _FORMAT_USTAR:
                prefix = _parse_string(blk[345:500])
            elif fmt == _FORMAT_STAR:
                prefix = _parse_string(blk[345:476])
                hdr.atime_ns = _parse_numeric(blk[476:488]) * 1_000_000_000
                hdr.ctime_ns = _parse_numeric(blk[488:500]) * 1_000_000_000
            else:
                try:
                    if blk[345]:
                        hdr.atime_ns = _parse_numeric(blk[345:357]) * 1_000_000_000
                    if blk[357]:
                        hdr.ctime_ns = _parse_numeric(blk[357:369]) * 1_000_000_000
                except TarError:
                    # Pre-Go 1.8 writers put a USTAR prefix here (golang.org/issue/12594).
                    hdr.atime_ns = hdr.ctime_ns = None
                    s = _parse_string(blk[345:500])
                    if s.isascii():
                        prefix = s
                    fmt = _FORMAT_V7
            if prefix:
                hdr.name = prefix + b"/" + hdr.name
        return hdr, blk, fmt

    def next(self) -> Header | None:
        """The next member, or None at the end of the archive."""
        if self._done:
            return None
        pax: dict[str, bytes] = {}
        long_name = long_link = b""
        while True:
            self._skip_current()
            got = self._read_header()
            if got is None:
                self._done = True
                self._current = None
                return None
            hdr, blk, fmt = got
            self._set_regular(hdr)
            if hdr.typeflag in (TYPE_XHEADER, TYPE_XGLOBAL):
                pax = parse_pax(self._read_special())
                if hdr.typeflag == TYPE_XGLOBAL:
                    _merge_pax(hdr, pax)
                    g = Header(name=hdr.name, typeflag=TYPE_XGLOBAL, pax=hdr.pax)
                    self._current = g
                    return g
                continue
            if hdr.typeflag in (TYPE_GNU_LONGNAME, TYPE_GNU_LONGLINK):
                value = _parse_string(self._read_special())
                if hdr.typeflag == TYPE_GNU_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            _merge_pax(hdr, pax)
            if long_name:
                hdr.name = long_name
            if long_link:
                hdr.linkname = long_link
            if hdr.typeflag == TYPE_REGA:
                hdr.typeflag = TYPE_DIR if hdr.name.endswith(b"/") else TYPE_REG
            self._set_regular(hdr)
            self._handle_sparse(hdr, blk, fmt)
            self._current = hdr
            return hdr

    def _handle_sparse(self, hdr: Header, blk: bytes, fmt: int) -> None:
        if hdr.typeflag == TYPE_GNU_SPARSE:
            spd = self._old_gnu_sparse(hdr, blk, fmt)
        else:
            spd = self._pax_sparse(hdr)
        if spd is None:
            return
        if hdr.typeflag in _HEADER_ONLY or not _validate_sparse(spd, hdr.size):
            raise err_header()
        spd = [(o, n) for o, n in spd if n]
        if sum(n for _, n in spd) != self._remaining:
            raise TarError("archive/tar: sparse file references non-existent data")
        hdr.sparse = spd

    def _old_gnu_sparse(self, hdr: Header, blk: bytes, fmt: int) -> list[tuple[int, int]]:
        if fmt != _FORMAT_GNU:
            raise err_header()
        hdr.size = _parse_numeric(blk[483:495])
        spd: list[tuple[int, int]] = []
        entries, extended = blk[386:482], blk[482]
        blocks = 0
        while True:
            for i in range(0, len(entries), 24):
                if entries[i] == 0:
                    break
                spd.append((_parse_numeric(entries[i : i + 12]), _parse_numeric(entries[i + 12 : i + 24])))
            if not extended:
                return spd
            blocks += 1
            if blocks * BLOCK_SIZE > MAX_SPECIAL_FILE_SIZE:
                raise err_field_too_long()
            ext = self.input.read_block()
            if not ext:
                raise err_unexpected_eof()
            entries, extended = ext[:504], ext[504]

    def _pax_sparse(self, hdr: Header) -> list[tuple[int, int]] | None:
        p = hdr.pax
        major, minor = p.get("GNU.sparse.major", b""), p.get("GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            is1x0 = False
        elif major == b"1" and minor == b"0":
            is1x0 = True
        elif major or minor:
            return None
        elif p.get("GNU.sparse.map"):
            is1x0 = False
        else:
            return None
        if p.get("GNU.sparse.name"):
            hdr.name = p["GNU.sparse.name"]
        size = p.get("GNU.sparse.size") or p.get("GNU.sparse.realsize")
        if size:
            hdr.size = _parse_int(size)
        if is1x0:
            return self._sparse_map_1x0()
        num = _parse_int(p.get("GNU.sparse.numblocks", b""))
        raw = p.get("GNU.sparse.map", b"")
        fields = raw.split(b",") if raw else []
        if num < 0 or len(fields) != 2 * num:
            raise err_header()
        return [(_parse_int(fields[i]), _parse_int(fields[i + 1])) for i in range(0, len(fields), 2)]

    def _sparse_map_1x0(self) -> list[tuple[int, int]]:
        buf = b""
        tokens: list[bytes] = []

        def feed(n: int) -> None:
            nonlocal buf
            while len(tokens) < n:
                if self._remaining < BLOCK_SIZE:
                    raise err_unexpected_eof()
                if len(buf) > MAX_SPECIAL_FILE_SIZE:
                    raise err_field_too_long()
                buf += self.input.read_exact(BLOCK_SIZE)
                self._remaining -= BLOCK_SIZE
                *done, buf = buf.split(b"\n")
                tokens.extend(done)

        feed(1)
        num = _parse_int(tokens[0])
        if num < 0 or num > MAX_SPECIAL_FILE_SIZE:
            raise err_header()
        feed(1 + 2 * num)
        return [(_parse_int(tokens[1 + 2 * i]), _parse_int(tokens[2 + 2 * i])) for i in range(num)]

    def data(self) -> Iterator[tuple[int, memoryview]]:
        """The current member's contents as ``(offset, view)`` pieces.

        Offsets only jump for sparse files (the holes between pieces read as
        zeros); each view is valid until the next iteration.
        """
        hdr = self._current
        if hdr is None:
            return
        if hdr.sparse is None:
            off = 0
            for mv in self.input.chunks(self._remaining):
                self._remaining -= len(mv)
                yield off, mv
                off += len(mv)
            return
        for start, length in hdr.sparse:
            off = start
            for mv in self.input.chunks(length):
                self._remaining -= len(mv)
                yield off, mv
                off += len(mv)

    def finish(self) -> None:
        """Consume the rest of the current member (and its padding)."""
        self._skip_current()


# -- writing -----------------------------------------------------------------


def _fits_octal(n: int, x: int) -> bool:
    return x >= 0 and (n >= 22 or x < 1 << ((n - 1) * 3))


def _to_ascii(s: bytes) -> bytes:
    return s if s.isascii() else bytes(c for c in s if c < 0x80)


def _put_string(blk: bytearray, off: int, size: int, s: bytes) -> None:
    blk[off : off + min(len(s), size)] = s[:size]
    if len(s) < size:
        blk[off + len(s)] = 0
    elif len(s) > size and blk[off + size - 1] == ord("/"):
        n = len(s[:size].rstrip(b"/"))
        blk[off + n] = 0


def _put_octal(blk: bytearray, off: int, size: int, x: int) -> None:
    if not _fits_octal(size, x):
        x = 0
    s = b"%o" % x
    if size - len(s) - 1 > 0:
        s = b"0" * (size - len(s) - 1) + s
    _put_string(blk, off, size, s)


def _set_ustar_and_checksum(blk: bytearray) -> bytes:
    blk[257:263] = _MAGIC_USTAR
    blk[263:265] = _VERSION_USTAR
    blk[148:156] = b"        "
    _put_octal(blk, 148, 7, sum(blk))
    blk[155] = 0x20
    return bytes(blk)


def _split_ustar_path(name: bytes) -> tuple[bytes, bytes] | None:
    length = len(name)
    if length <= 100 or not name.isascii():
        return None
    if length > 156:
        length = 156
    elif name[length - 1] == ord("/"):
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen, plen = len(name) - i - 1, i
    if i <= 0 or nlen > 100 or nlen == 0 or plen > 155:
        return None
    return name[:i], name[i + 1 :]


def format_pax_time(ns: int) -> bytes:
    secs, nsecs = divmod(ns, 1_000_000_000)
    if nsecs == 0:
        return b"%d" % secs
    sign = b""
    if secs < 0:
        sign = b"-"
        secs = -(secs + 1)
        nsecs = -(nsecs - 1_000_000_000)
    return (sign + b"%d.%09d" % (secs, nsecs)).rstrip(b"0")


def format_pax_record(k: str, v: bytes) -> bytes:
    kb = k.encode("utf-8", "surrogateescape")
    if not kb or b"=" in kb:
        raise err_header()
    size = len(kb) + len(v) + 3
    size += len(str(size))
    rec = b"%d %s=%s\n" % (size, kb, v)
    if len(rec) != size:
        rec = b"%d %s=%s\n" % (len(rec), kb, v)
    return rec


def _go_path_join(*parts: bytes) -> bytes:
    joined = b"/".join(p for p in parts if p)
    return posixpath.normpath(joined) if joined else b""


class TarWriter:
    """Write members the way Go's ``tar.Writer`` does for containerd's diff headers.

    ``write_header(hdr, pax=True)`` is Go with ``Format = FormatPAX`` (USTAR
    unless a field needs PAX records); ``pax=False`` is the default format,
    which rounds the mtime to the second and drops atime and ctime.
    """

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._remaining = 0
        self._pad = 0

    def _flush(self) -> None:
        if self._remaining:
            raise TarError(f"archive/tar: missed writing {self._remaining} bytes")
        if self._pad:
            self._write(bytes(self._pad))
            self._pad = 0

    def write_header(self, hdr: Header, pax: bool = True) -> None:
        self._flush()
        typeflag = hdr.typeflag
        if typeflag == TYPE_REGA:
            typeflag = TYPE_DIR if hdr.name.endswith(b"/") else TYPE_REG
        mtime_ns, atime_ns, ctime_ns = hdr.mtime_ns, hdr.atime_ns, hdr.ctime_ns
        if not pax:
            mtime_ns = (mtime_ns + 500_000_000) // 1_000_000_000 * 1_000_000_000
            atime_ns = ctime_ns = None
        records: dict[str, bytes] = {}
        ustar_ok, prefer_pax = True, False

        def verify_string(s: bytes, size: int, key: str) -> None:
            nonlocal ustar_ok
            if not s.isascii() or len(s) > size:
                if key != PAX_PATH or _split_ustar_path(s) is None:
                    ustar_ok = False
                records[key] = s

        def verify_numeric(n: int, size: int, key: str | None) -> None:
            nonlocal ustar_ok
            if not _fits_octal(size, n):
                ustar_ok = False
                if key is None:
                    raise TarError(f"archive/tar: cannot encode header: value {n} does not fit")
                records[key] = b"%d" % n

        def verify_time(ns: int | None, size: int, key: str) -> None:
            nonlocal ustar_ok, prefer_pax
            if ns is None:
                return
            secs = ns // 1_000_000_000
            is_mtime = key == PAX_MTIME
            fits = _fits_octal(size, secs)
            if not (is_mtime and fits):
                ustar_ok = False
            if not is_mtime or not fits or ns % 1_000_000_000:
                prefer_pax = True
                records[key] = format_pax_time(ns)

        verify_string(hdr.name, 100, PAX_PATH)
        verify_string(hdr.linkname, 100, PAX_LINKPATH)
        verify_string(hdr.uname, 32, PAX_UNAME)
        verify_string(hdr.gname, 32, PAX_GNAME)
        verify_numeric(hdr.mode, 8, None)
        verify_numeric(hdr.uid, 8, PAX_UID)
        verify_numeric(hdr.gid, 8, PAX_GID)
        verify_numeric(hdr.size, 12, PAX_SIZE)
        verify_numeric(hdr.devmajor, 8, None)
        verify_numeric(hdr.devminor, 8, None)
        verify_time(mtime_ns, 12, PAX_MTIME)
        verify_time(atime_ns, 12, PAX_ATIME)
        verify_time(ctime_ns, 12, PAX_CTIME)
        if typeflag in (TYPE_REG, TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO) and hdr.name.endswith(b"/"):
            raise TarError("archive/tar: filename may not have trailing slash")
        if hdr.pax:
            # PAXRecords restrict Go to PAX; basic keys never override fields.
            for k, v in hdr.pax.items():
                if k not in records and k not in _PAX_BASIC and not k.startswith("GNU.sparse"):
                    records[k] = v
            ustar_ok = False
        if pax and prefer_pax:
            ustar_ok = False  # Format PAX allows USTAR only when nothing prefers PAX

        if ustar_ok:
            self._write_ustar(hdr, typeflag, mtime_ns)
        else:
            self._write_pax(hdr, typeflag, mtime_ns, records)
        self._remaining = 0 if typeflag in _HEADER_ONLY else hdr.size
        self._pad = block_padding(self._remaining)

    def _template(self, hdr: Header, typeflag: int, mtime_ns: int, name: bytes, ascii_only: bool) -> bytearray:
        blk = bytearray(BLOCK_SIZE)
        conv = _to_ascii if ascii_only else (lambda s: s)
        blk[156] = typeflag
        _put_string(blk, 0, 100, conv(name))
        _put_string(blk, 157, 100, conv(hdr.linkname))
        _put_octal(blk, 100, 8, hdr.mode)
        _put_octal(blk, 108, 8, hdr.uid)
        _put_octal(blk, 116, 8, hdr.gid)
        _put_octal(blk, 124, 12, hdr.size)
        _put_octal(blk, 136, 12, mtime_ns // 1_000_000_000)
        _put_string(blk, 265, 32, conv(hdr.uname))
        _put_string(blk, 297, 32, conv(hdr.gname))
        _put_octal(blk, 329, 8, hdr.devmajor)
        _put_octal(blk, 337, 8, hdr.devminor)
        return blk

    def _write_ustar(self, hdr: Header, typeflag: int, mtime_ns: int) -> None:
        name, prefix = hdr.name, b""
        split = _split_ustar_path(name)
        if split:
            prefix, name = split
        blk = self._template(hdr, typeflag, mtime_ns, name, False)
        _put_string(blk, 345, 155, prefix)
        self._write(_set_ustar_and_checksum(blk))

    def _write_pax(self, hdr: Header, typeflag: int, mtime_ns: int, records: dict[str, bytes]) -> None:
        if records:
            data = b"".join(format_pax_record(k, records[k]) for k in sorted(records))
            if len(data) > MAX_SPECIAL_FILE_SIZE:
                raise err_field_too_long()
            d, _, f = hdr.name.rpartition(b"/")
            name = _go_path_join(d + b"/" if d else b"", b"PaxHeaders.0", f)
            name = _to_ascii(name)[:100].rstrip(b"/")
            raw = bytearray(BLOCK_SIZE)
            raw[156] = TYPE_XHEADER
            _put_string(raw, 0, 100, name)
            for off, size in ((100, 8), (108, 8), (116, 8), (136, 12)):
                _put_octal(raw, off, size, 0)
            _put_octal(raw, 124, 12, len(data))
            self._write(_set_ustar_and_checksum(raw))
            self._write(data)
            if block_padding(len(data)):
                self._write(bytes(block_padding(len(data))))
        blk = self._template(hdr, typeflag, mtime_ns, hdr.name, True)
        self._write(_set_ustar_and_checksum(blk))

    def write(self, data: bytes | memoryview) -> None:
        if len(data) > self._remaining:
            raise TarError("archive/tar: write too long")
        self._remaining -= len(data)
        self._write(data)

    def close(self) -> None:
        self._flush()
        self._write(bytes(2 * BLOCK_SIZE))
