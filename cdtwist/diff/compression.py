# -*- test-case-name: tests.test_diff_compression -*-
"""Layer compression and media types, as containerd's ``archive/compression`` and ``images``.

Decompression detects the format by its magic, like Go's ``DecompressStream``
(a layer's media type may lie: Docker's plain ``tar`` type is often gzip).
gzip goes through ``unpigz`` when it is installed (and
``CONTAINERD_DISABLE_PIGZ`` does not say otherwise), else zlib; zstd uses the
``zstandard`` module when present, else the ``zstd`` command.  Everything is
streamed in bounded chunks.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO, Protocol

from cdtwist.errors import CdtwistError, NotImplemented_
from cdtwist.log import get_logger

try:  # optional: the zstd command is the fallback
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the machine
    _zstd = None

_log = get_logger(__name__)

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"

MEDIA_TYPE_IMAGE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_IMAGE_LAYER_GZIP = MEDIA_TYPE_IMAGE_LAYER + "+gzip"
MEDIA_TYPE_IMAGE_LAYER_ZSTD = MEDIA_TYPE_IMAGE_LAYER + "+zstd"
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP = MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE + "+gzip"
MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_ZSTD = MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE + "+zstd"
MEDIA_TYPE_DOCKER_SCHEMA2_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MEDIA_TYPE_IMAGE_LAYER_ENCRYPTED = MEDIA_TYPE_IMAGE_LAYER + "+encrypted"
MEDIA_TYPE_IMAGE_LAYER_GZIP_ENCRYPTED = MEDIA_TYPE_IMAGE_LAYER_GZIP + "+encrypted"

DISABLE_PIGZ_ENV = "CONTAINERD_DISABLE_PIGZ"
CHUNK_SIZE = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Compression(enum.IntEnum):
    """Go's ``compression.Compression``."""

    UNCOMPRESSED = 0
    GZIP = 1
    ZSTD = 2

    @property
    def extension(self) -> str:
        return {Compression.GZIP: "gz", Compression.ZSTD: "zst"}.get(self, "")


# -- media types (images/mediatypes.go) --


def parse_media_type(mt: str) -> tuple[str, list[str]]:
    """Base type and sorted ``+`` extensions."""
    if not mt:
        return "", []
    base, *ext = mt.split("+")
    return base, sorted(ext)


def diff_compression(media_type: str) -> str:
    """The compression a layer media type declares: ``""``, ``"gzip"``, ``"zstd"`` or ``"unknown"``.

    ``unknown`` (Docker's plain tar, which may be compressed anyway) means
    detect it; a wrapped type (``+encrypted``...) is ``""`` — for a stream
    processor to handle.  Non-layer types raise :class:`NotImplemented_`.
    """
    base, ext = parse_media_type(media_type)
    if base in (MEDIA_TYPE_DOCKER_SCHEMA2_LAYER, MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN):
        return "" if ext else "unknown"
    if base in (MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP, MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP):
        return "" if ext else "gzip"
    if base in (MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE):
        if ext and ext[-1] in ("gzip", "zstd"):
            return ext[-1]
        return ""
    raise NotImplemented_(f"unrecognised mediatype {media_type}")


def is_non_distributable(mt: str) -> bool:
    return mt.startswith("application/vnd.oci.image.layer.nondistributable.") or mt.startswith(
        "application/vnd.docker.image.rootfs.foreign."
    )


def is_layer_type(mt: str) -> bool:
    if mt.startswith("application/vnd.oci.image.layer."):
        return True
    base, _ = parse_media_type(mt)
    return base in (
        MEDIA_TYPE_DOCKER_SCHEMA2_LAYER,
        MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP,
        MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN,
        MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP,
    )


def is_docker_type(mt: str) -> bool:
    return mt.startswith("application/vnd.docker.")


# -- detection and decompression --


