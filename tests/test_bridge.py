"""The TCP bridge turns Nagle off: gRPC's small frames must not wait for delayed ACKs."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from cdtwist.bridge import BridgeService


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data


class BridgeNoDelayTests(TestCase):
    async def test_accepted_tcp_socket_has_nodelay(self) -> None:
        d = tempfile.mkdtemp(prefix="cdtb")
        self.addCleanup(shutil.rmtree, d)
        target = os.path.join(d, "backend.sock")
        backend = await UNIXServerEndpoint(reactor, target).listen(Factory.forProtocol(_Echo))
        self.addCleanup(backend.stopListening)
        service = BridgeService(reactor, "tcp:0:interface=127.0.0.1", target)
        await service.startService()
        self.addCleanup(service.stopService)
        port = service.port.getHost().port
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_Collect))
        self.addCleanup(client.transport.loseConnection)
        client.transport.write(b"ping")
        for _ in range(100):
            if client.received == b"ping":
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(client.received, b"ping")
        (bridge,) = list(service.factory.bridges)
        sock = bridge.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
