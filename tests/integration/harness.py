"""Run the real cdtwist and containerd daemons on temp dirs and drive them with the real ``ctr``.

Everything here is blocking (subprocesses, sockets, threads): integration
tests are plain synchronous trial tests, no reactor involved.

* :class:`CdtwistDaemon` / :class:`ContainerdDaemon`: a daemon on its own
  short temp dir (UNIX socket paths must stay under 108 bytes), its output
  captured to a log file, started and checked for readiness, stopped with
  SIGTERM then SIGKILL.  :meth:`DaemonProcess.cleanup` also fails if the
  daemon needed SIGKILL or left processes behind.
* :func:`start_cdtwist` / :func:`start_containerd`: a started daemon whose
  cleanup is registered on the test case.
* :class:`SharedDaemon` + :func:`module_suite`: one daemon shared by the
  tests of a module (started on first use, stopped after the module's last
  test); a test run on its own gets a private daemon instead.
* :func:`ctr`, :class:`BackgroundCtr`: the real ``ctr`` binary, with timeouts.
* :func:`normalise`: timestamps, temp paths and addresses replaced by
  placeholders so outputs of two daemons can be compared.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.runner import ErrorHolder, TestLoader

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_DIR = os.path.join(REPO_ROOT, "tests", "data")

CTR = "ctr"
CONTAINERD = "containerd"

#: ``python3 -m twisted.scripts.twistd`` has no ``__main__`` guard (it runs
#: nothing), so call its ``run`` the way the ``twistd`` console script does.
TWISTD_MAIN = 'import sys; sys.argv[0] = "twistd"; from twisted.scripts.twistd import run; run()'

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CTR_TIMEOUT = 30.0

#: sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


class DaemonError(AssertionError):
    """A daemon did not start, stop or behave as the harness expects (a test failure)."""


# --- requirements --------------------------------------------------------------


def require_binaries(*names: str) -> None:
    """SkipTest unless every binary is on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise unittest.SkipTest(f"binaries not found on PATH: {', '.join(missing)}")


def require_root() -> None:
    """SkipTest unless running as root (containerd needs it)."""
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root privileges")


# --- ctr -------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a command did: exit status and its decoded output."""

    rc: int
    stdout: str
    stderr: str
    args: tuple[str, ...] = ()

    def ok(self) -> Result:
        """Self, or DaemonError with the whole result if the command failed."""
        if self.rc != 0:
            raise DaemonError(f"{' '.join(self.args)} failed:\n{self}")
        return self

    def __str__(self) -> str:
        return f"rc={self.rc}\n--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


def _ctr_env() -> dict[str, str]:
    """The environment without CONTAINERD_* variables that would change ctr's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}


def ctr_args(address: str, *args: str, namespace: str | None = None) -> list[str]:
    cmd = [CTR, "--address", address]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    return cmd + list(args)


def ctr(
    address: str,
    *args: str,
    namespace: str | None = None,
    timeout: float = CTR_TIMEOUT,
    input: str | None = None,
) -> Result:
    """Run the real ``ctr`` against ``address``; DaemonError if it hangs past ``timeout``."""
    cmd = ctr_args(address, *args, namespace=namespace)
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_ctr_env(),
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise DaemonError(f"{' '.join(cmd)} did not finish within {timeout}s (stdout so far: {e.stdout!r})")
    return Result(proc.returncode, proc.stdout, proc.stderr, tuple(cmd))


class BackgroundCtr:
    """A long-running ``ctr`` (``ctr events``) whose output is collected line by line."""

    def __init__(self, address: str, *args: str, namespace: str | None = None) -> None:
        self.args = tuple(ctr_args(address, *args, namespace=namespace))
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_ctr_env(),
        )
        self._cond = threading.Condition()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._eof = 0
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Iterable[str], into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof += 1
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        """A copy of the stdout lines once ``predicate`` holds; DaemonError on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.stdout_lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof == len(self._readers):
                    raise DaemonError(
                        f"{' '.join(self.args)}: expected output not seen "
                        f"({'exited' if self._eof == len(self._readers) else 'timeout'});\n"
                        f"stdout: {self.stdout_lines!r}\nstderr: {self.stderr_lines!r}"
                    )
                self._cond.wait(min(remaining, 0.2))
            return list(self.stdout_lines)

    def wait_exit(self, timeout: float = 10.0) -> Result:
        """The result once ctr exits by itself; DaemonError if it is still running."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"{' '.join(self.args)} still running after {timeout}s")
        return self._result()

    def stop(self) -> Result:
        """Terminate ctr (SIGKILL if it ignores SIGTERM) and return what it printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self._result()

    def _result(self) -> Result:
        for reader in self._readers:
            reader.join(5)
        with self._cond:
            return Result(self.proc.returncode, "".join(self.stdout_lines), "".join(self.stderr_lines), self.args)