def detect_compression(head: bytes) -> Compression:
    """Go's ``DetectCompression`` on the first bytes of a stream (10 are enough)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    if len(head) >= 8 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50:
        return Compression.ZSTD  # skippable frame
    return Compression.UNCOMPRESSED


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class DecompressReader:
    """A decompressed stream (``read``/``close``) that knows what it was (``compression``)."""

    def __init__(self, read: Callable[[int], bytes], compression: Compression, close: Callable[[], None]) -> None:
        self._read = read
        self.compression = compression
        self._close = close
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self._read(CHUNK_SIZE), b""))
        return self._read(n) if n else b""

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> DecompressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Peeked:
    """A reader with its first bytes put back."""

    def __init__(self, head: bytes, src: Reader) -> None:
        self._head = head
        self._src = src

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                head, self._head = self._head, b""
                return head
            head, self._head = self._head[:n], self._head[n:]
            return head
        return self._src.read(n)


def _peek(src: Reader, n: int) -> bytes:
    head = b""
    while len(head) < n:
        data = src.read(n - len(head))
        if not data:
            break
        head += data
    return head


class _GzipReader:
    """Streaming multi-member gzip, checked like Go's ``gzip.Reader`` (CRC, length, no garbage)."""

    def __init__(self, src: Reader) -> None:
        self._src = src
        self._d = zlib.decompressobj(31)
        self._in = b""
        self._eof = False

    def read(self, n: int) -> bytes:
        while not self._eof:
            if self._d.eof:
                rest = self._d.unused_data + self._in
                while len(rest) < 3:
                    more = self._src.read(CHUNK_SIZE)
                    if not more:
                        break
                    rest += more
                if not rest:
                    self._eof = True
                    break
                if not rest.startswith(_GZIP_MAGIC[:2]):
                    raise CdtwistError("gzip: invalid header")
                self._d = zlib.decompressobj(31)
                self._in = rest
            if not self._in:
                self._in = self._src.read(CHUNK_SIZE)
                if not self._in:
                    raise CdtwistError("unexpected EOF")
            try:
                out = self._d.decompress(self._in, n)
            except zlib.error as e:
                raise CdtwistError(f"gzip: {e}") from e
            self._in = self._d.unconsumed_tail
            if out:
                return out
        return b""


class _ProcessReader:
    """Output of a filter process fed from ``src`` by a thread (Go's ``cmdStream``)."""

    def __init__(self, argv: list[str], src: Reader) -> None:
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True
        )
        self._src = src
        self._stderr = b""
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, name=f"{argv[0]}-feed", daemon=True)
        self._feeder.start()
        self._errt = threading.Thread(target=self._read_stderr, name=f"{argv[0]}-stderr", daemon=True)
        self._errt.start()
        self._done = False

    def _feed(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while data := self._src.read(CHUNK_SIZE):
                stdin.write(data)
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by read()
            self._feed_error = e
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        while data := self._proc.stderr.read(4096):
            self._stderr = (self._stderr + data)[-65536:]

    def read(self, n: int) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read1(n) if n > 0 else b""
        if data or n == 0:
            return data
        if not self._done:
            self._done = True
            rc = self._proc.wait()
            self._feeder.join()
            self._errt.join()
            if self._feed_error is not None:
                raise CdtwistError(str(self._feed_error)) from self._feed_error
            if rc != 0:
                raise CdtwistError(f"exit status {rc}: {self._stderr.decode(errors='replace')}")
        return b""

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdout, self._proc.stderr):
            if f is not None:
                f.close()
        self._feeder.join(timeout=5)
        self._errt.join(timeout=5)


_pigz_lock = threading.Lock()
_pigz_path: str | None | bool = False  # False: not looked up yet


def unpigz_path() -> str | None:
    """``unpigz`` unless absent or disabled by ``CONTAINERD_DISABLE_PIGZ`` (looked up once)."""
    global _pigz_path
    with _pigz_lock:
        if _pigz_path is False:
            path = shutil.which("unpigz")
            value = os.environ.get(DISABLE_PIGZ_ENV, "")
            if path and value:
                disable = _parse_bool(value)
                if disable is None:
                    _log.warn("could not parse {env}: {value}", env=DISABLE_PIGZ_ENV, value=value)
                elif disable:
                    path = None
            _pigz_path = path
        return _pigz_path or None


def _parse_bool(v: str) -> bool | None:
    """Go's ``strconv.ParseBool``."""
    if v in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if v in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


