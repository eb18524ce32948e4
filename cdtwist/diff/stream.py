# -*- test-case-name: tests.test_diff_stream -*-
"""Stream processors, as containerd's ``diff/stream.go`` and ``diff/stream_unix.go``.

A layer blob becomes an uncompressed tar through a chain of processors:
each handler looks at the current media type and, if it accepts it, wraps
the stream.  The built-in handler decompresses layer types; ``[stream_processors]``
entries from the config run an external binary with the stream on stdin, the
processed stream read from its stdout, ``STREAM_PROCESSOR_MEDIATYPE`` in its
environment and, when the apply request carries a payload for its id, that
``google.protobuf.Any`` (serialized) readable on fd 3.  Handlers registered
later are asked first, so configured processors win over the built-in one.

Blocking API, for a thread.  Each binary is reaped: at the end of its output
(``read`` returns ``b""`` after waiting for it, bounded by ``wait_timeout``)
or on ``close`` (killed, then reaped), so no zombie outlives its chain.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cdtwist.diff import compression
from cdtwist.diff.compression import MEDIA_TYPE_IMAGE_LAYER, Reader
from cdtwist.errors import CdtwistError

MEDIA_TYPE_ENV_VAR = "STREAM_PROCESSOR_MEDIATYPE"
PAYLOAD_FD = 3
MAX_CHAIN = 16
CHUNK_SIZE = 1 << 20


class NoProcessor(CdtwistError):
    """Go's ``ErrNoProcessor`` (plain error)."""

    text = "no processor for media-type"


class StreamProcessor(Protocol):
    """A stream turned into ``media_type``."""

    media_type: str

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


Payloads = Mapping[str, object]
ProcessorInit = Callable[["StreamProcessor", Payloads], "StreamProcessor"]
Handler = Callable[[str], "ProcessorInit | None"]


class ProcessorChain:
    """The root of a chain: the blob itself, under its declared media type."""

    def __init__(self, media_type: str, reader: Reader) -> None:
        self.media_type = media_type
        self._r = reader

    def read(self, n: int = -1) -> bytes:
        return self._r.read(n)

    def close(self) -> None:
        pass


class _StdProcessor:
    """An uncompressed layer passed through (Go's ``stdProcessor``)."""

    media_type = MEDIA_TYPE_IMAGE_LAYER

    def __init__(self, stream: StreamProcessor) -> None:
        self._s = stream

    def read(self, n: int = -1) -> bytes:
        return self._s.read(n)

    def close(self) -> None:
        pass


class _CompressedProcessor:
    media_type = MEDIA_TYPE_IMAGE_LAYER

    def __init__(self, rc: compression.DecompressReader) -> None:
        self._rc = rc

    def read(self, n: int = -1) -> bytes:
        return self._rc.read(n)

    def close(self) -> None:
        self._rc.close()


def compressed_handler(media_type: str) -> ProcessorInit | None:
    """The built-in handler: layer media types, decompressed by sniffing."""
    try:
        compressed = compression.diff_compression(media_type)
    except CdtwistError:
        return None
    if compressed:
        return lambda stream, payloads: _CompressedProcessor(compression.decompress_stream(stream))
    return lambda stream, payloads: _StdProcessor(stream)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    serialize = getattr(payload, "SerializeToString", None)
    if serialize is None:
        raise TypeError(f"payload must be bytes or a protobuf message, not {type(payload).__name__}")
    return serialize(deterministic=True)