# --- daemons -----------------------------------------------------------------------


def make_short_tmpdir(prefix: str = "cdti") -> str:
    """A fresh dir directly under /tmp: trial's _trial_temp paths are too long for sockets."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_str(value: str) -> str:
    """A TOML basic string (paths here never hold quotes or backslashes, but be safe)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_toml(extra: str) -> tuple[str, str]:
    """``extra`` cut before its first table header: (top-level keys, tables)."""
    lines = extra.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("["):
            return "".join(lines[:i]), "".join(lines[i:])
    return extra, ""


def socket_accepts(path: str) -> bool:
    """True if something accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def processes_referencing(path: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of processes other than us whose cwd or command line mentions ``path``."""
    found = []
    me = os.getpid()
    mention = re.compile(re.escape(path) + r"(?:/|\s|$)")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if not cmdline:
            continue  # zombie or kernel thread
        if mention.search(cmdline) or cwd == path or cwd.startswith(path + "/"):
            found.append((int(entry), cmdline))
    return found


class DaemonProcess:
    """One daemon on ``tmpdir``: config, log file, process; subclasses say how to run it.

    ``tmpdir=None`` creates (and later removes) a short dir under /tmp.
    ``extra_config`` is TOML added to the generated config: its top-level
    keys go before the generated tables, its tables after them (it must not
    repeat a generated table).  ``config_text`` replaces the generated
    config entirely (use :attr:`root`, :attr:`state`, :attr:`address`).
    """

    name = "daemon"
    #: tables the generated config writes; extra_config must not repeat them.
    generated_tables: tuple[str, ...] = ("grpc", "ttrpc")

    def __init__(
        self,
        tmpdir: str | None = None,
        extra_config: str = "",
        *,
        config_text: str | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.owns_tmpdir = tmpdir is None
        self.tmpdir = tmpdir if tmpdir is not None else make_short_tmpdir()
        os.makedirs(self.tmpdir, exist_ok=True)
        self.root = os.path.join(self.tmpdir, "root")
        self.state = os.path.join(self.tmpdir, "state")
        self.temp = os.path.join(self.tmpdir, "tmp")
        self.address = os.path.join(self.tmpdir, "c.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = os.path.join(self.tmpdir, "config.toml")
        self.log_path = os.path.join(self.tmpdir, "daemon.log")
        if len(self.ttrpc_address.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path {self.ttrpc_address!r} is too long; use a shorter tmpdir")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False
        self._cleaned = False
        self.write_config(extra_config, config_text=config_text)

    @classmethod
    def check_requirements(cls) -> None:
        """SkipTest if this daemon cannot run here."""
        require_binaries(CTR)

    # -- configuration --------------------------------------------------------

    def config_head(self) -> str:
        """Top-level keys of the generated config."""
        return (
            "version = 2\n"
            f"root = {toml_str(self.root)}\n"
            f"state = {toml_str(self.state)}\n"
            f"temp = {toml_str(self.temp)}\n"
        )

    def config_tables(self) -> str:
        """Tables of the generated config."""
        return (
            f"\n[grpc]\n  address = {toml_str(self.address)}\n"
            f"\n[ttrpc]\n  address = {toml_str(self.ttrpc_address)}\n"
        )

    def render_config(self, extra_config: str = "") -> str:
        top, tables = split_toml(extra_config)
        for table in self.generated_tables:
            if re.search(rf"^\s*\[{re.escape(table)}\]", tables, re.M):
                raise ValueError(f"extra_config must not repeat the generated [{table}] table")
        return self.config_head() + top + self.config_tables() + ("\n" + tables if tables else "")

    def write_config(self, extra_config: str = "", *, config_text: str | None = None) -> str:
        """(Re)write the config file; a running daemon sees it on SIGHUP."""
        text = config_text if config_text is not None else self.render_config(extra_config)
        with open(self.config_path, "w") as f:
            f.write(text)
        return text

    # -- process ---------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TMPDIR"] = self.temp
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self, wait: bool = True) -> DaemonProcess:
        """Spawn the daemon; with ``wait``, return once ``ctr version`` gets an answer."""
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        self.killed = False
        os.makedirs(self.temp, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                env=self.environment(),
                start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.cleanup(check=False)
                raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll until the socket accepts and ``ctr version`` answers; DaemonError with the log tail if not."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        last = ""
        while True:
            rc = self.returncode
            if rc is not None:
                raise DaemonError(f"{self.name} exited with status {rc} before serving\n{self.log_tail()}")
            if socket_accepts(self.address):
                result = ctr(self.address, "version", timeout=10)
                if result.rc == 0 and "Server:" in result.stdout:
                    return
                last = str(result)
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.name} not serving on {self.address} after timeout\n{last}\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status once the daemon exits by itself; DaemonError if it does not."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"{self.name} still running {timeout}s later\n{self.log_tail()}")

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` (sets :attr:`killed`); the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout if timeout is not None else self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self, check: bool = True, keep_log: str | None = None) -> None:
        """Stop the daemon, kill leftovers, remove the temp dir (copying the log to ``keep_log``).

        With ``check``, DaemonError if the daemon needed SIGKILL or processes
        referencing the temp dir were left behind.
        """
        if self._cleaned:
            return
        self._cleaned = True
        problems = []
        self.stop()
        if self.killed:
            problems.append(f"{self.name} ignored SIGTERM for {self.stop_timeout}s and was killed")
        if self.proc is not None and self.proc.poll() is None:
            problems.append(f"{self.name} (pid {self.proc.pid}) is still running")
        leftovers = processes_referencing(self.tmpdir)
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if leftovers:
            problems.append(f"processes left behind by {self.name}: {leftovers!r}")
        tail = self.log_tail() if problems else ""
        if keep_log is not None and os.path.exists(self.log_path):
            shutil.copyfile(self.log_path, keep_log)
        if self.owns_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if problems and check:
            raise DaemonError("\n".join(problems) + "\n" + tail)

    # -- output -------------------------------------------------------------------

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_lines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, pattern: str, timeout: float = 5.0, start: int = 0) -> re.Match[str]:
        """The first match of regex ``pattern`` in the log after offset ``start``; DaemonError on timeout."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            match = regex.search(self.log(), start)
            if match:
                return match
            if time.monotonic() > deadline:
                raise DaemonError(f"{pattern!r} not logged within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def ctr(
        self, *args: str, namespace: str | None = None, timeout: float = CTR_TIMEOUT, input: str | None = None
    ) -> Result:
        """The real ``ctr`` against this daemon."""
        return ctr(self.address, *args, namespace=namespace, timeout=timeout, input=input)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.tmpdir} pid={self.proc.pid if self.proc else None}>"


def checkout_python_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a Python process running this checkout's cdtwist, output unbuffered."""
    return {**env, "PYTHONPATH": REPO_ROOT, "PYTHONUNBUFFERED": "1"}


class CdtwistDaemon(DaemonProcess):
    """``twistd -n --pidfile= cdtwist -c <config>`` with the checkout on PYTHONPATH."""

    name = "cdtwist"

    def __init__(
        self, tmpdir: str | None = None, extra_config: str = "", *, args: Iterable[str] = (), **kwargs: Any
    ) -> None:
        self.args = list(args)  # extra twistd plugin options, e.g. --log-level
        super().__init__(tmpdir, extra_config, **kwargs)

    def command(self) -> list[str]:
        return [sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", "cdtwist", "-c", self.config_path, *self.args]

    def environment(self) -> dict[str, str]:
        return checkout_python_env(super().environment())

    def wait_ready(self, timeout: float | None = None) -> None:
        """Serving on the API socket, and every listener up (the daemon logs when it is)."""
        super().wait_ready(timeout)
        self.wait_for_log("successfully booted", timeout=timeout if timeout is not None else self.start_timeout)


class PluginServerProcess(DaemonProcess):
    """``cdtwist serve-plugin <kind>`` (twistd's ``cdtwist-serve-plugin``) on a root and socket under tmpdir.

    ``ctr`` cannot talk to it (it serves one API, no namespaces): ready means
    the socket accepts and the server logged that it is serving.
    """

    name = "serve-plugin"

    def __init__(self, kind: str, tmpdir: str | None = None, *, args: Iterable[str] = (), **kwargs: Any) -> None:
        self.kind = kind
        self.args = list(args)
        super().__init__(tmpdir, **kwargs)
        self.address = os.path.join(self.tmpdir, "p.sock")

    @classmethod
    def check_requirements(cls) -> None:
        require_root()

    def command(self) -> list[str]:
        return [
            sys.executable, "-c", TWISTD_MAIN, "-n", "--pidfile=", "cdtwist-serve-plugin",
            self.kind, "--root", self.root, "--address", self.address, *self.args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return checkout_python_env(super().environment())

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        while not socket_accepts(self.address):
            rc = self.returncode
            if rc is not None:
                raise DaemonError(f"{self.name} exited with status {rc} before serving\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.name} not serving on {self.address} after timeout\n{self.log_tail()}")
            time.sleep(0.05)
        self.wait_for_log("serving in", timeout=max(deadline - time.monotonic(), 1.0))


class ContainerdDaemon(DaemonProcess):
    """The real containerd, CRI disabled and ``/opt/containerd`` redirected into the temp dir."""

    name = "containerd"
    generated_tables = ("grpc", "ttrpc", 'plugins."io.containerd.internal.v1.opt"')

    def __init__(
        self,
        tmpdir: str | None = None,
        extra_config: str = "",
        *,
        disabled_plugins: Iterable[str] = ("io.containerd.grpc.v1.cri",),
        **kwargs: Any,
    ) -> None:
        self.disabled_plugins = list(disabled_plugins)
        super().__init__(tmpdir, extra_config, **kwargs)

    def config_head(self) -> str:
        disabled = ", ".join(toml_str(p) for p in self.disabled_plugins)
        return super().config_head() + f"disabled_plugins = [{disabled}]\n"

    def config_tables(self) -> str:
        opt = os.path.join(self.tmpdir, "opt")
        return super().config_tables() + f'\n[plugins."io.containerd.internal.v1.opt"]\n  path = {toml_str(opt)}\n'

    @classmethod
    def check_requirements(cls) -> None:
        require_binaries(CTR, CONTAINERD)
        require_root()

    def command(self) -> list[str]:
        return [CONTAINERD, "--config", self.config_path]


D = TypeVar("D", bound=DaemonProcess)


def _keep_log_path(testcase: unittest.SynchronousTestCase, daemon: DaemonProcess) -> str:
    """Where a test's daemon log is kept after the temp dir is gone (under _trial_temp)."""
    path = testcase.mktemp()
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, f"{daemon.name}.log")


def manage(testcase: unittest.SynchronousTestCase, daemon: D, start: bool = True) -> D:
    """Register ``daemon``'s cleanup on ``testcase``, skip if it cannot run here, then start it."""
    testcase.addCleanup(lambda: daemon.cleanup(keep_log=_keep_log_path(testcase, daemon)))
    daemon.check_requirements()
    if start:
        daemon.start()
    return daemon


def start_cdtwist(testcase: unittest.SynchronousTestCase, extra_config: str = "", **kwargs: Any) -> CdtwistDaemon:
    """A serving cdtwist stopped (and checked) when ``testcase`` ends."""
    CdtwistDaemon.check_requirements()
    return manage(testcase, CdtwistDaemon(None, extra_config, **kwargs))


def start_containerd(
    testcase: unittest.SynchronousTestCase, extra_config: str = "", **kwargs: Any
) -> ContainerdDaemon:
    """A serving real containerd stopped (and checked) when ``testcase`` ends."""
    ContainerdDaemon.check_requirements()
    return manage(testcase, ContainerdDaemon(None, extra_config, **kwargs))


# --- daemons shared by a module's tests ------------------------------------------------


class SharedDaemon(Generic[D]):
    """A daemon shared by the tests of a module that :func:`module_suite` wraps.

    Inside the module's suite the daemon starts on first :meth:`get` and is
    stopped (and checked) after the last test.  Outside it (a single test
    named on the command line, ``trial -j``) each :meth:`get` starts a
    private daemon cleaned up with the test.  Tests sharing a daemon must
    not change it in ways others see (use unique namespace names).
    """

    def __init__(self, factory: Callable[[], D], requirements: Callable[[], None]) -> None:
        self.factory = factory
        self.requirements = requirements
        self._depth = 0
        self._daemon: D | None = None

    def get(self, testcase: unittest.SynchronousTestCase) -> D:
        self.requirements()
        if self._depth == 0:
            return manage(testcase, self.factory())
        if self._daemon is None:
            daemon = self.factory()
            daemon.start()
            self._daemon = daemon
        elif not self._daemon.running:
            raise DaemonError(
                f"shared {self._daemon.name} exited with {self._daemon.returncode}\n{self._daemon.log_tail()}"
            )
        return self._daemon

    @contextmanager
    def scope(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._daemon is not None:
                daemon, self._daemon = self._daemon, None
                # trial runs in _trial_temp: keep the log next to test.log
                daemon.cleanup(keep_log=os.path.abspath(f"shared-{daemon.name}.log"))


def shared_daemons() -> tuple[SharedDaemon[CdtwistDaemon], SharedDaemon[ContainerdDaemon]]:
    """A cdtwist and a real containerd, each started once for a module's tests (see :func:`module_suite`)."""
    return (
        SharedDaemon(lambda: CdtwistDaemon(None), CdtwistDaemon.check_requirements),
        SharedDaemon(lambda: ContainerdDaemon(None), ContainerdDaemon.check_requirements),
    )


class _FixtureSuite(unittest.TestSuite):
    """Runs its tests inside the scopes of some :class:`SharedDaemon`; teardown errors are reported."""

    def __init__(self, tests: Iterable[object], fixtures: Iterable[SharedDaemon[DaemonProcess]], name: str) -> None:
        super().__init__(tests)
        self.fixtures = list(fixtures)
        self.name = name

    def run(self, result):  # noqa: ANN001, ANN201 - pyunit's signature
        entered = []
        try:
            for fixture in self.fixtures:
                cm = fixture.scope()
                cm.__enter__()
                entered.append(cm)
            super().run(result)
        finally:
            for cm in reversed(entered):
                try:
                    cm.__exit__(None, None, None)
                except BaseException:
                    ErrorHolder(f"{self.name} (shared daemon teardown)", Failure()).run(result)
        return result


def module_suite(module: ModuleType | str, *fixtures: SharedDaemon[DaemonProcess]) -> unittest.TestSuite:
    """The module's tests (as trial loads them) run inside ``fixtures``' scopes: use as ``test_suite``."""
    if isinstance(module, str):
        module = sys.modules[module]
    loader = TestLoader()
    tests = [loader.loadClass(cls) for cls in loader.findTestClasses(module)]
    return _FixtureSuite(tests, fixtures, module.__name__)


# --- comparing outputs ---------------------------------------------------------------

#: logrus text timestamps: time="2023-04-05T06:07:08.123456789Z"
_LOGRUS_TIME = re.compile(r'time="[0-9T:.+Z-]+"')
#: Go's time.Time String(): 2023-04-05 06:07:08.123456789 +0000 UTC
_GO_TIME = re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,9})? [+-]\d{4} [A-Z]{3,5}\b")


def normalise(text: str, *daemons: DaemonProcess) -> str:
    """``text`` with timestamps, the daemons' temp dirs and addresses replaced by placeholders."""
    text = _LOGRUS_TIME.sub('time="<TIME>"', text)
    text = _GO_TIME.sub("<TIME>", text)
    for daemon in daemons:
        text = text.replace(daemon.address, "<ADDRESS>").replace(daemon.tmpdir, "<TMPDIR>")
    return text
