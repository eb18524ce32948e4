# -*- test-case-name: tests.test_runtime_binary -*-
"""Running shim binaries: ``start`` and ``delete``, as containerd's ``runtime/v2/binary.go``.

The command line is containerd 1.6's (``shim.Command``)::

    <shim> -namespace <ns> -address <grpc socket> -publish-binary <binary> -id <id> [-debug] start
    <shim> -namespace <ns> -address <grpc socket> -publish-binary <binary> -id <id> -bundle <bundle> delete

with ``GOMAXPROCS=2`` and ``TTRPC_ADDRESS`` added to the daemon's environment,
the bundle as working directory and the task options (a marshalled ``Any``)
on stdin.  ``start`` prints the shim's ttrpc address; ``delete`` prints a
``DeleteResponse``.

The daemon holds grpcio objects, so it must never ``fork()``: commands start
through :mod:`subprocess`, which uses ``vfork()`` + ``exec`` (no
``pthread_atfork`` handlers, the parent's memory is never copied; the child
changes to the bundle dir itself, as Go's ``exec.Cmd.Dir`` does).  The
reactor then watches the child's pipes and a pidfd for its exit, so nothing
waits on a thread.  (Spawning through Twisted's ``spawnProcess`` cost the
reactor several milliseconds a command: it lists and probes every open
descriptor and every signal's disposition, and needed an ``env -C`` exec
for the working directory.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger
from cdtwist.runtime.bundle import Bundle

log = get_logger(__name__)

SHIM_BINARY_FORMAT = "containerd-shim-{}-{}"
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"


def binary_name(runtime: str) -> str:
    """``io.containerd.runc.v2`` -> ``containerd-shim-runc-v2``; "" for an invalid name."""
    parts = runtime.split(".")
    if len(parts) < 2:
        return ""
    return SHIM_BINARY_FORMAT.format(parts[-2], parts[-1])


def binary_path(runtime: str) -> str:
    """The shim binary beside a runtime given as a path-like name (Go's ``BinaryPath``)."""
    return os.path.abspath(os.path.join(os.path.dirname(runtime), binary_name(runtime)))


@dataclass
class Exit:
    """How a process ended (containerd's ``runtime.Exit``)."""

    pid: int = 0
    status: int = 0
    timestamp: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)


@dataclass
class ProcessResult:
    """What a finished child did."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """Go's ``ExitError`` text: ``exit status 1`` / ``signal: killed``."""
        if self.signal is not None:
            import signal as _signal

            try:
                name = _signal.strsignal(self.signal) or f"signal {self.signal}"
            except ValueError:
                name = f"signal {self.signal}"
            return f"signal: {name.lower()}"
        return f"exit status {self.exit_code}"


def run_process(
    reactor: Any,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Deferred[ProcessResult]:
    """Run ``argv`` (vfork + exec, never fork) and collect its output; fires on the reactor.

    The child runs in ``cwd``; ``timeout`` kills it (SIGKILL), as Go's
    ``exec.CommandContext`` does when its context ends.  The result comes once
    the child is reaped and its stdout and stderr are closed.  A child that
    cannot be started fails with Go's ``fork/exec <path>: <error>``.

    The child is started on the calling (reactor) thread; its pipes and a
    pidfd (readable once it exits) are watched by the reactor, so no thread
    hand-off lies between the child's exit and the result.  Without pidfds
    (Linux < 5.3) a thread of its own waits for the child instead.
    """
    if hasattr(os, "pidfd_open") and hasattr(reactor, "addReader"):
        try:
            return _ReactorChild(reactor, list(argv), dict(env), cwd, stdin, timeout).done
        except _NoPidfd:
            pass
    return _run_in_thread(reactor, list(argv), dict(env), cwd, stdin, timeout)


class _NoPidfd(Exception):
    """pidfd_open is not supported here (the child was killed and reaped)."""


def _spawn(
    argv: list[str], env: dict[str, str], cwd: str | None, stdin: int, stdout: int, stderr: int
) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd, close_fds=True)
    except OSError as e:
        raise CdtwistError(f"fork/exec {argv[0]}: {(e.strerror or str(e)).lower()}") from None


def _result(code: int, out: bytes, err: bytes) -> ProcessResult:
    if code < 0:
        return ProcessResult(None, -code, out, err)
    return ProcessResult(code, None, out, err)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Pipe:
    """One non-blocking descriptor the reactor watches for a :class:`_ReactorChild`."""

    def __init__(self, fd: int, on_event: Callable[[_Pipe], None]) -> None:
        self.fd = fd
        self.on_event = on_event

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "shim-exec"

    def doRead(self) -> None:  # noqa: N802
        self.on_event(self)

    def doWrite(self) -> None:  # noqa: N802
        self.on_event(self)

    def connectionLost(self, reason: object) -> None:  # noqa: N802
        # A hang-up without data (a pipe's EOF, a closed reader of stdin) arrives here, not in doRead.
        self.on_event(self)


