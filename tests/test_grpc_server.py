"""The grpcio server service: sockets, error mapping, metrics, orderly stop."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
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
from cdtwist.grpc.server import GRPCServerService


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
