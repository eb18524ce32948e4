# -*- test-case-name: tests.test_runtime_binary -*-
"""Running shim binaries: ``start`` and ``delete``, as containerd's ``runtime/v2/binary.go``.

The command line is containerd 1.6's (``shim.Command``)::

    <shim> -namespace <ns> -address <grpc socket> -publish-binary <binary> -id <id> [-debug] start
    <shim> -namespace <ns> -address <grpc socket> -publish-binary <binary> -id <id> -bundle <bundle> delete

with ``GOMAXPROCS=2`` and ``TTRPC_ADDRESS`` added to the daemon's environment,
the bundle as working directory and the task options (a marshalled ``Any``)
on stdin.  ``start`` prints the shim's ttrpc address; ``delete`` prints a
``DeleteResponse``.

The daemon holds grpcio objects, so it must never ``fork()``: processes are
started with ``reactor.spawnProcess(..., path=None)``, which Twisted turns
into ``posix_spawnp``.  posix_spawn cannot change the child's working
directory, so the command goes through ``env -C <bundle>`` (coreutils),
one cheap ``exec`` more.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.errors import CdtwistError
from cdtwist.log import get_logger
from cdtwist.runtime.bundle import Bundle

log = get_logger(__name__)

SHIM_BINARY_FORMAT = "containerd-shim-{}-{}"
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"
#: coreutils ``env``: ``env -C DIR CMD`` gives the child a working directory under posix_spawn.
ENV_BINARY = shutil.which("env") or "/usr/bin/env"


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


class _Collector(ProcessProtocol):
    """Feeds stdin, then collects stdout and stderr until the child is reaped."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred[ProcessResult] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        # The shim reads stdin to EOF (io.ReadAll): always close it.
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        exit_code: int | None = 0
        sig: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            exit_code = reason.value.exitCode
            sig = reason.value.signal
        elif not isinstance(reason.value, ProcessDone):
            exit_code = None
        self.done.callback(ProcessResult(exit_code, sig, b"".join(self.out), b"".join(self.err)))


def run_process(
    reactor: Any,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    stdin: bytes = b"",
    timeout: float | None = None,
) -> Deferred[ProcessResult]:
    """Spawn ``argv`` without forking (posix_spawn) and collect its output.

    ``cwd`` goes through ``env -C``; ``timeout`` kills the child (SIGKILL),
    as Go's ``exec.CommandContext`` does when its context ends.
    """
    proto = _Collector(stdin)
    args = list(argv)
    if cwd is not None:
        args = [ENV_BINARY, "-C", cwd, *args]
    # path=None, uid=None, gid=None: Twisted may use posix_spawnp instead of fork.
    transport = reactor.spawnProcess(proto, args[0], args, env=dict(env), path=None)
    if timeout is not None:
        timer = reactor.callLater(timeout, _kill, transport)

        def cancel_timer(result: ProcessResult) -> ProcessResult:
            if timer.active():
                timer.cancel()
            return result

        proto.done.addCallback(cancel_timer)
    return proto.done


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:  # already gone
        pass


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

    async def delete(self, reactor: Any, timeout: float | None = None) -> Exit:
        """Run ``delete`` (the shim cleans up after a dead instance of itself)."""
        log.info("cleaning up dead shim", id=self.bundle.id, namespace=self.bundle.namespace)
        argv, env = self.command(self.delete_args())
        try:
            result = await run_process(reactor, argv, env=env, cwd=self.bundle.path, timeout=timeout)
        except Exception as e:
            raise CdtwistError(f"failed to delete: {e}") from None
        stderr = result.stderr.decode(errors="replace")
        if not result.ok:
            log.error("failed to delete", cmd=" ".join(argv), error=result.describe())
            raise CdtwistError(f"{stderr}: {result.describe()}")
        if stderr:
            log.warn(f"cleanup warnings {stderr}")
        return parse_delete_output(result.stdout)


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