class _ReactorChild:
    """A child whose stdin, stdout, stderr and exit the reactor watches."""

    def __init__(
        self, reactor: Any, argv: list[str], env: dict[str, str], cwd: str | None, stdin: bytes, timeout: float | None
    ) -> None:
        self.reactor = reactor
        self.done: Deferred[ProcessResult] = Deferred()
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.stdin = memoryview(stdin)
        self.code: int | None = None
        self.timer: Any = None
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = _spawn(argv, env, cwd, in_r, out_w, err_w)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            self.proc.kill()
            self.proc.wait()
            raise _NoPidfd() from None
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        self.stdin_pipe: _Pipe | None = _Pipe(in_w, self._write_stdin)
        self.readers = {_Pipe(out_r, self._read), _Pipe(err_r, self._read)}
        self.out_fd = out_r
        self.exit_pipe: _Pipe | None = _Pipe(self.pidfd, self._exited)
        for pipe in self.readers:
            reactor.addReader(pipe)
        reactor.addReader(self.exit_pipe)
        # The shim reads stdin to EOF (io.ReadAll): always close it.
        self._write_stdin(self.stdin_pipe)
        if timeout is not None and self.exit_pipe is not None:
            self.timer = reactor.callLater(timeout, self._kill)

    def _write_stdin(self, pipe: _Pipe) -> None:
        if pipe is not self.stdin_pipe:  # already closed
            return
        while self.stdin:
            try:
                n = os.write(pipe.fd, self.stdin)
            except BlockingIOError:
                self.reactor.addWriter(pipe)
                return
            except OSError:  # the child closed its stdin: nothing more to feed
                break
            self.stdin = self.stdin[n:]
        self.reactor.removeWriter(pipe)
        os.close(pipe.fd)
        self.stdin_pipe = None

    def _read(self, pipe: _Pipe) -> None:
        if pipe not in self.readers:  # already closed
            return
        chunks = self.out if pipe.fd == self.out_fd else self.err
        while True:
            try:
                data = os.read(pipe.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.reactor.removeReader(pipe)
                os.close(pipe.fd)
                self.readers.discard(pipe)
                self._maybe_done()
                return
            chunks.append(data)

    def _exited(self, pipe: _Pipe) -> None:
        if pipe is not self.exit_pipe:  # already closed
            return
        code = self.proc.poll()
        if code is None:  # not yet a zombie (cannot happen with a readable pidfd): wait for the next event
            return
        self.code = code
        self.reactor.removeReader(pipe)
        os.close(pipe.fd)
        self.exit_pipe = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self._maybe_done()

    def _kill(self) -> None:
        if self.exit_pipe is not None:
            try:
                self.proc.kill()
            except OSError:
                pass

    def _maybe_done(self) -> None:
        if self.code is None or self.readers or self.done.called:
            return
        if self.stdin_pipe is not None:
            self.reactor.removeWriter(self.stdin_pipe)
            os.close(self.stdin_pipe.fd)
            self.stdin_pipe = None
        self.done.callback(_result(self.code, b"".join(self.out), b"".join(self.err)))


def _run_in_thread(
    reactor: Any, argv: list[str], env: dict[str, str], cwd: str | None, stdin: bytes, timeout: float | None
) -> Deferred[ProcessResult]:
    d: Deferred[ProcessResult] = Deferred()

    def work() -> None:
        try:
            result = _run_blocking(argv, env, cwd, stdin, timeout)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=work, name="cdtwist-exec", daemon=True).start()
    return d


def _run_blocking(
    argv: list[str], env: dict[str, str], cwd: str | None, stdin: bytes, timeout: float | None
) -> ProcessResult:
    """On a thread of its own: start, feed stdin (then close it), collect, reap."""
    PIPE = subprocess.PIPE
    proc = _spawn(argv, env, cwd, PIPE, PIPE, PIPE)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return _result(proc.returncode, out, err)


@dataclass
class DeleteRun:
    """A ``delete`` command started by :meth:`ShimBinary.spawn_delete`."""

    argv: list[str]
    done: Deferred[ProcessResult]


