"""The tasks service (containerd's services/tasks ``local``) over the runtime, a fake shim and fake containers.

Service methods block (they run on gRPC pool threads), so the tests call
them from a thread pool of their own while the reactor serves the fake
shim; the bridge's bounded waits, the shared Waits and the Wait cap are
checked here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cdtwist.api.runtime.runc.options import oci_pb2 as runc_options
from cdtwist.api.services.tasks.v1 import tasks_pb2 as api
from cdtwist.api.types.task import task_pb2
from cdtwist.errors import (
    AlreadyExists,
    Canceled,
    CdtwistError,
    DeadlineExceeded,
    GRPCStatus,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cdtwist.monitor.cgroups import TaskMonitor
from cdtwist.tasks import bridge
from cdtwist.tasks.service import Call, TasksService, check_runtime, checkpoint_path, restore_path
from tests.test_runtime_manager import FakeContainer, ManagerTestCase

T = TypeVar("T")

SPEC = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=json.dumps({}).encode())


class HelperTests(SynchronousTestCase):
    def test_check_runtime(self) -> None:
        self.assertTrue(check_runtime("io.containerd.runc.v2", "io.containerd.runc"))
        self.assertTrue(check_runtime("io.containerd.runc.v1", "io.containerd.runc"))
        self.assertFalse(check_runtime("io.containerd.kata.v2", "io.containerd.runc"))
        self.assertFalse(check_runtime("io", "io.containerd.runc"))

    def test_restore_and_checkpoint_paths(self) -> None:
        opts = any_pb2.Any(
            type_url="containerd.runc.v1.Options",
            value=runc_options.Options(criu_image_path="/img").SerializeToString(),
        )
        cp = any_pb2.Any(
            type_url="containerd.runc.v1.CheckpointOptions",
            value=runc_options.CheckpointOptions(image_path="/cp").SerializeToString(),
        )
        self.assertEqual(restore_path("io.containerd.runc.v2", opts), "/img")
        self.assertEqual(restore_path("io.containerd.runc.v2", None), "")
        self.assertEqual(restore_path("io.containerd.kata.v2", opts), "")
        with self.assertRaises(CdtwistError) as e:
            restore_path("io.containerd.runc.v2", cp)
        self.assertEqual(str(e.exception), "invalid task create option for io.containerd.runc.v2")
        self.assertEqual(checkpoint_path("io.containerd.runc.v2", cp), "/cp")
        with self.assertRaises(CdtwistError):
            checkpoint_path("io.containerd.runc.v2", opts)


class BridgeTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.pool = ThreadPool(0, 8, name="bridge-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, self.pool, fn, *args)

    def test_result_and_error(self) -> Deferred[None]:
        async def coro(x: int) -> int:
            await deferLater(reactor, 0.01, lambda: None)
            if x < 0:
                raise NotFound("neg")
            return x * 2

        async def run() -> None:
            self.assertEqual(await self.in_thread(bridge.call, reactor, coro, 21), 42)
            with self.assertRaises(NotFound):
                await self.in_thread(bridge.call, reactor, coro, -1)
            self.assertEqual(await self.in_thread(bridge.call, reactor, lambda: 7), 7)

        return ensureDeferred(run())

    def test_timeout_cancels(self) -> Deferred[None]:
        cancelled: list[bool] = []
        never: Deferred[None] = Deferred(lambda d: cancelled.append(True))

        async def run() -> None:
            started = time.monotonic()
            with self.assertRaises(DeadlineExceeded):
                await self.in_thread(lambda: bridge.call(reactor, lambda: never, timeout=0.2))
            self.assertLess(time.monotonic() - started, 2)
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(cancelled, [True])  # the work was cancelled on the reactor

        return ensureDeferred(run())

    def test_caller_gone(self) -> Deferred[None]:
        cancelled: list[bool] = []
        never: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        alive = threading.Event()
        alive.set()
        wakers: list[Callable[[], None]] = []

        def call() -> None:
            bridge.call(reactor, lambda: never, alive=alive.is_set, add_callback=wakers.append)

        async def run() -> None:
            d = self.in_thread(call)
            await deferLater(reactor, 0.1, lambda: None)
            started = time.monotonic()
            alive.clear()
            for fn in wakers:
                fn()
            with self.assertRaises(Canceled):
                await d
            self.assertLess(time.monotonic() - started, 0.5)  # woken, not polled
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(cancelled, [True])

        return ensureDeferred(run())


class TasksServiceTests(ManagerTestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        d = super().setUp()

        def more(_: object) -> None:
            self.pool = ThreadPool(0, 80, name="grpc-like")
            self.pool.start()
            self.addCleanup(self.pool.stop)
            self.monitor = TaskMonitor()
            self.service = TasksService(self.runtime, self.containers, self.monitor, reactor, max_waits=60)
            for ns, id in (("ns1", "c1"), ("ns1", "c2"), ("ns2", "c1")):
                self.containers.containers[(ns, id)] = FakeContainer(id, self.binary, spec=SPEC)
            self.manager.start()

        return d.addCallback(more)

    def call(self, method: Callable[..., T], request: Any, ns: str = "ns1", **kw: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, self.pool, method, Call(namespace=ns, **kw), request)

    async def create(self, id: str = "c1", ns: str = "ns1") -> api.CreateTaskResponse:
        return await self.call(
            self.service.create, api.CreateTaskRequest(container_id=id, stdout="/f/out", terminal=False), ns
        )

    def test_lifecycle(self) -> Deferred[None]:
        async def run() -> None:
            created = await self.create()
            self.assertEqual((created.container_id, created.pid), ("c1", 4242))
            self.assertEqual(self.monitor.monitored(), {("ns1", "c1"): {"runtime": self.binary}})
            started = await self.call(self.service.start_process, api.StartRequest(container_id="c1"))
            self.assertEqual(started.pid, 4242)
            got = await self.call(self.service.get, api.GetRequest(container_id="c1"))
            self.assertEqual((got.process.id, got.process.pid, got.process.status), ("c1", 4242, task_pb2.RUNNING))
            self.assertEqual(got.process.stdout, "/fifo/out")
            listed = await self.call(self.service.list, api.ListTasksRequest())
            self.assertEqual([p.id for p in listed.tasks], ["c1"])
            other_ns = await self.call(self.service.list, api.ListTasksRequest(), "ns2")
            self.assertEqual(list(other_ns.tasks), [])
            await self.call(self.service.pause, api.PauseTaskRequest(container_id="c1"))
            got = await self.call(self.service.get, api.GetRequest(container_id="c1"))
            self.assertEqual(got.process.status, task_pb2.PAUSED)
            await self.call(self.service.resume, api.ResumeTaskRequest(container_id="c1"))
            pids = await self.call(self.service.list_pids, api.ListPidsRequest(container_id="c1"))
            self.assertEqual([p.pid for p in pids.processes], [4242])
            metrics = await self.call(self.service.metrics, api.MetricsRequest(filters=["id==c1"]))
            (metric,) = metrics.metrics
            self.assertEqual((metric.id, metric.data.type_url), ("c1", "io.containerd.cgroups.v1.Metrics"))
            self.assertGreater(metric.timestamp.seconds, 0)
            none = await self.call(self.service.metrics, api.MetricsRequest(filters=["id==other"]))
            self.assertEqual(list(none.metrics), [])
            waiting = self.call(self.service.wait, api.WaitRequest(container_id="c1"))
            await self.call(self.service.kill, api.KillRequest(container_id="c1", signal=9))
            self.assertEqual((await waiting).exit_status, 137)
            deleted = await self.call(self.service.delete_task, api.DeleteTaskRequest(container_id="c1"))
            self.assertEqual((deleted.pid, deleted.exit_status, deleted.id), (4242, 137, ""))
            self.assertEqual(self.monitor.monitored(), {})
            with self.assertRaises(GRPCStatus) as e:
                await self.call(self.service.get, api.GetRequest(container_id="c1"))
            self.assertEqual((e.exception.code, str(e.exception)), (grpc.StatusCode.NOT_FOUND, "task c1 not found"))
            self.assertEqual({ns for _, _, ns in self.fake.calls}, {"ns1"})

        return ensureDeferred(run())

    def test_exec(self) -> Deferred[None]:
        async def run() -> None:
            await self.create()
            await self.call(self.service.start_process, api.StartRequest(container_id="c1"))
            with self.assertRaises(GRPCStatus) as e:
                await self.call(self.service.exec, api.ExecProcessRequest(container_id="c1"))
            self.assertEqual(
                (e.exception.code, str(e.exception)), (grpc.StatusCode.INVALID_ARGUMENT, "exec id cannot be empty")
            )
            spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=b"{}")
            await self.call(
                self.service.exec, api.ExecProcessRequest(container_id="c1", exec_id="e1", stdout="/o", spec=spec)
            )
            exec_req = next(r for m, r, _ in self.fake.calls if m == "Exec")
            self.assertEqual((exec_req.exec_id, exec_req.stdout, exec_req.spec), ("e1", "/o", spec))
            started = await self.call(self.service.start_process, api.StartRequest(container_id="c1", exec_id="e1"))
            got = await self.call(self.service.get, api.GetRequest(container_id="c1", exec_id="e1"))
            self.assertEqual((got.process.id, got.process.pid), ("e1", started.pid))
            with self.assertRaises(NotFound) as e2:
                await self.call(self.service.kill, api.KillRequest(container_id="c1", exec_id="nope", signal=9))
            self.assertEqual(str(e2.exception), "process nope does not exist: not found")
            waiting = self.call(self.service.wait, api.WaitRequest(container_id="c1", exec_id="e1"))
            await self.call(self.service.kill, api.KillRequest(container_id="c1", exec_id="e1", signal=9))
            self.assertEqual((await waiting).exit_status, 137)
            deleted = await self.call(
                self.service.delete_process, api.DeleteProcessRequest(container_id="c1", exec_id="e1")
            )
            self.assertEqual((deleted.id, deleted.pid, deleted.exit_status), ("e1", started.pid, 137))
            await self.call(self.service.resize_pty, api.ResizePtyRequest(container_id="c1", width=1, height=2))
            await self.call(self.service.close_io, api.CloseIORequest(container_id="c1", stdin=True))
            await self.call(self.service.update, api.UpdateTaskRequest(container_id="c1", annotations={"a": "b"}))
            self.assertEqual(self.fake.methods()[-3:], ["ResizePty", "CloseIO", "Update"])

        return ensureDeferred(run())

    def test_errors(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(NotFound) as e:
                await self.call(self.service.start_process, api.StartRequest(container_id="nope"))
            self.assertEqual(str(e.exception), 'container "nope" in namespace "ns1": not found')
            with self.assertRaises(GRPCStatus) as e2:
                await self.call(self.service.kill, api.KillRequest(container_id="c2", signal=9))
            self.assertEqual(str(e2.exception), "task c2 not found")
            await self.create()
            with self.assertRaises(AlreadyExists) as e3:
                await self.create()
            self.assertEqual(str(e3.exception), "task c1: already exists")
            with self.assertRaises(InvalidArgument):
                await self.call(self.service.metrics, api.MetricsRequest(filters=["id=="]))

        return ensureDeferred(run())

    def test_create_drops_a_bundle_it_did_not_use(self) -> Deferred[None]:
        """The bundle made on the calling thread goes when the reactor side fails before taking it."""

        async def run() -> None:
            get = self.runtime.get

            def failing(namespace: str, id: str) -> Any:
                raise CdtwistError("boom")

            self.runtime.get = failing  # type: ignore[method-assign]
            try:
                with self.assertRaises(CdtwistError) as e:
                    await self.create()
            finally:
                self.runtime.get = get  # type: ignore[method-assign]
            self.assertEqual(str(e.exception), "boom")
            bundle = os.path.join(self.state, "ns1", "c1")
            for _ in range(100):
                if not os.path.exists(bundle):
                    break
                await deferLater(reactor, 0.02, lambda: None)
            self.assertFalse(os.path.exists(bundle))
            created = await self.create()  # the id is free again
            self.assertEqual(created.pid, 4242)

        return ensureDeferred(run())

    def test_many_waits_share_one_shim_wait(self) -> Deferred[None]:
        """50 concurrent Waits: one shim Wait, no reactor or I/O thread held, all answered."""

        async def run() -> None:
            await self.create()
            await self.call(self.service.start_process, api.StartRequest(container_id="c1"))
            waits = [self.call(self.service.wait, api.WaitRequest(container_id="c1")) for _ in range(50)]
            for _ in range(100):
                if self.service.waiting == 50 and self.fake.count("Wait") == 1:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(self.service.waiting, 50)
            # other calls are served meanwhile, and the reactor's own pool is free
            got = await self.call(self.service.get, api.GetRequest(container_id="c1"))
            self.assertEqual(got.process.status, task_pb2.RUNNING)
            self.assertEqual(self.fake.count("Wait"), 1)
            self.fake.exit("", 3)
            results = await gatherResults(waits)
            self.assertEqual({r.exit_status for r in results}, {3})
            self.assertEqual(self.service.waiting, 0)

        return ensureDeferred(run())

    def test_wait_cap(self) -> Deferred[None]:
        async def run() -> None:
            self.service = TasksService(self.runtime, self.containers, self.monitor, reactor, max_waits=2)
            await self.create()
            waits = [self.call(self.service.wait, api.WaitRequest(container_id="c1")) for _ in range(2)]
            for _ in range(100):
                if self.service.waiting == 2:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            with self.assertRaises(GRPCStatus) as e:
                await self.call(self.service.wait, api.WaitRequest(container_id="c1"))
            self.assertEqual(e.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.fake.exit("", 0)
            await gatherResults(waits)
            # the slots are back
            self.assertEqual((await self.call(self.service.wait, api.WaitRequest(container_id="c1"))).exit_status, 0)

        return ensureDeferred(run())

    def test_wait_ends_when_the_client_goes(self) -> Deferred[None]:
        async def run() -> None:
            await self.create()
            alive = threading.Event()
            alive.set()
            wakers: list[Callable[[], None]] = []
            d = self.call(
                self.service.wait, api.WaitRequest(container_id="c1"), alive=alive.is_set, add_callback=wakers.append
            )
            for _ in range(100):
                if self.service.waiting == 1 and wakers:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            alive.clear()
            for fn in wakers:
                fn()
            with self.assertRaises(Canceled):
                await d
            self.assertEqual(self.service.waiting, 0)
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(self.runtime.get("ns1", "c1").waiting(), 0)

        return ensureDeferred(run())

    def test_drain_ends_waits(self) -> Deferred[None]:
        async def run() -> None:
            await self.create()
            waits = [self.call(self.service.wait, api.WaitRequest(container_id="c1")) for _ in range(5)]
            for _ in range(100):
                if self.service.waiting == 5:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            started = time.monotonic()
            self.service.drain()
            for d in waits:
                with self.assertRaises(Unavailable):
                    await d
            self.assertLess(time.monotonic() - started, 0.5)

        return ensureDeferred(run())

    def test_calls_wait_for_recovery(self) -> Deferred[None]:
        async def run() -> None:
            # a second manager whose recovery is held by a slow shim
            from cdtwist.runtime.bundle import new_bundle
            from cdtwist.runtime.manager import TaskManager

            b = new_bundle(self.root, self.state, "ns1", "c2", b"{}")
            with open(b.file("address"), "w") as f:
                f.write(self.address)
            with open(b.file("shim-binary-path"), "w") as f:
                f.write(self.binary)
            self.fake.status[""] = task_pb2.RUNNING  # the shim's task runs
            self.fake.pids[""] = 4242
            held: Deferred[None] = Deferred()
            self.fake.held["Connect"] = held
            runtime = TaskManager(self.new_manager())
            runtime.start()
            service = TasksService(runtime, self.containers, self.monitor, reactor)
            listing = self.call(service.list, api.ListTasksRequest())
            await deferLater(reactor, 0.2, lambda: None)
            self.assertFalse(listing.called)
            del self.fake.held["Connect"]
            held.callback(None)
            listed = await listing
            self.assertEqual([p.id for p in listed.tasks], ["c2"])

        return ensureDeferred(run())

    def test_task_not_found_after_shim_death(self) -> Deferred[None]:
        async def run() -> None:
            await self.create()
            shim = self.runtime.get("ns1", "c1")
            self.fake.drop()
            await shim.close_handled
            with self.assertRaises(GRPCStatus) as e:
                await self.call(self.service.get, api.GetRequest(container_id="c1"))
            self.assertEqual(str(e.exception), "task c1 not found")
            self.assertEqual(self.exchange.topics(), ["/tasks/exit", "/tasks/delete"])

        return ensureDeferred(run())
