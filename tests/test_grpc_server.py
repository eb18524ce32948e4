"""The grpcio server service: sockets, error mapping, metrics, orderly stop."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import empty_pb2
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from cdtwist.api.services.version.v1 import version_pb2, version_pb2_grpc
from cdtwist.errors import AlreadyExists, NotFound
from cdtwist.grpc.server import GRPCServerService, HandoffPool


class Servicer(version_pb2_grpc.VersionServicer):
    mode = "ok"

    def register_grpc(self, server: grpc.Server) -> None:
        version_pb2_grpc.add_VersionServicer_to_server(self, server)

    def Version(self, request: Any, context: grpc.ServicerContext) -> version_pb2.VersionResponse:  # noqa: N802
        if self.mode == "notfound":
            raise NotFound('thing "x"')
        if self.mode == "crash":
            raise ZeroDivisionError("oops")
        return version_pb2.VersionResponse(version="v", revision="r")


def grpc_config(address: str, **overrides: Any) -> SimpleNamespace:
    base = dict(
        address=address,
        tcp_address="",
        tcp_tls_cert="",
        tcp_tls_key="",
        tcp_tls_ca="",
        uid=0,
        gid=0,
        max_recv_message_size=16 << 20,
        max_send_message_size=16 << 20,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


class GRPCServerTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cdtg")
        self.addCleanup(lambda: os.path.isdir(self.dir) and __import__("shutil").rmtree(self.dir))
        self.address = os.path.join(self.dir, "sub", "api.sock")
        self.pool = ThreadPool(0, 4, name="test-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.servicer = Servicer()
        self.registry = CollectorRegistry()
        self.service = GRPCServerService(
            grpc_config(self.address),
            lambda: [self.servicer],
            reactor=reactor,
            io_pool=self.pool,
            metrics_registry=self.registry,
        )

    async def start(self) -> None:
        await self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def call(self) -> Any:
        def blocking() -> Any:
            with grpc.insecure_channel("unix:" + self.address) as channel:
                try:
                    return version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=5)
                except grpc.RpcError as e:
                    return e

        return deferToThreadPool(reactor, self.pool, blocking)

    async def test_serves_with_socket_mode_0660_in_new_dir(self) -> None:
        await self.start()
        self.assertEqual(stat.S_IMODE(os.stat(self.address).st_mode), 0o660)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.address)).st_mode), 0o770)
        response = await self.call()
        self.assertEqual((response.version, response.revision), ("v", "r"))

    async def test_errors_map_to_containerd_codes(self) -> None:
        await self.start()
        self.servicer.mode = "notfound"
        err = await self.call()
        self.assertEqual(err.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(err.details(), 'thing "x": not found')
        self.servicer.mode = "crash"
        err = await self.call()
        self.assertEqual(err.code(), grpc.StatusCode.UNKNOWN)
        self.assertEqual(err.details(), "oops")
        self.flushLoggedErrors(ZeroDivisionError)

    async def test_metrics_count_calls_by_code(self) -> None:
        await self.start()
        await self.call()
        self.servicer.mode = "notfound"
        await self.call()
        labels = {
            "grpc_type": "unary",
            "grpc_service": "containerd.services.version.v1.Version",
            "grpc_method": "Version",
        }
        value = self.registry.get_sample_value
        self.assertEqual(value("grpc_server_started_total", labels), 2.0)
        self.assertEqual(value("grpc_server_handled_total", dict(labels, grpc_code="OK")), 1.0)
        self.assertEqual(value("grpc_server_handled_total", dict(labels, grpc_code="NotFound")), 1.0)

    async def test_stop_removes_socket(self) -> None:
        await self.start()
        await self.service.stopService()
        self.assertFalse(os.path.exists(self.address))

    async def test_stale_socket_replaced(self) -> None:
        os.makedirs(os.path.dirname(self.address))
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(self.address)
        dead.close()
        await self.start()
        self.assertEqual((await self.call()).version, "v")

    async def test_live_socket_refused(self) -> None:
        os.makedirs(os.path.dirname(self.address))
        live = socket.socket(socket.AF_UNIX)
        live.bind(self.address)
        live.listen(1)
        self.addCleanup(live.close)
        with self.assertRaises(AlreadyExists):
            await self.service.startService()
        self.assertTrue(os.path.exists(self.address))

    async def test_unknown_method_and_service_answer_like_grpc_go(self) -> None:
        await self.start()

        def blocking(method: str) -> Any:
            with grpc.insecure_channel("unix:" + self.address) as channel:
                call = channel.unary_unary(method)
                try:
                    return call(b"", timeout=5)
                except grpc.RpcError as e:
                    return e

        err = await deferToThreadPool(reactor, self.pool, blocking, "/containerd.services.version.v1.Version/Nope")
        self.assertEqual(err.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(err.details(), "unknown method Nope for service containerd.services.version.v1.Version")
        err = await deferToThreadPool(reactor, self.pool, blocking, "/no.such.Service/Call")
        self.assertEqual(err.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(err.details(), "unknown service no.such.Service")
        # Counted like every other call (the handlers are wrapped, not intercepted per call).
        labels = {"grpc_type": "bidi_stream", "grpc_service": "no.such.Service", "grpc_method": "Call"}
        self.assertEqual(self.registry.get_sample_value("grpc_server_started_total", labels), 1.0)
        self.assertEqual(
            self.registry.get_sample_value("grpc_server_handled_total", dict(labels, grpc_code="Unimplemented")), 1.0
        )

    async def test_sequential_calls_reuse_one_worker(self) -> None:
        await self.start()
        for _ in range(5):
            self.assertEqual((await self.call()).version, "v")
        self.assertEqual(self.service.worker_count(), 1)
        self.assertEqual(self.service.queue_length(), 0)


class HandoffPoolTests(TestCase):
    def pool(self, workers: int) -> HandoffPool:
        pool = HandoffPool(workers, "test-pool")
        self.addCleanup(pool.shutdown, True, cancel_futures=True)
        return pool

    def test_runs_tasks_and_done_callbacks(self) -> None:
        pool = self.pool(2)
        ran = threading.Event()
        done: list[Any] = []
        task = pool.submit(lambda a, b: ran.set() if (a, b) == (1, 2) else None, 1, 2)
        task.add_done_callback(done.append)
        self.assertTrue(ran.wait(5))
        pool.shutdown(wait=True)
        self.assertEqual(done, [task])
        late: list[Any] = []
        task.add_done_callback(late.append)  # after completion: called at once
        self.assertEqual(late, [task])

    def test_backlog_past_max_workers_in_order(self) -> None:
        pool = self.pool(2)
        gate = threading.Event()
        order: list[int] = []

        started = threading.Semaphore(0)

        def work(i: int) -> None:
            started.release()
            gate.wait(5)
            order.append(i)

        tasks = [pool.submit(work, i) for i in range(5)]
        self.assertEqual(pool.worker_count(), 2)
        for _ in range(2):
            self.assertTrue(started.acquire(timeout=5))
        self.assertEqual(pool.queue_length(), 3)
        finished = threading.Semaphore(0)
        for t in tasks:
            t.add_done_callback(lambda _t: finished.release())
        gate.set()
        for _ in tasks:
            self.assertTrue(finished.acquire(timeout=5))
        self.assertEqual(sorted(order), list(range(5)))
        self.assertEqual(pool.queue_length(), 0)

    def test_backlog_is_fifo(self) -> None:
        pool = self.pool(1)
        gate = threading.Event()
        order: list[int] = []
        started = threading.Event()
        pool.submit(lambda: (started.set(), gate.wait(5)))
        self.assertTrue(started.wait(5))
        tasks = [pool.submit(order.append, i) for i in range(4)]
        self.assertEqual(pool.queue_length(), 4)
        finished = threading.Semaphore(0)
        for t in tasks:
            t.add_done_callback(lambda _t: finished.release())
        gate.set()
        for _ in tasks:
            self.assertTrue(finished.acquire(timeout=5))
        self.assertEqual(order, [0, 1, 2, 3])

    def test_failing_task_keeps_worker(self) -> None:
        pool = self.pool(1)
        pool.submit(lambda: 1 / 0)
        ran = threading.Event()
        pool.submit(ran.set)
        self.assertTrue(ran.wait(5))
        self.assertEqual(pool.worker_count(), 1)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_shutdown_cancels_backlog_and_refuses_new_work(self) -> None:
        pool = self.pool(1)
        gate = threading.Event()
        started = threading.Event()
        pool.submit(lambda: (started.set(), gate.wait(5)))
        self.assertTrue(started.wait(5))
        ran: list[int] = []
        cancelled: list[Any] = []
        pool.submit(ran.append, 1).add_done_callback(cancelled.append)
        stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True})
        stopper.start()
        gate.set()
        stopper.join(5)
        self.assertFalse(stopper.is_alive())
        self.assertEqual(ran, [])
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(pool.worker_count(), 0)
        with self.assertRaises(RuntimeError):
            pool.submit(ran.append, 2)
