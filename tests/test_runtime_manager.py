"""The v2 shim manager end to end with a fake shim binary and an in-process fake shim.

What containerd's ``runtime/v2`` does is checked step by step: bundle and
files, the ``start`` command, the task created in the shim, deletion
(Delete, Shutdown, ``<shim> delete``, bundle removal), a shim dying (exit
and delete events on its behalf), recovery at boot (live shims reconnected,
dead ones cleaned up, stray dirs removed) and stop (shims left running).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cdtwist.api.events import task_pb2 as events
from cdtwist.errors import AlreadyExists, CdtwistError, GRPCStatus, NotFound
from cdtwist.runtime.bundle import new_bundle
from cdtwist.runtime.manager import ShimLog, ShimManager, TaskList, TaskManager, TaskNotExists, Timeouts, wrap_error
from cdtwist.runtime.shim import IO, CreateOpts
from tests.test_runtime_shim import FakeShim, read_runs, short_tmpdir, timestamp, write_fake_shim_binary

SPEC = json.dumps({"ociVersion": "1.0.2"}).encode()


class FakeExchange:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, Any]] = []

    def publish(self, namespace: str, topic: str, event: Any) -> None:
        self.published.append((namespace, topic, event))

    def topics(self) -> list[str]:
        return [t for _, t, _ in self.published]


@dataclass
class FakeContainer:
    id: str
    runtime_name: str
    spec: Any = None
    runtime_options: Any = None


class FakeContainers:
    def __init__(self) -> None:
        self.containers: dict[tuple[str, str], FakeContainer] = {}

    def get(self, namespace: str, id: str) -> FakeContainer:
        try:
            return self.containers[(namespace, id)]
        except KeyError:
            raise NotFound(f'container "{id}" in namespace "{namespace}"') from None


class UnitTests(SynchronousTestCase):
    def test_task_list(self) -> None:
        tasks = TaskList()

        class T:
            def __init__(self, ns: str, id: str) -> None:
                self.namespace, self.id = ns, id

        a, b = T("ns1", "a"), T("ns2", "a")
        tasks.add(a)  # type: ignore[arg-type]
        tasks.add(b)  # type: ignore[arg-type]
        with self.assertRaises(AlreadyExists) as e:
            tasks.add(T("ns1", "a"))  # type: ignore[arg-type]
        self.assertEqual(str(e.exception), "a: task already exists: already exists")
        self.assertIs(tasks.get("ns1", "a"), a)
        with self.assertRaises(TaskNotExists) as e2:
            tasks.get("ns1", "b")
        self.assertEqual(str(e2.exception), "task does not exist")
        self.assertEqual(tasks.get_all("ns1"), [a])
        self.assertEqual(len(tasks.get_all(None)), 2)
        tasks.delete("ns1", "a", b)  # type: ignore[arg-type]  # not that task: kept
        self.assertIn(("ns1", "a"), tasks)
        tasks.delete("ns1", "a")
        self.assertNotIn(("ns1", "a"), tasks)

    def test_wrap_error_keeps_class(self) -> None:
        err = wrap_error("failed to create shim task", NotFound("process x"))
        self.assertIsInstance(err, NotFound)
        self.assertEqual(str(err), "failed to create shim task: process x: not found")
        plain = wrap_error("start failed", CdtwistError("boom: exit status 1"))
        self.assertEqual(str(plain), "start failed: boom: exit status 1")
        import grpc

        status = wrap_error("x", GRPCStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, "big"))
        self.assertEqual((status.code, str(status)), (grpc.StatusCode.RESOURCE_EXHAUSTED, "x: big"))  # type: ignore[attr-defined]
        self.assertEqual(str(wrap_error("p", OSError(2, "gone"))), "p: [Errno 2] gone")


class ManagerTestCase(TestCase):
    timeout = 30

    def setUp(self) -> Deferred[None]:
        self.dir = short_tmpdir(self)
        self.root = os.path.join(self.dir, "root", "io.containerd.runtime.v2.task")
        self.state = os.path.join(self.dir, "state", "io.containerd.runtime.v2.task")
        self.fake = FakeShim()
        self.exchange = FakeExchange()
        self.containers = FakeContainers()
        self.shim_logs: list[bytes] = []

        async def setup() -> None:
            self.address = await self.fake.listen(os.path.join(self.dir, "shim.sock"))
            self.addCleanup(lambda: ensureDeferred(self.fake.stop()))
            self.binary, self.record = write_fake_shim_binary(self.dir, self.address)
            self.manager = self.new_manager()
            self.runtime = TaskManager(self.manager)

        return ensureDeferred(setup())

    def new_manager(self) -> ShimManager:
        manager = ShimManager(
            root=self.root,
            state=self.state,
            address="/run/cdtwist-test/c.sock",
            ttrpc_address="/run/cdtwist-test/c.sock.ttrpc",
            publish_binary="/bin/true",
            exchange=self.exchange,  # type: ignore[arg-type]
            containers=self.containers,
            reactor=reactor,
            io_pool=reactor.getThreadPool(),
            timeouts=Timeouts(load=2, cleanup=5, shutdown=2, state=2),
            shim_log_writer=self.shim_logs.append,
        )
        self.addCleanup(manager.stop)
        return manager

    def opts(self, **kw: Any) -> CreateOpts:
        return CreateOpts(spec=SPEC, runtime=self.binary, **kw)

    def runs(self) -> list[str]:
        return [run["argv"][-1] for run in read_runs(self.record)]

    def bundle_path(self, ns: str = "ns1", id: str = "c1") -> str:
        return os.path.join(self.state, ns, id)


class LifecycleTests(ManagerTestCase):
    def test_create_lays_out_the_bundle_and_starts_the_shim(self) -> Deferred[None]:
        async def run() -> None:
            options = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x30\x01")
            shim = await self.runtime.create("ns1", "c1", self.opts(runtime_options=options, io=IO(stdout="/f/o")))
            self.assertIs(self.runtime.get("ns1", "c1"), shim)
            path = self.bundle_path()
            self.assertEqual(
                sorted(os.listdir(path)), ["address", "config.json", "log", "rootfs", "shim-binary-path", "work"]
            )
            self.assertTrue(stat.S_ISFIFO(os.stat(os.path.join(path, "log")).st_mode))
            with open(os.path.join(path, "shim-binary-path")) as f:
                self.assertEqual(f.read(), self.binary)
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(path, "shim-binary-path")).st_mode), 0o600)
            (start,) = read_runs(self.record)
            self.assertEqual(start["cwd"], path)
            self.assertEqual(start["stdin"], options.SerializeToString().hex())
            self.assertEqual(
                start["argv"][1:],
                ["-namespace", "ns1", "-address", "/run/cdtwist-test/c.sock", "-publish-binary", "/bin/true",
                 "-id", "c1", "start"],
            )  # fmt: skip
            self.assertEqual(start["env"]["TTRPC_ADDRESS"], "/run/cdtwist-test/c.sock.ttrpc")
            create = next(req for m, req, _ in self.fake.calls if m == "Create")
            self.assertEqual((create.bundle, create.stdout), (path, "/f/o"))
            self.assertEqual(create.options, options)
            self.assertEqual(self.exchange.published, [])  # the shim publishes task events, not the daemon

        return ensureDeferred(run())

    def test_create_in_a_prepared_bundle(self) -> Deferred[None]:
        async def run() -> None:
            self.assertTrue(self.runtime.is_ready())
            self.assertFalse(self.runtime.exists("ns1", "c1"))
            prepared = await deferToThread(self.runtime.prepare, "ns1", "c1", self.opts())
            self.assertEqual(
                sorted(os.listdir(self.bundle_path())), ["config.json", "log", "rootfs", "shim-binary-path", "work"]
            )
            shim = await self.runtime.create("ns1", "c1", self.opts(), prepared)
            self.assertTrue(prepared.taken)
            self.assertTrue(self.runtime.exists("ns1", "c1"))
            self.assertIs(self.runtime.get("ns1", "c1"), shim)
            (start,) = read_runs(self.record)
            self.assertEqual(start["cwd"], self.bundle_path())
            await self.runtime.discard(prepared)  # taken: nothing happens
            self.assertTrue(os.path.isdir(self.bundle_path()))

        return ensureDeferred(run())

    def test_prepare_errors_and_discard(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(CdtwistError) as e:
                await deferToThread(self.runtime.prepare, "ns1", "c1", CreateOpts(spec=SPEC, runtime="nope"))
            self.assertEqual(
                str(e.exception),
                "failed to start shim: failed to resolve runtime path: invalid runtime name nope, correct runtime "
                "name should be either format like `io.containerd.runc.v1` or a full path to the binary",
            )
            self.assertFalse(os.path.exists(self.bundle_path()))
            prepared = await deferToThread(self.runtime.prepare, "ns1", "c1", self.opts())
            with self.assertRaises(CdtwistError) as e2:  # the bundle dir is taken
                await deferToThread(self.runtime.prepare, "ns1", "c1", self.opts())
            self.assertIn("file exists", str(e2.exception))
            await self.runtime.discard(prepared)
            self.assertTrue(prepared.taken)
            self.assertFalse(os.path.exists(self.bundle_path()))
            self.assertFalse(os.path.exists(os.path.join(self.root, "ns1", "c1")))
            with self.assertRaises(OSError):
                os.fstat(prepared.log_fd)
            self.assertEqual(read_runs(self.record), [])

        return ensureDeferred(run())

    def test_shim_log_is_copied(self) -> Deferred[None]:
        async def run() -> None:
            await self.runtime.create("ns1", "c1", self.opts())
            fd = os.open(os.path.join(self.bundle_path(), "log"), os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b'time="x" level=info msg="starting signal loop"\n')
            os.close(fd)
            for _ in range(50):
                if self.shim_logs:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(b"".join(self.shim_logs), b'time="x" level=info msg="starting signal loop"\n')

        return ensureDeferred(run())

    def test_delete(self) -> Deferred[None]:
        async def run() -> None:
            shim = await self.runtime.create("ns1", "c1", self.opts())
            exit = await self.runtime.delete("ns1", "c1")
            self.assertEqual(exit.pid, 4242)
            self.assertEqual(self.fake.methods()[-2:], ["Delete", "Shutdown"])
            # the close handler ran `<shim> delete` (as containerd's onClose does), then the bundle went
            self.assertTrue(shim.close_handled.called)
            self.assertEqual(self.runs(), ["start", "delete"])
            self.assertFalse(os.path.exists(self.bundle_path()))
            self.assertEqual(os.listdir(os.path.join(self.root, "ns1")), [])
            self.assertEqual(self.runtime.tasks("ns1"), [])
            self.assertEqual(self.exchange.published, [])  # the task was removed before the shim went

        return ensureDeferred(run())

    def test_delete_of_a_running_task_fails_and_keeps_it(self) -> Deferred[None]:
        async def run() -> None:
            shim = await self.runtime.create("ns1", "c1", self.opts())
            await shim.start()
            with self.assertRaises(CdtwistError) as e:
                await self.runtime.delete("ns1", "c1")
            self.assertEqual(
                str(e.exception), "failed to delete task: cannot delete a running process: failed precondition"
            )
            self.assertIs(self.runtime.get("ns1", "c1"), shim)
            self.assertTrue(os.path.exists(self.bundle_path()))

        return ensureDeferred(run())

    def test_dead_shim_is_cleaned_up_with_events(self) -> Deferred[None]:
        async def run() -> None:
            shim = await self.runtime.create("ns1", "c1", self.opts())
            self.fake.drop()
            await shim.close_handled
            self.assertEqual(self.runs(), ["start", "delete"])
            self.assertEqual(self.exchange.topics(), ["/tasks/exit", "/tasks/delete"])
            (ns, _, exit), (_, _, delete) = self.exchange.published
            self.assertEqual(ns, "ns1")
            self.assertEqual(
                exit, events.TaskExit(container_id="c1", id="c1", pid=4242, exit_status=137, exited_at=timestamp())
            )
            self.assertEqual(
                delete, events.TaskDelete(container_id="c1", pid=4242, exit_status=137, exited_at=timestamp())
            )
            with self.assertRaises(TaskNotExists):
                self.runtime.get("ns1", "c1")
            self.assertFalse(os.path.exists(self.bundle_path()))

        return ensureDeferred(run())

    def test_failed_shim_delete_publishes_255(self) -> Deferred[None]:
        async def run() -> None:
            self.binary, self.record = write_fake_shim_binary(self.dir, self.address, fail="delete", name="bad-shim")
            shim = await self.runtime.create("ns1", "c1", self.opts())
            self.fake.drop()
            await shim.close_handled
            (_, _, exit), (_, _, delete) = self.exchange.published
            self.assertEqual((exit.pid, exit.exit_status), (0, 255))
            self.assertEqual(delete.exit_status, 255)
            self.assertGreater(exit.exited_at.seconds, 0)

        return ensureDeferred(run())

    def test_create_failure_in_the_shim(self) -> Deferred[None]:
        async def run() -> None:
            self.fake.errors["Create"] = CdtwistError("OCI runtime create failed: no such file: unknown")
            with self.assertRaises(CdtwistError) as e:
                await self.runtime.create("ns1", "c1", self.opts())
            self.assertEqual(
                str(e.exception), "failed to create shim task: OCI runtime create failed: no such file: unknown"
            )
            self.assertEqual(self.runtime.tasks("ns1"), [])
            self.assertFalse(os.path.exists(self.bundle_path()))
            self.assertEqual(self.exchange.published, [])

        return ensureDeferred(run())

    def test_start_failure(self) -> Deferred[None]:
        async def run() -> None:
            self.binary, _ = write_fake_shim_binary(self.dir, self.address, fail="start", name="no-start")
            with self.assertRaises(CdtwistError) as e:
                await self.runtime.create("ns1", "c1", self.opts())
            self.assertEqual(
                str(e.exception),
                "failed to start shim: start failed: fake shim refuses to startsome detail: exit status 1",
            )
            self.assertFalse(os.path.exists(self.bundle_path()))
            self.assertFalse(os.path.exists(os.path.join(self.root, "ns1", "c1")))
            self.assertEqual(self.fake.calls, [])

        return ensureDeferred(run())

    def test_unknown_runtime(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(CdtwistError) as e:
                await self.runtime.create("ns1", "c1", CreateOpts(spec=SPEC, runtime="io.containerd.nope.v7"))
            self.assertEqual(
                str(e.exception),
                'failed to start shim: failed to resolve runtime path: runtime "io.containerd.nope.v7" binary not '
                'installed "containerd-shim-nope-v7": file does not exist',
            )
            self.assertFalse(os.path.exists(self.bundle_path()))

        return ensureDeferred(run())

    def test_same_id_twice(self) -> Deferred[None]:
        async def run() -> None:
            await self.runtime.create("ns1", "c1", self.opts())
            with self.assertRaises(CdtwistError) as e:
                await self.runtime.create("ns1", "c1", self.opts())
            self.assertEqual(str(e.exception), f"failed to start shim: mkdir {self.bundle_path()}: file exists")
            self.assertEqual(len(self.runtime.tasks("ns1")), 1)

        return ensureDeferred(run())

    def test_stop_leaves_shims_alone(self) -> Deferred[None]:
        async def run() -> None:
            shim = await self.runtime.create("ns1", "c1", self.opts())
            self.manager.stop()
            await shim.close_handled
            self.assertEqual(self.runs(), ["start"])  # no `<shim> delete`
            self.assertTrue(os.path.exists(os.path.join(self.bundle_path(), "address")))
            self.assertEqual(self.exchange.published, [])

        return ensureDeferred(run())


class RecoveryTests(ManagerTestCase):
    def make_bundle(self, ns: str, id: str, *, address: str | None, binary: str | None) -> str:
        b = new_bundle(self.root, self.state, ns, id, SPEC)
        if address is not None:
            with open(b.file("address"), "w") as f:
                f.write(address)
        if binary is not None:
            with open(b.file("shim-binary-path"), "w") as f:
                f.write(binary)
        return b.path

    def test_recovery(self) -> Deferred[None]:
        async def run() -> None:
            live = self.make_bundle("ns1", "live", address=self.address, binary=self.binary)
            # a killed shim leaves its socket file: nothing listens there any more
            stale = os.path.join(self.dir, "gone.sock")
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(stale)
            sock.close()
            dead = self.make_bundle("ns1", "dead", address="unix://" + stale, binary=self.binary)
            # 1.5 bundles had no shim-binary-path: the runtime comes from the container
            self.containers.containers[("ns2", "old")] = FakeContainer("old", self.binary)
            old = self.make_bundle("ns2", "old", address=self.address, binary=None)
            orphan = self.make_bundle("ns2", "orphan", address=self.address, binary=None)  # no container
            empty = os.path.join(self.state, "ns1", "empty")
            os.makedirs(empty)
            os.makedirs(os.path.join(self.root, "ns1", "stray-work"))
            os.makedirs(os.path.join(self.state, ".hidden", "x"))
            self.manager.start()
            await self.runtime.ready()
            self.assertEqual(sorted(t.id for t in self.runtime.tasks(None)), ["live", "old"])
            self.assertEqual(self.fake.count("Connect"), 2)
            self.assertEqual({ns for m, _, ns in self.fake.calls}, {"ns1", "ns2"})
            self.assertTrue(os.path.exists(live) and os.path.exists(old))
            for gone in (dead, orphan, empty, os.path.join(self.root, "ns1", "stray-work"),
                         os.path.join(self.root, "ns1", "dead"), os.path.join(self.root, "ns2", "orphan")):  # fmt: skip
                self.assertFalse(os.path.exists(gone), gone)
            self.assertTrue(os.path.exists(os.path.join(self.root, "ns1", "live")))
            self.assertTrue(os.path.exists(os.path.join(self.state, ".hidden", "x")))
            self.assertFalse(os.path.exists(stale))
            self.assertTrue(os.path.exists(self.fake.path))  # a live shim's socket is kept
            # the dead one got `<shim> delete`; it was never listed, so no events
            (delete,) = read_runs(self.record)
            self.assertEqual(delete["argv"][-5:], ["-id", "dead", "-bundle", dead, "delete"])
            self.assertEqual(self.exchange.published, [])
            # a reconnected shim is managed as any other
            shim = self.runtime.get("ns1", "live")
            self.assertEqual(await shim.pid(), 4242)

        return ensureDeferred(run())

    def test_ready_waits_for_slow_shims(self) -> Deferred[None]:
        async def run() -> None:
            self.make_bundle("ns1", "slow", address=self.address, binary=self.binary)
            answer: Deferred[None] = Deferred()
            self.fake.held["Connect"] = answer
            self.manager.start()
            ready = self.runtime.ready()
            await deferLater(reactor, 0.2, lambda: None)
            self.assertFalse(ready.called)
            answer.callback(None)
            await ready
            self.assertEqual([t.id for t in self.runtime.tasks("ns1")], ["slow"])

        return ensureDeferred(run())

    def test_unresponsive_shim_times_out_and_is_cleaned(self) -> Deferred[None]:
        async def run() -> None:
            path = self.make_bundle("ns1", "hung", address=self.address, binary=self.binary)
            self.fake.held["Connect"] = Deferred()
            self.manager.timeouts.load = 0.3
            self.manager.start()
            await self.runtime.ready()
            self.assertEqual(self.runtime.tasks("ns1"), [])
            self.assertEqual(self.runs(), ["delete"])
            self.assertFalse(os.path.exists(path))

        return ensureDeferred(run())


class ShimLogTests(TestCase):
    def test_reads_until_closed(self) -> Deferred[None]:
        d = short_tmpdir(self)
        path = os.path.join(d, "log")
        os.mkfifo(path, 0o700)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        got: list[bytes] = []
        log = ShimLog(reactor, fd, got.append)
        self.addCleanup(log.close)

        async def run() -> None:
            w = os.open(path, os.O_WRONLY)
            os.write(w, b"one\n")
            os.close(w)  # a writer going away is no EOF: we hold the FIFO open
            w = os.open(path, os.O_WRONLY)
            os.write(w, b"two\n")
            os.close(w)
            for _ in range(50):
                if b"".join(got) == b"one\ntwo\n":
                    break
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(b"".join(got), b"one\ntwo\n")
            log.close()
            self.assertEqual(log.fileno(), -1)

        return ensureDeferred(run())