def _high_fd(fd: int) -> int:
    """A close-on-exec duplicate above the child's standard fds, so dup2 ordering is safe."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


class BinaryProcessor:
    """An external processor (Go's ``binaryProcessor``); its stdout is this stream."""

    def __init__(
        self,
        input_media_type: str,
        returns_media_type: str,
        stream: StreamProcessor,
        path: str,
        args: Sequence[str] = (),
        env: Sequence[str] = (),
        payload: object | None = None,
        wait_timeout: float = 60.0,
    ) -> None:
        self.media_type = returns_media_type
        self.wait_timeout = wait_timeout
        self._err: CdtwistError | None = None
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        self._reaped = False
        self._lock = threading.Lock()

        exe = path if "/" in path else shutil.which(path)
        if exe is None:
            raise CdtwistError(f'exec: "{path}": executable file not found in $PATH')
        environ = dict(os.environ)
        for kv in env:
            k, _, v = kv.partition("=")
            environ[k] = v
        environ[MEDIA_TYPE_ENV_VAR] = input_media_type

        to_close: list[int] = []
        try:
            detach = getattr(stream, "detach_fd", None)
            if callable(detach):
                # Hand the previous binary's output straight to this one (Go's RawProcessor).
                raw = detach()
                stdin = _high_fd(raw)
                os.close(raw)
            else:
                r, w = os.pipe()
                stdin = _high_fd(r)
                os.close(r)
                self._start_feeder(stream, w)
            to_close.append(stdin)
            out_r, out_w = os.pipe()
            self._out = out_r
            wfd = _high_fd(out_w)
            os.close(out_w)
            to_close.append(wfd)
            self._stderr = tempfile.TemporaryFile()
            errfd = _high_fd(self._stderr.fileno())
            to_close.append(errfd)
            actions = [
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, wfd, 1),
                (os.POSIX_SPAWN_DUP2, errfd, 2),
            ]
            if payload is not None:
                data = _payload_bytes(payload)
                pr, pw = os.pipe()
                pfd = _high_fd(pr)
                os.close(pr)
                to_close.append(pfd)
                threading.Thread(target=_write_all, args=(pw, data), name="stream-payload", daemon=True).start()
                actions.append((os.POSIX_SPAWN_DUP2, pfd, PAYLOAD_FD))
            self.pid = os.posix_spawn(exe, [path, *args], environ, file_actions=actions)
        except BaseException:
            # A feeder stops by itself: its pipe has no reader once stdin is closed below.
            for f in ("_out",):
                if hasattr(self, f):
                    os.close(getattr(self, f))
            if hasattr(self, "_stderr"):
                self._stderr.close()
            raise
        finally:
            for fd in to_close:
                os.close(fd)

    def _start_feeder(self, stream: StreamProcessor, w: int) -> None:
        def feed() -> None:
            try:
                while data := stream.read(CHUNK_SIZE):
                    _write_all(w, data, close=False)
            except BrokenPipeError:
                pass
            except BaseException as e:  # noqa: BLE001 - reported through err()
                self._feed_error = e
            finally:
                os.close(w)

        self._feeder = threading.Thread(target=feed, name="stream-processor-feed", daemon=True)
        self._feeder.start()

    def detach_fd(self) -> int:
        """Give up the read end of the output to the caller (a next binary's stdin)."""
        fd, self._out = self._out, -1
        return fd

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        data = os.read(self._out, n)
        if not data and n:
            self._wait(self.wait_timeout)
        return data

    def _wait(self, timeout: float | None) -> None:
        """Reap the child (at most ``timeout`` seconds, then kill) and record its failure."""
        with self._lock:
            if self._reaped:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                while True:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        os.kill(self.pid, 9)
                        _, status = os.waitpid(self.pid, 0)
                        break
                    time.sleep(0.005)
            except ChildProcessError:
                status = 0  # reaped elsewhere (a process-wide SIGCHLD reaper): nothing to report
            self._reaped = True
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                self._stderr.seek(0)
                msg = self._stderr.read(65536).decode(errors="replace")
                self._err = CdtwistError(msg or f"exit status {code}")
            self._stderr.close()

    def err(self) -> CdtwistError | None:
        """Why the binary failed (its stderr); reaps it first (bounded by ``wait_timeout``)."""
        self._wait(self.wait_timeout)
        if self._err is None and self._feed_error is not None:
            return CdtwistError(str(self._feed_error))
        return self._err

    def close(self) -> None:
        if self._out >= 0:
            os.close(self._out)
            self._out = -1
        with self._lock:
            if not self._reaped:
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
        self._wait(None)
        if self._feeder is not None:
            self._feeder.join(timeout=5)


def _write_all(fd: int, data: bytes, close: bool = True) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        if not close:
            raise
    finally:
        if close:
            os.close(fd)


def binary_handler(
    id: str, returns_media_type: str, media_types: Iterable[str], path: str, args: Sequence[str], env: Sequence[str]
) -> Handler:
    """Go's ``BinaryHandler``: run ``path`` for the accepted media types."""
    accepted = frozenset(media_types)

    def handler(media_type: str) -> ProcessorInit | None:
        if media_type not in accepted:
            return None

        def init(stream: StreamProcessor, payloads: Payloads) -> StreamProcessor:
            return BinaryProcessor(media_type, returns_media_type, stream, path, args, env, payloads.get(id))

        return init

    return handler


@dataclass
class ProcessorRegistry:
    """The handlers of one daemon (Go keeps them in a package global)."""

    handlers: list[Handler] = field(default_factory=lambda: [compressed_handler])

    def register(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def register_config(self, processors: Mapping[str, object]) -> None:
        """Register ``[stream_processors]`` (objects with accepts/returns/path/args/env), by id order."""
        for id in sorted(processors):
            p = processors[id]
            self.register(
                binary_handler(
                    id,
                    getattr(p, "returns", ""),
                    getattr(p, "accepts", []),
                    getattr(p, "path", ""),
                    getattr(p, "args", []),
                    getattr(p, "env", []),
                )
            )

    def get_processor(self, stream: StreamProcessor, payloads: Payloads | None = None) -> StreamProcessor:
        for handler in reversed(self.handlers):
            init = handler(stream.media_type)
            if init is not None:
                return init(stream, payloads or {})
        raise NoProcessor()

    def open(self, media_type: str, reader: Reader, payloads: Payloads | None = None) -> LayerStream:
        """The uncompressed tar of a blob of ``media_type`` (the loop in Go's ``fsApplier.Apply``)."""
        chain: list[StreamProcessor] = []
        processor: StreamProcessor = ProcessorChain(media_type, reader)
        chain.append(processor)
        try:
            while True:
                if len(chain) > MAX_CHAIN:
                    raise CdtwistError(f"failed to get stream processor for {media_type}: chain too long")
                try:
                    processor = self.get_processor(processor, payloads)
                except CdtwistError as e:
                    raise CdtwistError(f"failed to get stream processor for {media_type}: {e}") from e
                chain.append(processor)
                if processor.media_type == MEDIA_TYPE_IMAGE_LAYER:
                    break
        except BaseException:
            for p in reversed(chain):
                p.close()
            raise
        return LayerStream(chain)


class LayerStream:
    """The end of a processor chain: ``read`` the tar, then ``check`` every processor, then ``close``."""

    def __init__(self, chain: list[StreamProcessor]) -> None:
        self.chain = chain

    def read(self, n: int = -1) -> bytes:
        return self.chain[-1].read(n)

    def check(self) -> None:
        """Raise the first failure a processor reported (Go checks ``Err()`` after the copy)."""
        for p in self.chain:
            err = getattr(p, "err", None)
            if callable(err) and (e := err()) is not None:
                raise e

    def close(self) -> None:
        for p in reversed(self.chain):
            p.close()

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