@dataclass
class ShimBinary:
    """One bundle's shim binary and how to call it (containerd's ``binary``)."""

    bundle: Bundle
    runtime: str
    address: str
    ttrpc_address: str
    publish_binary: str
    debug: bool = False
    sched_core: bool = False
    environ: Mapping[str, str] | None = None

    def command(self, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """argv and environment for ``args`` (Go's ``shim.Command``)."""
        argv = [
            self.runtime,
            "-namespace",
            self.bundle.namespace,
            "-address",
            self.address,
            "-publish-binary",
            self.publish_binary,
            *args,
        ]
        env = dict(os.environ if self.environ is None else self.environ)
        env["GOMAXPROCS"] = "2"
        env[TTRPC_ADDRESS_ENV] = self.ttrpc_address
        if self.sched_core:
            env["SCHED_CORE"] = "1"
        return argv, env

    def start_args(self) -> list[str]:
        args = ["-id", self.bundle.id]
        if self.debug:
            args.append("-debug")
        args.append("start")
        return args

    def delete_args(self) -> list[str]:
        return ["-id", self.bundle.id, "-bundle", self.bundle.path, "delete"]

    async def start(self, reactor: Any, opts: any_pb2.Any | None) -> str:
        """Run ``start``; the shim's ttrpc address (its trimmed output)."""
        argv, env = self.command(self.start_args())
        stdin = opts.SerializeToString() if opts is not None else b""
        result = await run_process(reactor, argv, env=env, cwd=self.bundle.path, stdin=stdin)
        if not result.ok:
            out = (result.stdout + result.stderr).decode(errors="replace")
            raise CdtwistError(f"{out}: {result.describe()}")
        return parse_start_output(result.stdout)

    def spawn_delete(self, reactor: Any, timeout: float | None = None) -> DeleteRun:
        """Start ``delete`` now; :meth:`delete` collects it (and logs as if it had started it)."""
        argv, env = self.command(self.delete_args())
        try:
            done = run_process(reactor, argv, env=env, cwd=self.bundle.path, timeout=timeout)
        except Exception as e:
            done = fail(e)
        return DeleteRun(argv, done)

    async def delete(
        self,
        reactor: Any,
        timeout: float | None = None,
        started: DeleteRun | None = None,
        then: Callable[[], object] | None = None,
    ) -> Exit:
        """Run ``delete`` (the shim cleans up after a dead instance of itself), or collect ``started``.

        ``then`` is called once it succeeded, before its warnings are logged
        (the next step, e.g. removing the bundle, runs meanwhile).
        """
        log.info("cleaning up dead shim", id=self.bundle.id, namespace=self.bundle.namespace)
        run = started if started is not None else self.spawn_delete(reactor, timeout)
        argv = run.argv
        try:
            result = await run.done
        except Exception as e:
            raise CdtwistError(f"failed to delete: {e}") from None
        stderr = result.stderr.decode(errors="replace")
        if not result.ok:
            log.error("failed to delete", cmd=" ".join(argv), error=result.describe())
            raise CdtwistError(f"{stderr}: {result.describe()}")
        try:
            exit = parse_delete_output(result.stdout)
        except CdtwistError:
            if stderr:
                log.warn(f"cleanup warnings {stderr}")
            raise
        if then is not None:
            then()
        if stderr:
            log.warn(f"cleanup warnings {stderr}")
        return exit


def parse_start_output(out: bytes) -> str:
    """The address ``start`` printed (whitespace trimmed, as containerd does)."""
    address = out.decode(errors="replace").strip()
    if not address:
        raise CdtwistError("no shim address")
    return address


def parse_delete_output(out: bytes) -> Exit:
    """``delete`` prints a marshalled ``DeleteResponse``."""
    response = shim_pb2.DeleteResponse()
    try:
        response.ParseFromString(out)
    except DecodeError as e:
        raise CdtwistError(f"unexpected EOF: {e}") from None
    return Exit(pid=response.pid, status=response.exit_status, timestamp=response.exited_at)


def resolve_runtime_path(runtime: str, cache: dict[str, str], self_dir: str | None = None) -> str:
    """Go's ``resolveRuntimePath``: an absolute path as is, else ``containerd-shim-<name>-<version>``
    beside the name, on PATH, or beside the daemon's binary.  Blocking (stat)."""
    if not runtime:
        raise CdtwistError("no runtime name")
    if os.path.isabs(runtime):
        try:
            os.stat(runtime)
        except OSError as e:
            raise CdtwistError(f"invalid custom binary path: stat {runtime}: {e.strerror.lower()}") from None
        return runtime
    name = binary_name(runtime)
    if not name:
        raise CdtwistError(
            f"invalid runtime name {runtime}, correct runtime name should be either format like "
            "`io.containerd.runc.v1` or a full path to the binary"
        )
    cached = cache.get(name)
    if cached is not None:
        return cached
    cmd_path = ""
    path = binary_path(runtime)
    if os.path.exists(path):
        cmd_path = path
    if not cmd_path:
        found = shutil.which(name)
        if found:
            cmd_path = found
        else:
            beside = os.path.join(self_dir or os.path.dirname(os.path.abspath(sys.executable)), name)
            if os.path.exists(beside):
                cmd_path = beside
            else:
                raise CdtwistError(f'runtime "{runtime}" binary not installed "{name}": file does not exist')
    cmd_path = os.path.abspath(cmd_path)
    return cache.setdefault(name, cmd_path)