class _ZstdFrames:
    """Follows zstd frame structure on the compressed bytes, to tell a clean end from a cut.

    ``zstandard``'s stream reader ends quietly on a truncated frame; Go's
    decoder says ``unexpected EOF``.  Only headers are parsed; block
    contents are skipped by their sizes.
    """

    def __init__(self, src: Reader) -> None:
        self._src = src
        self._need = 0  # bytes of content to skip
        self._hdr = b""  # partial header being assembled
        self._state = "magic"
        self._fhd = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if not data:
            if self._state != "magic" or self._hdr or self._need:
                raise CdtwistError("unexpected EOF")
            return data
        view = memoryview(data)
        while view:
            if self._need:
                take = min(self._need, len(view))
                self._need -= take
                view = view[take:]
                continue
            want = self._want()
            take = min(want - len(self._hdr), len(view))
            self._hdr += bytes(view[:take])
            view = view[take:]
            if len(self._hdr) == want:
                hdr, self._hdr = self._hdr, b""
                self._step(hdr)
        return data

    def _want(self) -> int:
        if self._state == "magic":
            return 4
        if self._state == "skippable":
            return 4
        if self._state == "fhd":
            return 1
        if self._state == "frame_header":
            fhd = self._fhd
            single = fhd >> 5 & 1
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            return (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
        if self._state == "block":
            return 3
        if self._state == "checksum":
            return 4
        raise AssertionError(self._state)

    def _step(self, hdr: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(hdr, "little")
            if magic == 0xFD2FB528:
                self._state = "fhd"
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state = "skippable"
            else:
                raise CdtwistError("zstd: invalid input: magic number mismatch")
        elif self._state == "skippable":
            self._need = int.from_bytes(hdr, "little")
            self._state = "magic"
        elif self._state == "fhd":
            self._fhd = hdr[0]
            self._state = "frame_header" if self._want() else "block"
        elif self._state == "frame_header":
            self._state = "block"
        elif self._state == "block":
            v = int.from_bytes(hdr, "little")
            last, kind, size = v & 1, v >> 1 & 3, v >> 3
            self._need = 1 if kind == 1 else size
            if last:
                self._state = "checksum" if self._fhd & 4 else "magic"
        elif self._state == "checksum":
            self._state = "magic"


def _zstd_reader(src: Reader) -> tuple[Callable[[int], bytes], Callable[[], None]]:
    if _zstd is not None:
        r = _zstd.ZstdDecompressor().stream_reader(_ZstdFrames(src), read_size=CHUNK_SIZE, read_across_frames=True)

        def read(n: int) -> bytes:
            try:
                return r.read(n)
            except _zstd.ZstdError as e:
                raise CdtwistError(f"zstd: {e}") from e

        return read, r.close
    zstd = shutil.which("zstd")
    if zstd is None:
        raise NotImplemented_("zstd decompression needs the zstandard module or the zstd command")
    p = _ProcessReader([zstd, "-d", "-c", "-q"], src)
    return p.read, p.close


def decompress_stream(src: Reader, *, use_pigz: bool | None = None) -> DecompressReader:
    """Go's ``DecompressStream``: sniff the first bytes and decompress as needed.

    An empty stream is an empty uncompressed one (docker/docker#18170).
    """
    head = _peek(src, 10)
    compression = detect_compression(head)
    stream = _Peeked(head, src)
    if compression == Compression.UNCOMPRESSED:
        return DecompressReader(stream.read, compression, lambda: None)
    if compression == Compression.GZIP:
        pigz = unpigz_path() if use_pigz is None else (shutil.which("unpigz") if use_pigz else None)
        if pigz:
            p = _ProcessReader([pigz, "-d", "-c"], stream)
            return DecompressReader(p.read, compression, p.close)
        return DecompressReader(_GzipReader(stream).read, compression, lambda: None)
    read, close = _zstd_reader(stream)
    return DecompressReader(read, compression, close)


# -- compression --


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class CompressWriter:
    """``write``/``close`` onto ``dest``; ``close`` flushes the trailer but leaves ``dest`` open."""

    def __init__(self, dest: Writer, compression: Compression, level: int | None = None) -> None:
        self._dest = dest
        self.compression = compression
        self._closed = False
        if compression == Compression.UNCOMPRESSED:
            self._c = None
        elif compression == Compression.GZIP:
            self._c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION if level is None else level, zlib.DEFLATED, 31)
        elif compression == Compression.ZSTD:
            if _zstd is None:
                raise NotImplemented_("zstd compression needs the zstandard module")
            self._c = _zstd.ZstdCompressor(level=3 if level is None else level).compressobj()
        else:
            raise CdtwistError(f"unsupported compression format {Compression(compression).extension}")

    def write(self, data: bytes | memoryview) -> int:
        if self._c is None:
            self._dest.write(data)
        else:
            out = self._c.compress(data)
            if out:
                self._dest.write(out)
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._c is not None:
            out = self._c.flush()
            if out:
                self._dest.write(out)


def compress_stream(dest: Writer, compression: Compression, level: int | None = None) -> CompressWriter:
    """Go's ``CompressStream``."""
    return CompressWriter(dest, compression, level)


def open_layer(src: BinaryIO) -> DecompressReader:
    """Shorthand: the uncompressed tar of a layer blob, whatever its compression."""
    return decompress_stream(src)
