"""Shim command lines, running shim binaries without fork, runtime path resolution, the publish binary."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from google.protobuf import any_pb2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.errors import CdtwistError
from cdtwist.runtime import publish
from cdtwist.runtime.binary import (
    ShimBinary,
    binary_name,
    binary_path,
    parse_delete_output,
    parse_start_output,
    resolve_runtime_path,
    run_process,
)
from cdtwist.runtime.bundle import Bundle
from tests.test_runtime_shim import read_runs, short_tmpdir, timestamp, write_fake_shim_binary


def _binary(bundle_path: str = "/state/ns1/c1", runtime: str = "/usr/bin/containerd-shim-runc-v2") -> ShimBinary:
    return ShimBinary(
        bundle=Bundle(id="c1", path=bundle_path, namespace="ns1"),
        runtime=runtime,
        address="/run/cdtwist/cdtwist.sock",
        ttrpc_address="/run/cdtwist/cdtwist.sock.ttrpc",
        publish_binary="/var/lib/cdtwist/cdtwist-publish",
        environ={"PATH": "/usr/bin", "GOMAXPROCS": "8"},
    )


class NamesTests(SynchronousTestCase):
    def test_binary_name(self) -> None:
        self.assertEqual(binary_name("io.containerd.runc.v2"), "containerd-shim-runc-v2")
        self.assertEqual(binary_name("io.containerd.runhcs.v1"), "containerd-shim-runhcs-v1")
        self.assertEqual(binary_name("a.b"), "containerd-shim-a-b")
        self.assertEqual(binary_name("runc"), "")

    def test_binary_path(self) -> None:
        self.assertEqual(binary_path("/opt/x/io.containerd.runc.v2"), "/opt/x/containerd-shim-runc-v2")

    def test_resolve_runtime_path(self) -> None:
        cache: dict[str, str] = {}
        path = resolve_runtime_path("io.containerd.runc.v2", cache)
        self.assertTrue(os.path.isabs(path))
        self.assertEqual(os.path.basename(path), "containerd-shim-runc-v2")
        self.assertEqual(cache, {"containerd-shim-runc-v2": path})
        self.assertEqual(resolve_runtime_path("/bin/sh", cache), "/bin/sh")
        with self.assertRaises(CdtwistError) as e:
            resolve_runtime_path("/no/such/shim", cache)
        self.assertEqual(str(e.exception), "invalid custom binary path: stat /no/such/shim: no such file or directory")
        with self.assertRaises(CdtwistError) as e:
            resolve_runtime_path("io.containerd.nosuchthing.v9", cache)
        self.assertEqual(
            str(e.exception),
            'runtime "io.containerd.nosuchthing.v9" binary not installed "containerd-shim-nosuchthing-v9": '
            "file does not exist",
        )
        with self.assertRaises(CdtwistError) as e:
            resolve_runtime_path("runc", cache)
        self.assertIn("invalid runtime name runc, correct runtime name should be", str(e.exception))
        with self.assertRaises(CdtwistError) as e:
            resolve_runtime_path("", cache)
        self.assertEqual(str(e.exception), "no runtime name")


class CommandTests(SynchronousTestCase):
    def test_start_command(self) -> None:
        b = _binary()
        argv, env = b.command(b.start_args())
        self.assertEqual(
            argv,
            [
                "/usr/bin/containerd-shim-runc-v2",
                "-namespace", "ns1",
                "-address", "/run/cdtwist/cdtwist.sock",
                "-publish-binary", "/var/lib/cdtwist/cdtwist-publish",
                "-id", "c1",
                "start",
            ],
        )  # fmt: skip
        self.assertEqual(
            env, {"PATH": "/usr/bin", "GOMAXPROCS": "2", "TTRPC_ADDRESS": "/run/cdtwist/cdtwist.sock.ttrpc"}
        )
        b.debug = True
        b.sched_core = True
        argv, env = b.command(b.start_args())
        self.assertEqual(argv[-3:], ["c1", "-debug", "start"])
        self.assertEqual(env["SCHED_CORE"], "1")

    def test_delete_command(self) -> None:
        b = _binary()
        argv, _ = b.command(b.delete_args())
        self.assertEqual(argv[7:], ["-id", "c1", "-bundle", "/state/ns1/c1", "delete"])

    def test_parse_outputs(self) -> None:
        self.assertEqual(parse_start_output(b"unix:///run/containerd/s/abc\n"), "unix:///run/containerd/s/abc")
        with self.assertRaises(CdtwistError):
            parse_start_output(b"  \n")
        out = shim_pb2.DeleteResponse(pid=7, exit_status=137, exited_at=timestamp()).SerializeToString()
        exit = parse_delete_output(out)
        self.assertEqual((exit.pid, exit.status, exit.timestamp.seconds), (7, 137, timestamp().seconds))
        empty = parse_delete_output(b"")
        self.assertEqual((empty.pid, empty.status), (0, 0))


class RunTests(TestCase):
    """Real processes through posix_spawn (no fork in a process holding grpcio objects)."""

    timeout = 20

    def test_output_stdin_and_cwd(self) -> Deferred[None]:
        d = short_tmpdir(self)

        async def run() -> None:
            result = await run_process(
                reactor,
                ["/bin/sh", "-c", 'pwd; cat; echo "$X" >&2; exit 3'],
                env={"X": "from-env", "PATH": "/usr/bin:/bin"},
                cwd=d,
                stdin=b"fed\n",
            )
            self.assertEqual(result.stdout, f"{d}\nfed\n".encode())
            self.assertEqual(result.stderr, b"from-env\n")
            self.assertEqual((result.exit_code, result.ok, result.describe()), (3, False, "exit status 3"))

        return ensureDeferred(run())

    def test_stdin_closed_without_input(self) -> Deferred[None]:
        async def run() -> None:
            result = await run_process(reactor, ["/bin/cat"], env={})
            self.assertEqual((result.stdout, result.exit_code), (b"", 0))

        return ensureDeferred(run())

    def test_timeout_kills(self) -> Deferred[None]:
        async def run() -> None:
            result = await run_process(reactor, ["/bin/sleep", "30"], env={}, timeout=0.2)
            self.assertEqual(result.signal, 9)
            self.assertEqual(result.describe(), "signal: killed")

        return ensureDeferred(run())

    def test_spawn_does_not_fork(self) -> Deferred[None]:
        """Children start through subprocess's vfork path: no preexec_fn, vfork allowed."""
        import threading

        seen: list[tuple[object, str]] = []
        original = subprocess.Popen

        def spy(*args: object, **kwargs: object) -> object:
            seen.append((kwargs.get("preexec_fn"), threading.current_thread().name))
            return original(*args, **kwargs)  # type: ignore[call-overload]

        self.patch(subprocess, "Popen", spy)

        async def run() -> None:
            await run_process(reactor, ["/bin/true"], env={}, cwd="/tmp")
            self.assertEqual([preexec for preexec, _ in seen], [None])
            self.assertTrue(getattr(subprocess, "_USE_VFORK", True))

        return ensureDeferred(run())

    def test_without_pidfd_a_thread_waits(self) -> Deferred[None]:
        from cdtwist.runtime import binary

        def no_pidfd(pid: int) -> int:
            raise OSError(38, "Function not implemented")

        self.patch(binary.os, "pidfd_open", no_pidfd)
        d = short_tmpdir(self)

        async def run() -> None:
            result = await run_process(
                reactor, ["/bin/sh", "-c", "pwd; cat; exit 2"], env={"PATH": "/usr/bin:/bin"}, cwd=d, stdin=b"x\n"
            )
            self.assertEqual((result.stdout, result.exit_code), (f"{d}\nx\n".encode(), 2))
            result = await run_process(reactor, ["/bin/sleep", "30"], env={}, timeout=0.2)
            self.assertEqual(result.signal, 9)

        return ensureDeferred(run())

    def test_large_output_and_input(self) -> Deferred[None]:
        """More than a pipe buffer each way: stdin is fed as the child drains it."""
        data = os.urandom(300_000)

        async def run() -> None:
            result = await run_process(reactor, ["/bin/cat"], env={}, stdin=data)
            self.assertEqual((result.stdout, result.exit_code), (data, 0))

        return ensureDeferred(run())

    def test_child_ignoring_stdin(self) -> Deferred[None]:
        async def run() -> None:
            result = await run_process(reactor, ["/bin/true"], env={}, stdin=os.urandom(300_000))
            self.assertEqual(result.exit_code, 0)

        return ensureDeferred(run())

    def test_no_descriptor_leaks(self) -> Deferred[None]:
        async def run() -> None:
            await run_process(reactor, ["/bin/true"], env={})
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(5):
                await run_process(reactor, ["/bin/cat"], env={}, stdin=b"x")
            self.assertEqual(len(os.listdir("/proc/self/fd")), before)

        return ensureDeferred(run())

    def test_missing_binary_reads_like_go(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(CdtwistError) as e:
                await run_process(reactor, ["/nonexistent/shim", "start"], env={})
            self.assertEqual(str(e.exception), "fork/exec /nonexistent/shim: no such file or directory")

        return ensureDeferred(run())

    def fake_shim(self) -> tuple[ShimBinary, str, str]:
        """A shim binary (a fake answering ``start`` and ``delete``) over a fresh bundle dir."""
        d = short_tmpdir(self)
        bundle_path = os.path.join(d, "bundle")
        os.mkdir(bundle_path)
        shim, record = write_fake_shim_binary(d, "unix:///run/fake/s.sock")
        b = _binary(bundle_path, shim)
        b.environ = dict(os.environ)
        return b, bundle_path, record

    def test_start_and_delete_with_a_fake_shim(self) -> Deferred[None]:
        b, bundle_path, record = self.fake_shim()

        async def run() -> None:
            opts = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x30\x01")
            address = await b.start(reactor, opts)
            self.assertEqual(address, "unix:///run/fake/s.sock")
            exit = await b.delete(reactor, timeout=10)
            self.assertEqual((exit.pid, exit.status), (4242, 137))
            start, delete = read_runs(record)
            self.assertEqual(start["cwd"], bundle_path)
            self.assertEqual(start["argv"][1:], b.command(b.start_args())[0][1:])
            self.assertEqual(start["stdin"], opts.SerializeToString().hex())
            env = {"GOMAXPROCS": "2", "TTRPC_ADDRESS": "/run/cdtwist/cdtwist.sock.ttrpc", "SCHED_CORE": None}
            self.assertEqual(start["env"], env)
            self.assertEqual(delete["argv"][-5:], ["-id", "c1", "-bundle", bundle_path, "delete"])
            self.assertEqual(delete["stdin"], "")

        return ensureDeferred(run())

    def test_delete_started_ahead_and_then(self) -> Deferred[None]:
        b, bundle_path, record = self.fake_shim()

        async def run() -> None:
            started = b.spawn_delete(reactor, timeout=10)
            self.assertEqual(started.argv, b.command(b.delete_args())[0])
            calls: list[str] = []
            exit = await b.delete(reactor, started=started, then=lambda: calls.append("then"))
            self.assertEqual((exit.pid, exit.status, calls), (4242, 137, ["then"]))
            self.assertEqual(len(read_runs(record)), 1)  # collected, not run again
            missing = _binary(bundle_path, os.path.join(os.path.dirname(bundle_path), "nope"))
            with self.assertRaises(CdtwistError) as e:
                await missing.delete(reactor, started=missing.spawn_delete(reactor), then=lambda: calls.append("x"))
            self.assertTrue(str(e.exception).startswith("failed to delete: fork/exec "), str(e.exception))
            self.assertEqual(calls, ["then"])

        return ensureDeferred(run())

    def test_start_failure_reads_like_go(self) -> Deferred[None]:
        d = short_tmpdir(self)
        shim, _ = write_fake_shim_binary(d, "unix:///x", fail="start")
        b = _binary(d, shim)
        b.environ = dict(os.environ)

        async def run() -> None:
            with self.assertRaises(CdtwistError) as e:
                await b.start(reactor, None)
            self.assertEqual(str(e.exception), "fake shim refuses to startsome detail: exit status 1")

        return ensureDeferred(run())


class PublishTests(SynchronousTestCase):
    def test_containerd_form(self) -> None:
        args = publish.parse(["--address", "/run/x.sock", "publish", "--topic", "/tasks/oom", "--namespace", "ns1"])
        self.assertEqual((args.address, args.topic, args.namespace), ("/run/x.sock", "/tasks/oom", "ns1"))
        args = publish.parse(["publish", "--address=/run/y.sock", "--topic=/a", "--namespace=n"])
        self.assertEqual((args.address, args.topic, args.namespace), ("/run/y.sock", "/a", "n"))
        args = publish.parse(["-a", "/z", "--log-level", "debug", "publish", "--topic", "/t"])
        self.assertEqual((args.address, args.namespace), ("/z", None))
        self.assertEqual(publish.parse(["publish"]).address, "/run/containerd/containerd.sock")
        with self.assertRaises(SystemExit):
            publish.parse(["--address", "/x", "version"])

    def test_written_binary_runs_this_checkout(self) -> None:
        d = short_tmpdir(self)
        path = publish.write_publish_binary(os.path.join(d, "bin", "cdtwist-publish"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o755)
        with open(path) as f:
            self.assertTrue(f.readline().startswith("#!" + sys.executable))
        # No topic: refused before any connection is tried, as containerd refuses it.
        proc = subprocess.run(
            [path, "--address", os.path.join(d, "none.sock"), "publish", "--namespace", "n"],
            input=b"",
            capture_output=True,
            env={"PATH": "/usr/bin:/bin"},
            timeout=30,
        )
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn(b"topic required to publish event", proc.stderr)
