"""Issue 6 (runtime v2 + tasks): real containers through the real ``ctr``, ``containerd-shim-runc-v2`` and runc.

A tiny OCI image is built here from ``busybox-static`` and imported with
``ctr images import`` (content, snapshots and diff services).  Scenarios
run on cdtwist and on the real containerd and their outputs are compared
(pids, times and paths normalised); restart and recovery scenarios use a
cdtwist of their own; the Wait scenarios use grpcio.

Each test works in namespaces of its own (runc keeps its state per
namespace under ``/run/containerd/runc``, shared by both daemons) and ends
by checking nothing is left behind: no shim, no mount under the daemon's
dirs, no FIFO dir from ``ctr``.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from twisted.trial import unittest

from cdtwist.api.events import task_pb2 as task_events
from cdtwist.api.services.tasks.v1 import tasks_pb2 as tasks_api
from cdtwist.api.services.tasks.v1 import tasks_pb2_grpc as tasks_grpc
from cdtwist.api.services.version.v1 import version_pb2_grpc
from tests.integration import images_support as ims
from tests.integration.harness import (
    CTR,
    BackgroundCtr,
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonError,
    DaemonProcess,
    Result,
    SharedDaemon,
    _ctr_env,
    manage,
    module_suite,
    require_binaries,
    require_root,
)

SHIM = "containerd-shim-runc-v2"
RUNC = "runc"
IMAGE = "docker.io/cdtwist/busybox:tasks"
FIFO_DIR = "/run/containerd/fifo"
RUNC_ROOT = "/run/containerd/runc"


def _requirements() -> None:
    require_root()
    require_binaries(CTR, SHIM, RUNC)
    if not os.path.exists(ims.BUSYBOX):
        raise unittest.SkipTest(f"{ims.BUSYBOX} (busybox-static) is needed to build the test image")


def _cdtwist() -> CdtwistDaemon:
    return CdtwistDaemon(None)


def _check_cdtwist() -> None:
    CdtwistDaemon.check_requirements()
    _requirements()


def _check_containerd() -> None:
    ContainerdDaemon.check_requirements()
    _requirements()


CDTWIST: SharedDaemon[CdtwistDaemon] = SharedDaemon(_cdtwist, _check_cdtwist)
CONTAINERD: SharedDaemon[ContainerdDaemon] = SharedDaemon(lambda: ContainerdDaemon(None), _check_containerd)


def test_suite() -> unittest.TestSuite:
    """trial's hook: the module's tests share one cdtwist and one containerd."""
    return module_suite(__name__, CDTWIST, CONTAINERD)


# --- the image ---------------------------------------------------------------------

APPLETS = ("sh", "echo", "ls", "sleep", "cat", "true", "false", "stty", "tty", "ps", "env", "id", "kill", "dd")


def busybox_image() -> ims.Image:
    entries = [
        ims.directory("bin"),
        ims.file("bin/busybox", mode=0o755, source=ims.BUSYBOX),
        *[ims.symlink(f"bin/{a}", "busybox") for a in APPLETS],
        *[ims.directory(d) for d in ("dev", "etc", "proc", "run", "sys")],
        ims.directory("tmp", mode=0o1777),
        ims.directory("root", mode=0o700),
        ims.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ims.file("etc/group", "root:x:0:\n"),
    ]
    return ims.Image([ims.Layer("tasks-busybox", entries, "gzip")], cmd=("/bin/sh",))


def image_tar() -> str:
    return ims.cached_layout("tasks-busybox", [(busybox_image(), [IMAGE])])


_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


# --- normalising outputs -----------------------------------------------------------

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")
_GO_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? [+-]\d{4} [A-Z]+")
_PID_FIELD = re.compile(r'"pid":\d+')
_FIFO = re.compile(r"/run/containerd/fifo/\d+/")
_SNAPSHOT = re.compile(r"snapshots/\d+/")


def normalise(text: str, daemon: DaemonProcess, namespace: str) -> str:
    text = text.replace(daemon.address, "<ADDRESS>").replace(daemon.tmpdir, "<TMPDIR>")
    text = text.replace(namespace, "<NS>")
    text = re.sub(r'time="[^"]*"', 'time="<TIME>"', text)
    text = _RFC3339.sub("<TIME>", text)
    text = _GO_TIME.sub("<TIME>", text)
    text = _PID_FIELD.sub('"pid":<PID>', text)
    text = _FIFO.sub("/run/containerd/fifo/<N>/", text)
    text = _SNAPSHOT.sub("snapshots/<N>/", text)
    text = re.sub(r" {2,}", " ", text)
    # label lists come in Go map order
    return re.sub(r"(?m)(^|\s)([^\s=,]+=[^\s,]*(?:,[^\s=,]+=[^\s,]*)+)$", _sort_labels, text)


def _sort_labels(m: re.Match[str]) -> str:
    return m.group(1) + ",".join(sorted(m.group(2).split(",")))


def pid_table(text: str) -> str:
    """``task ls``/``task ps`` with the pids replaced (and tabwriter's padding, which follows their width)."""
    return re.sub(r" {2,}", " ", re.sub(r"\b\d+\b", "<PID>", text))


# --- leftovers ------------------------------------------------------------------------


def mounts_under(*prefixes: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if any(p == x or p.startswith(x + "/") for x in prefixes)]


def shim_processes(daemon: DaemonProcess, namespace: str | None = None) -> list[tuple[int, str]]:
    """Shims serving ``daemon`` (their command line names its socket)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        cmd = [a.decode(errors="replace") for a in argv if a]
        if not cmd or not cmd[0].endswith(SHIM) or daemon.address not in cmd:
            continue
        if namespace is not None and namespace not in cmd:
            continue
        found.append((int(entry), " ".join(cmd)))
    return found


def fifo_dirs() -> set[str]:
    try:
        return set(os.listdir(FIFO_DIR))
    except FileNotFoundError:
        return set()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DaemonError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Base(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.fifos_before = fifo_dirs()
        self.namespaces: list[tuple[DaemonProcess, str]] = []

    def use(self, daemon: DaemonProcess, base: str) -> str:
        """A namespace of this test on ``daemon``, with the image imported; cleaned at the end.

        (The cleanup is registered on first use, so it runs before a test's own daemon stops.)
        """
        ns = unique(base)
        if not self.namespaces:
            self.addCleanup(self._clean_all)
        self.namespaces.append((daemon, ns))
        daemon.ctr("images", "import", image_tar(), namespace=ns, timeout=120).ok()
        return ns

    def _clean_all(self) -> None:
        for daemon, ns in reversed(self.namespaces):
            self._clean_namespace(daemon, ns)
            # runc keeps a state dir per namespace (both daemons leave it): ours to remove once empty
            runc_dir = os.path.join(RUNC_ROOT, ns)
            wait_until(lambda d=runc_dir: not os.path.isdir(d) or not os.listdir(d), timeout=5, what=runc_dir)
            try:
                os.rmdir(runc_dir)
            except FileNotFoundError:
                pass
        left = fifo_dirs() - self.fifos_before
        wait_until(lambda: not (fifo_dirs() - self.fifos_before), timeout=5, what=f"ctr FIFO dirs {left} to go")

    def _clean_namespace(self, daemon: DaemonProcess, ns: str) -> None:
        """Kill and remove whatever the test left, then check nothing of it remains."""
        if not daemon.running:
            return
        tasks = daemon.ctr("task", "ls", "-q", namespace=ns)
        for id in tasks.stdout.split():
            daemon.ctr("task", "kill", "-s", "SIGKILL", id, namespace=ns)
        for id in tasks.stdout.split():
            wait_until(lambda id=id: "RUNNING" not in daemon.ctr("task", "ls", namespace=ns).stdout, what="stop")
            daemon.ctr("task", "rm", "-f", id, namespace=ns)
        for id in daemon.ctr("c", "ls", "-q", namespace=ns).stdout.split():
            daemon.ctr("c", "rm", id, namespace=ns)
        wait_until(lambda: not shim_processes(daemon, ns), what=f"shims of {ns} to exit")
        self.assertEqual(mounts_under(daemon.state, daemon.root), [])
        bundles = os.path.join(daemon.state, "io.containerd.runtime.v2.task", ns)
        self.assertEqual(os.listdir(bundles) if os.path.isdir(bundles) else [], [])

    def both(self) -> list[DaemonProcess]:
        return [CONTAINERD.get(self), CDTWIST.get(self)]

    def compare(self, scenario: Callable[[DaemonProcess, str], list[Any]], base: str) -> list[Any]:
        """Run ``scenario(daemon, namespace)`` on containerd then cdtwist; their results must match."""
        results = []
        for daemon in self.both():
            ns = self.use(daemon, base)
            results.append(scenario(daemon, ns))
        expected, got = results
        self.assertEqual(got, expected)
        return got


def out(result: Result, daemon: DaemonProcess, ns: str) -> tuple[int, str, str]:
    return result.rc, normalise(result.stdout, daemon, ns), normalise(result.stderr, daemon, ns)


# --- scenarios compared with containerd ---------------------------------------------------


class RunTests(_Base):
    def test_run_rm_prints_and_exits(self) -> None:
        """``ctr run --rm IMG c1 sh -c 'echo hi; exit 3'`` prints hi and exits 3."""

        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            r = d.ctr("run", "--rm", IMAGE, "c1", "sh", "-c", "echo hi; exit 3", namespace=ns)
            after = d.ctr("c", "ls", "-q", namespace=ns)
            return [out(r, d, ns), out(after, d, ns)]

        got = self.compare(scenario, "tk-run")
        self.assertEqual(got[0][:2], (3, "hi\n"))

    def test_detached_lifecycle(self) -> None:
        """run -d, task ls/exec/ps/pause/resume/metrics/kill/rm and c ls/info/label/rm, as on containerd."""

        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            def ctr(*args: str) -> tuple[int, str, str]:
                return out(d.ctr(*args, namespace=ns), d, ns)

            steps: list[Any] = [ctr("run", "-d", IMAGE, "c2", "sleep", "1000")]
            steps.append(pid_table(ctr("task", "ls")[1]))
            steps.append(ctr("task", "exec", "--exec-id", "e1", "c2", "ls", "/"))
            steps.append(ctr("task", "exec", "--exec-id", "e2", "c2", "sh", "-c", "echo out; echo err >&2; exit 4"))
            ps = d.ctr("task", "ps", "c2", namespace=ns)
            steps.append((ps.rc, pid_table(ps.stdout), len(ps.stdout.splitlines())))
            steps.append(ctr("task", "pause", "c2"))
            steps.append(pid_table(ctr("task", "ls")[1]))
            steps.append(ctr("task", "resume", "c2"))
            steps.append(pid_table(ctr("task", "ls")[1]))
            metrics = d.ctr("task", "metrics", "c2", namespace=ns)
            names = [line.split()[0] for line in metrics.stdout.splitlines()[3:] if line.strip()]
            steps.append((metrics.rc, names))
            steps.append(ctr("task", "kill", "-s", "SIGKILL", "c2"))
            wait_until(lambda: "STOPPED" in d.ctr("task", "ls", namespace=ns).stdout, what="c2 to stop")
            steps.append(pid_table(ctr("task", "ls")[1]))
            steps.append(ctr("task", "rm", "c2"))
            steps.append(ctr("task", "ls"))
            steps.append(ctr("c", "ls"))
            steps.append(ctr("c", "label", "c2", "a=b"))
            info = d.ctr("c", "info", "c2", namespace=ns)
            steps.append((info.rc, '"a": "b"' in info.stdout, '"Runtime"' in info.stdout))
            steps.append(ctr("c", "rm", "c2"))
            return steps

        steps = self.compare(scenario, "tk-life")
        self.assertEqual(steps[2][1].split(), ["bin", "dev", "etc", "proc", "root", "run", "sys", "tmp"])
        self.assertEqual(steps[3][:2], (4, "out\n"))
        self.assertIn("memory.usage_in_bytes", steps[9][1])
        self.assertIn("STOPPED", steps[11])

    def test_error_messages(self) -> None:
        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            def ctr(*args: str) -> tuple[int, str, str]:
                return out(d.ctr(*args, namespace=ns), d, ns)

            return [
                ctr("task", "start", "nope"),
                ctr("c", "create", IMAGE, "c3", "sleep", "1000"),
                ctr("task", "kill", "c3"),
                ctr("task", "ps", "c3"),
                ctr("task", "metrics", "c3"),
                ctr("task", "start", "-d", "c3"),
                ctr("task", "start", "-d", "c3"),
                ctr("task", "exec", "--exec-id", "e2", "c3", "/nonexistent"),
                ctr("task", "kill", "-s", "9", "--exec-id", "nope", "c3"),
                ctr("task", "rm", "c3"),
                ctr("run", "--rm", IMAGE, "c4", "/no/such/binary"),
            ]

        self.compare(scenario, "tk-err")

    def test_events_order(self) -> None:
        """``ctr events``: /containers/create, /tasks/create, /tasks/start, /tasks/exit, /tasks/delete in order."""

        def scenario(d: DaemonProcess, ns: str) -> list[str]:
            events = BackgroundCtr(d.address, "events")
            try:
                time.sleep(0.5)
                d.ctr("run", "--rm", IMAGE, "c5", "true", namespace=ns).ok()
                d.ctr("run", "-d", IMAGE, "c6", "sleep", "1000", namespace=ns).ok()
                d.ctr("task", "exec", "--exec-id", "x1", "c6", "true", namespace=ns).ok()
                d.ctr("task", "pause", "c6", namespace=ns).ok()
                d.ctr("task", "resume", "c6", namespace=ns).ok()
                d.ctr("task", "kill", "-s", "SIGKILL", "c6", namespace=ns).ok()
                events.wait_for(lambda lines: sum("/tasks/exit" in x for x in lines) >= 3)
                d.ctr("task", "rm", "c6", namespace=ns).ok()
                d.ctr("c", "rm", "c6", namespace=ns).ok()
                events.wait_for(lambda lines: sum("/containers/delete" in x for x in lines) >= 2)
            finally:
                result = events.stop()
            lines = [line for line in result.stdout.splitlines() if f" {ns} " in line]
            return [normalise(line, d, ns) for line in lines]

        lines = self.compare(scenario, "tk-ev")
        topics = [line.split()[2] for line in lines]
        first_run = topics[: topics.index("/containers/delete") + 1]
        self.assertEqual(
            [t for t in first_run if not t.startswith("/snapshot/")],
            ["/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete",
             "/containers/delete"],
        )  # fmt: skip

    def test_oom_event(self) -> None:
        """A container killed by its memory limit: ``/tasks/oom`` (published by the shim) before ``/tasks/exit``."""

        def attempt(d: DaemonProcess, ns: str) -> list[Any]:
            events = BackgroundCtr(d.address, "events")
            try:
                time.sleep(0.5)
                r = d.ctr(
                    "run", "--rm", "--memory-limit", str(16 << 20), IMAGE, "m1",
                    "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
                    namespace=ns,
                )  # fmt: skip
                events.wait_for(lambda lines: any("/containers/delete" in x and ns in x for x in lines))
            finally:
                lines = events.stop().stdout.splitlines()
            topics = [x.split()[5] for x in lines if f" {ns} " in x and "/tasks/" in x]
            return [r.rc, topics]

        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            # The shim reads the cgroup's OOM notification on its own schedule and
            # can miss it when the task is gone first: that race exists on
            # containerd too, so a daemon gets three tries to show the event.
            for _ in range(3):
                result = attempt(d, ns)
                if "/tasks/oom" in result[1]:
                    break
            return result

        self.assertEqual(
            self.compare(scenario, "tk-oom"), [137, ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit",
                                                     "/tasks/delete"]]
        )  # fmt: skip

    def test_terminal(self) -> None:
        """``ctr run -t`` and ``ctr task exec -t`` through a pty: a terminal, resized with the pty."""

        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            rc, output = run_with_pty(d, ns, ["run", "-t", "--rm", IMAGE, "t1", "sh"], rows=33, cols=101)
            run = [rc, "33 101" in output, "40 120" in output, "/dev/pts/0" in output]
            d.ctr("run", "-d", IMAGE, "t2", "sleep", "1000", namespace=ns).ok()
            rc, output = run_with_pty(d, ns, ["task", "exec", "-t", "--exec-id", "x1", "t2", "sh"], rows=21, cols=77)
            return [run, [rc, "21 77" in output, "40 120" in output]]

        self.assertEqual(self.compare(scenario, "tk-tty"), [[5, True, True, True], [5, True, True]])

    def test_runtime_options_are_honoured(self) -> None:
        """``--runc-binary`` (runc ``Options.BinaryName``) reaches the shim: our runc wrapper runs."""
        d = CDTWIST.get(self)
        ns = self.use(d, "tk-opt")
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        log = os.path.join(tmp, "runc.log")
        wrapper = os.path.join(tmp, "runc-wrapper")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\necho "$@" >> {log}\nexec {RUNC} "$@"\n')
        os.chmod(wrapper, 0o755)
        r = d.ctr("run", "--rm", "--runc-binary", wrapper, IMAGE, "o1", "echo", "wrapped", namespace=ns)
        self.assertEqual((r.rc, r.stdout), (0, "wrapped\n"), r)
        with open(log) as f:
            calls = f.read()
        self.assertIn(" create ", calls)
        self.assertIn(" start o1", calls)


def run_with_pty(d: DaemonProcess, ns: str, args: list[str], rows: int, cols: int) -> tuple[int, str]:
    """Drive ``ctr`` on a pty: wait for the prompt, resize to 40x120, ask the size, exit 5."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execvpe(CTR, [CTR, "--address", d.address, "--namespace", ns, *args], _ctr_env())
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    output = b""
    stage = 0
    deadline = time.monotonic() + 60
    last_ask = 0.0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                output += data
            now = time.monotonic()
            if stage == 0 and b"# " in output:
                os.write(fd, b"stty size; tty\n")
                stage = 1
            elif stage == 1 and f"{rows} {cols}".encode() in output:
                stage = 2
            elif stage == 2 and now - last_ask > 0.5:
                # ctr installs its SIGWINCH handler after the task starts: ask until the new size shows
                fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
                os.kill(pid, signal.SIGWINCH)
                time.sleep(0.1)
                os.write(fd, b"stty size\n")
                last_ask = now
                if b"40 120" in output:
                    os.write(fd, b"exit 5\n")
                    stage = 3
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


# --- cdtwist only: Waits, publish binary --------------------------------------------------


class WaitTests(_Base):
    def test_fifty_concurrent_waits(self) -> None:
        """50 Waits held at once: other calls still answer at once; all 50 get the exit status."""
        d = CDTWIST.get(self)
        ns = self.use(d, "tk-wait")
        d.ctr("run", "-d", IMAGE, "w1", "sleep", "1000", namespace=ns).ok()
        channel = grpc.insecure_channel("unix:" + d.address)
        self.addCleanup(channel.close)
        tasks = tasks_grpc.TasksStub(channel)
        md = [("containerd-namespace", ns)]
        results: list[Any] = []
        lock = threading.Lock()

        def wait() -> None:
            try:
                r = tasks.Wait(tasks_api.WaitRequest(container_id="w1"), metadata=md, timeout=120)
                value: Any = r.exit_status
            except grpc.RpcError as e:
                value = (e.code(), e.details())
            with lock:
                results.append(value)

        threads = [threading.Thread(target=wait, daemon=True) for _ in range(50)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        version = version_pb2_grpc.VersionStub(channel)
        from google.protobuf import empty_pb2

        started = time.monotonic()
        for _ in range(20):
            version.Version(empty_pb2.Empty(), timeout=5)
            listed = tasks.List(tasks_api.ListTasksRequest(), metadata=md, timeout=5)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual([t.id for t in listed.tasks], ["w1"])
        self.assertEqual(results, [])
        d.ctr("task", "kill", "-s", "SIGKILL", "w1", namespace=ns).ok()
        for t in threads:
            t.join(30)
        self.assertEqual(results, [137] * 50)

    def test_wait_answers_an_exited_task_at_once(self) -> None:
        d = CDTWIST.get(self)
        ns = self.use(d, "tk-wait2")
        d.ctr("run", "-d", IMAGE, "w2", "sh", "-c", "exit 9", namespace=ns).ok()
        wait_until(lambda: "STOPPED" in d.ctr("task", "ls", namespace=ns).stdout, what="w2 to stop")
        with grpc.insecure_channel("unix:" + d.address) as channel:
            r = tasks_grpc.TasksStub(channel).Wait(
                tasks_api.WaitRequest(container_id="w2"), metadata=[("containerd-namespace", ns)], timeout=10
            )
        self.assertEqual(r.exit_status, 9)


class PublishTests(_Base):
    def test_publish_binary_in_containerd_form(self) -> None:
        """``<publish binary> --address <sock> publish --topic T --namespace N`` with an Any on stdin."""
        d = CDTWIST.get(self)
        ns = unique("tk-pub")
        binary = os.path.join(d.root, "io.containerd.runtime.v2.task", "cdtwist-publish")
        self.assertTrue(os.access(binary, os.X_OK))
        event = task_events.TaskOOM(container_id="x1")
        packed = any_pb2.Any(type_url="containerd.events.TaskOOM", value=event.SerializeToString())
        events = BackgroundCtr(d.address, "events")
        try:
            time.sleep(0.5)
            proc = subprocess.run(
                [binary, "--address", d.address, "publish", "--topic", "/tasks/oom", "--namespace", ns],
                input=packed.SerializeToString(),
                capture_output=True,
                timeout=60,
            )
            self.assertEqual(proc.returncode, 0, proc.stderr)
            lines = events.wait_for(lambda lines: any(ns in x for x in lines))
        finally:
            events.stop()
        (line,) = [x for x in lines if ns in x]
        self.assertTrue(line.rstrip().endswith(f'{ns} /tasks/oom {{"container_id":"x1"}}'), line)


# --- restart and recovery: a cdtwist of their own -------------------------------------------


class RestartTests(_Base):
    def daemon(self) -> CdtwistDaemon:
        _check_cdtwist()
        return manage(self, CdtwistDaemon(None))

    def shim_of(self, d: DaemonProcess, ns: str, id: str) -> int:
        (pid,) = [p for p, cmd in shim_processes(d, ns) if f"-id {id}" in cmd]
        return pid

    def test_running_container_survives_a_restart(self) -> None:
        d = self.daemon()
        ns = self.use(d, "tk-restart")
        d.ctr("run", "-d", IMAGE, "r1", "sleep", "1000", namespace=ns).ok()
        before = d.ctr("task", "ls", namespace=ns).stdout
        shim = self.shim_of(d, ns, "r1")
        self.assertEqual(d.stop(), 0)
        os.kill(shim, 0)  # the shim lives on while cdtwist is down
        d.start()
        self.assertEqual(d.ctr("task", "ls", namespace=ns).stdout, before)
        self.assertIn("RUNNING", before)
        r = d.ctr("task", "exec", "--exec-id", "e1", "r1", "echo", "still here", namespace=ns)
        self.assertEqual((r.rc, r.stdout), (0, "still here\n"), r)
        d.ctr("task", "kill", "-s", "SIGKILL", "r1", namespace=ns).ok()
        wait_until(lambda: "STOPPED" in d.ctr("task", "ls", namespace=ns).stdout, what="r1 to stop")
        r = d.ctr("task", "rm", "r1", namespace=ns)
        self.assertEqual(r.rc, 0, r)
        d.ctr("c", "rm", "r1", namespace=ns).ok()
        self.assertEqual(d.ctr("task", "ls", "-q", namespace=ns).stdout, "")

    def test_shim_killed_while_down_is_cleaned_at_boot(self) -> None:
        d = self.daemon()
        ns = self.use(d, "tk-dead")
        d.ctr("run", "-d", IMAGE, "alive", "sleep", "1000", namespace=ns).ok()
        before = fifo_dirs()
        d.ctr("run", "-d", IMAGE, "dead", "sleep", "1000", namespace=ns).ok()
        # ctr removes a task's FIFOs when it deletes the task: this one dies unseen, so they are ours to remove
        for name in fifo_dirs() - before:
            self.addCleanup(shutil.rmtree, os.path.join(FIFO_DIR, name), True)
        tasks = dict(line.split()[:2] for line in d.ctr("task", "ls", namespace=ns).stdout.splitlines()[1:])
        dead_shim = self.shim_of(d, ns, "dead")
        self.assertEqual(d.stop(), 0)
        os.kill(dead_shim, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{dead_shim}/cmdline") or _zombie(dead_shim), what="shim death")
        d.start()
        listed = d.ctr("task", "ls", namespace=ns).stdout
        self.assertIn("alive", listed)
        self.assertNotIn("dead", listed)
        bundle = os.path.join(d.state, "io.containerd.runtime.v2.task", ns, "dead")
        wait_until(lambda: not os.path.exists(bundle), what="the dead shim's bundle to go")
        self.assertFalse(os.path.exists(os.path.join(d.root, "io.containerd.runtime.v2.task", ns, "dead")))
        # the dead shim's container is gone too (runc delete --force), its rootfs unmounted
        wait_until(lambda: not _alive(int(tasks["dead"])), what="the orphaned container to be killed")
        self.assertEqual([m for m in mounts_under(d.state) if m.endswith("/dead/rootfs")], [])
        d.ctr("c", "rm", "dead", namespace=ns).ok()
        self.assertIn(d.log().count("cleaning up dead shim"), (1, 2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
