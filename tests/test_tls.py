"""The ``cdtls:`` endpoint grammar, mutual TLS, and the TLS-to-UNIX gRPC bridge.

Integration tests run on the real reactor over loopback only: a plain
grpcio server on a UNIX socket under /tmp, a :class:`BridgeService` with a
``cdtls:`` endpoint on 127.0.0.1 in front of it, and grpcio / openssl /
Twisted TLS clients.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXServerEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from cdtwist.api.services.version.v1 import version_pb2_grpc
from cdtwist.bridge import BridgeService, StreamBridgeProtocol
from cdtwist.tls import (
    CDTLSServerParser,
    TLSConfigError,
    TLSServerEndpoint,
    escape_endpoint_value,
    tls_client_options,
    tls_server_description,
)
from tests.support_tls import (
    PKI,
    VersionServicer,
    call_version,
    make_pki,
    rmtree,
    short_tempdir,
    start_unix_grpc,
    tls_channel,
)

LOOPBACK = "tcp:0:interface=127.0.0.1"
BIG = 16 << 20


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.005, lambda: None)


class PKIMixin:
    pki: PKI

    def make_pki(self) -> PKI:
        directory = short_tempdir()
        self.addCleanup(rmtree, directory)  # type: ignore[attr-defined]
        self.pki = make_pki(directory)
        return self.pki


# -- grammar -----------------------------------------------------------------


class GrammarTests(PKIMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.make_pki()
        self.reactor = MemoryReactorClock()

    def listen(self, description: str) -> Factory:
        endpoint = serverFromString(self.reactor, description)
        self.assertIsInstance(endpoint, TLSServerEndpoint)
        factory = Factory.forProtocol(Protocol)
        self.successResultOf(endpoint.listen(factory))
        return factory

    def error(self, description: str) -> str:
        return str(self.assertRaises(TLSConfigError, serverFromString, self.reactor, description))

    def test_dropin_registers_the_prefix(self) -> None:
        parsers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "cdtls"]
        self.assertEqual(len(parsers), 1)
        self.assertIsInstance(parsers[0], CDTLSServerParser)

    def test_description_round_trips_to_inner_tcp(self) -> None:
        p = self.pki
        description = tls_server_description("tcp:8443:interface=127.0.0.1", p.server_cert, p.server_key, p.ca)
        self.assertEqual(
            description,
            f"cdtls:cert={p.server_cert}:key={p.server_key}:ca={p.ca}:endpoint=tcp\\:8443\\:interface\\=127.0.0.1",
        )
        factory = self.listen(description)
        port, wrapped, _backlog, interface = self.reactor.tcpServers[0]
        self.assertEqual((port, interface), (8443, "127.0.0.1"))
        self.assertIsInstance(wrapped, TLSMemoryBIOFactory)
        self.assertIs(wrapped.wrappedFactory, factory)

    def test_hand_written_examples(self) -> None:
        p = self.pki
        head = f"cdtls:cert={p.server_cert}:key={p.server_key}:ca={p.ca}"
        self.listen(head + r":endpoint=tcp\:8443\:interface\=127.0.0.1")
        # IPv6: the inner string escapes its own colons, the outer escapes again.
        ipv6 = head + r":endpoint=tcp\:8443\:interface\=\\\:\\\:1"
        self.assertEqual(tls_server_description(r"tcp:8443:interface=\:\:1", p.server_cert, p.server_key, p.ca), ipv6)
        self.listen(ipv6)
        self.assertEqual([(s[0], s[3]) for s in self.reactor.tcpServers], [(8443, "127.0.0.1"), (8443, "::1")])

    def test_escapes_awkward_paths_and_inner_unix_paths(self) -> None:
        p = self.pki
        odd = os.path.join(p.dir, "a:b=c\\d")
        os.mkdir(odd)
        cert, key, ca = (shutil.copy(f, odd) for f in (p.server_cert, p.server_key, p.ca))
        inner = "unix:" + escape_endpoint_value("/run/x:y=z.sock") + ":mode=660"
        self.listen(tls_server_description(inner, cert, key, ca))
        path, _factory, _backlog, mode, _pid = self.reactor.unixServers[0]
        self.assertEqual((path, mode), ("/run/x:y=z.sock", 0o660))

    def test_escape_is_what_twisted_unescapes(self) -> None:
        from twisted.internet.endpoints import _parse

        value = "a:b=c\\d\\:e"
        self.assertEqual(_parse("x=" + escape_endpoint_value(value)), ([], {"x": value}))

    def test_ca_requires_a_verified_client_certificate(self) -> None:
        p = self.pki
        endpoint = serverFromString(self.reactor, tls_server_description(LOOPBACK, p.server_cert, p.server_key, p.ca))
        ctx = endpoint.options.getContext()
        required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(ctx.get_verify_mode() & required, required)
        options = ctx.set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1)

    def test_without_ca_is_server_only_tls(self) -> None:
        p = self.pki
        endpoint = serverFromString(self.reactor, tls_server_description(LOOPBACK, p.server_cert, p.server_key, None))
        self.assertEqual(endpoint.options.getContext().get_verify_mode(), SSL.VERIFY_NONE)

    def test_alpn_values_parse(self) -> None:
        p = self.pki
        for alpn in ((), ("h2", "http/1.1")):
            self.listen(tls_server_description(LOOPBACK, p.server_cert, p.server_key, p.ca, alpn=alpn))

    def test_missing_keys_name_the_key_and_grammar(self) -> None:
        p = self.pki
        for missing, description in [
            ("cert=", f"cdtls:key={p.server_key}:endpoint=tcp\\:0"),
            ("key=", f"cdtls:cert={p.server_cert}:endpoint=tcp\\:0"),
            ("endpoint=", f"cdtls:cert={p.server_cert}:key={p.server_key}"),
            ("endpoint=", f"cdtls:cert={p.server_cert}:key={p.server_key}:endpoint="),
        ]:
            message = self.error(description)
            self.assertIn(f"missing {missing}", message)
            self.assertIn("cdtls:cert=<pem>:key=<pem>", message)

    def test_unknown_key_and_positional_argument(self) -> None:
        p = self.pki
        base = f"cdtls:cert={p.server_cert}:key={p.server_key}"
        self.assertIn("unknown key cafile=", self.error(base + f":cafile={p.ca}:endpoint=tcp\\:0"))
        message = self.error(base + ":tcp:8443")
        self.assertIn("unexpected positional argument 'tcp'", message)
        self.assertIn("endpoint=", message)

    def test_missing_files_say_which_key(self) -> None:
        p = self.pki
        nowhere = os.path.join(p.dir, "nope.pem")
        for key in ("cert", "key", "ca"):
            kw = {"cert": p.server_cert, "key": p.server_key, "ca": p.ca, key: nowhere}
            message = self.error(tls_server_description(LOOPBACK, kw["cert"], kw["key"], kw["ca"]))
            self.assertEqual(message, f"cdtls: {key}={nowhere}: cannot read: No such file or directory")

    def test_bad_pem_contents(self) -> None:
        p = self.pki
        garbage = os.path.join(p.dir, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not pem\n")
        self.assertIn(
            f"cert={garbage}: no PEM certificate found",
            self.error(tls_server_description(LOOPBACK, garbage, p.server_key, p.ca)),
        )
        self.assertIn(
            f"ca={garbage}: no PEM certificate found",
            self.error(tls_server_description(LOOPBACK, p.server_cert, p.server_key, garbage)),
        )
        self.assertIn(
            f"key={garbage}: not a PEM private key",
            self.error(tls_server_description(LOOPBACK, p.server_cert, garbage, p.ca)),
        )
        self.assertIn(
            f"key={p.encrypted_key}: encrypted private keys are not supported",
            self.error(tls_server_description(LOOPBACK, p.server_cert, p.encrypted_key, p.ca)),
        )

    def test_key_must_match_certificate(self) -> None:
        p = self.pki
        self.assertEqual(
            self.error(tls_server_description(LOOPBACK, p.server_cert, p.client_key, p.ca)),
            f"cdtls: key={p.client_key} does not match the certificate in cert={p.server_cert}",
        )

    def test_bad_inner_endpoint(self) -> None:
        p = self.pki
        for inner, text in [("bogus:1", "Unknown endpoint type"), ("tcp:abc", "invalid literal")]:
            message = self.error(tls_server_description(inner, p.server_cert, p.server_key, p.ca))
            self.assertIn(f"cdtls: endpoint={inner!r}: ", message)
            self.assertIn(text, message)
        self.assertRaises(TLSConfigError, tls_server_description, "", p.server_cert, p.server_key, p.ca)

    def test_client_options(self) -> None:
        p = self.pki
        options = tls_client_options("localhost", p.ca, p.client_cert, p.client_key)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(tls_client_options("127.0.0.1", p.ca)))
        self.assertIn(
            "without a certificate",
            str(self.assertRaises(TLSConfigError, tls_client_options, "h", p.ca, None, p.client_key)),
        )
        self.assertIn(
            "does not match",
            str(self.assertRaises(TLSConfigError, tls_client_options, "h", p.ca, p.client_cert, p.server_key)),
        )


# -- raw bytes through the bridge -----------------------------------------------


@implementer(IHalfCloseableProtocol)
class Backend(Protocol):
    """A UNIX backend: echoes (self-throttled), reports EOF, or misbehaves on request."""

    factory: BackendFactory

    def __init__(self) -> None:
        self.received = 0
        #: fires with the reason's exception (a Failure would errback)
        self.lost: Deferred[BaseException] = Deferred()

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        if self.factory.echo:
            # Self-throttling echo: stop reading while our own writes back up.
            self.transport.registerProducer(self.transport, True)
        if self.factory.start_paused:
            self.transport.pauseProducing()
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)
        if self.factory.half_close_after_greeting:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.factory.echo:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.factory.echo:
            self.transport.unregisterProducer()
        self.transport.write(b"EOF:%d" % self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(reason.value if reason else None)


class BackendFactory(Factory):
    protocol = Backend
    echo = True
    start_paused = False
    greeting = b""
    half_close_after_greeting = False

    def __init__(self) -> None:
        self.connections: list[Backend] = []


@implementer(IHandshakeListener)
class Client(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        #: True once the handshake completed, False if the connection died first
        self.handshake: Deferred[bool] = Deferred()
        self.lost: Deferred[BaseException] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(True)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.handshake.called:
            self.handshake.callback(False)
        self.lost.callback(reason.value if reason else None)


class RawBridgeTests(PKIMixin, TestCase):
    timeout = 15
    """Twisted on both sides of the bridge, to drive backpressure and closes."""

    def setUp(self) -> None:
        self.make_pki()
        self.socket = os.path.join(self.pki.dir, "b.sock")
        self.backend = BackendFactory()

    async def start(
        self,
        *,
        tls: bool = True,
        ca: bool = True,
        close_timeout: float = 2.0,
        alpn: tuple[str, ...] | None = None,
        target: str | None = None,
        cert: tuple[str, str] | None = None,
    ) -> BridgeService:
        port = await UNIXServerEndpoint(reactor, self.socket).listen(self.backend)
        self.addCleanup(port.stopListening)
        p = self.pki
        cert_path, key_path = cert or (p.server_cert, p.server_key)
        description = (
            tls_server_description(LOOPBACK, cert_path, key_path, p.ca if ca else None, alpn=alpn) if tls else LOOPBACK
        )
        service = BridgeService(reactor, description, target or self.socket, close_timeout=close_timeout)
        await service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.service = service
        return service

    async def connect(
        self, *, tls: bool = True, hostname: str = "localhost", cert: str | None = "client", alpn: tuple[str, ...] = ()
    ) -> Client:
        assert self.service.port is not None
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.port.getHost().port)
        if tls:
            p = self.pki
            paths = {
                "client": (p.client_cert, p.client_key),
                "other": (p.other_client_cert, p.other_client_key),
                "expired": (p.expired_cert, p.expired_key),
                None: (None, None),
            }[cert]
            endpoint = wrapClientTLS(tls_client_options(hostname, p.ca, *paths, alpn=alpn), endpoint)
        client = Client()
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.lost.called or client.transport.abortConnection())
        return client

    def bridge(self) -> StreamBridgeProtocol:
        (bridge,) = self.service.factory.bridges
        return bridge

    async def test_echo_16mib_upstream_backpressure(self) -> None:
        self.backend.start_paused = True
        await self.start()
        client = await self.connect()
        self.assertTrue(await client.handshake)
        payload = os.urandom(BIG)
        client.transport.write(payload)
        await until(lambda: self.backend.connections, what="backend connection")
        bridge = self.bridge()
        # The backend reads nothing: its socket fills, so the bridge must stop reading the client.
        await until(lambda: bridge.read_throttle is not None and bridge.read_throttle.pauses > 0, what="pause")
        await deferLater(reactor, 0.1, lambda: None)
        self.assertLess(self.backend.connections[0].received, BIG)
        self.backend.connections[0].transport.resumeProducing()
        await until(lambda: len(client.data) >= BIG, timeout=30, what="echo")
        self.assertEqual(sha(client.data), sha(payload))

    async def test_16mib_downstream_backpressure(self) -> None:
        payload = os.urandom(BIG)
        self.backend.greeting = payload
        self.backend.echo = False
        await self.start()
        client = await self.connect()
        self.assertTrue(await client.handshake)
        client.transport.pauseProducing()
        await until(lambda: self.service.factory.bridges and self.bridge().backend is not None, what="bridge")
        backend_side = self.bridge().backend
        assert backend_side is not None
        await until(lambda: backend_side.read_throttle and backend_side.read_throttle.pauses > 0, what="pause")
        client.transport.resumeProducing()
        await until(lambda: len(client.data) >= BIG, timeout=30, what="download")
        self.assertEqual(sha(client.data), sha(payload))

    async def test_alpn_h2_is_negotiated_by_default(self) -> None:
        await self.start()
        client = await self.connect(alpn=("http/1.1", "h2"))
        self.assertTrue(await client.handshake)
        self.assertEqual(client.transport.negotiatedProtocol, b"h2")

    async def test_alpn_is_configurable(self) -> None:
        await self.start(alpn=("http/1.1",))
        client = await self.connect(alpn=("h2", "http/1.1"))
        self.assertTrue(await client.handshake)
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")

    async def test_half_close_passes_through_plain_tcp(self) -> None:
        await self.start(tls=False)
        client = await self.connect(tls=False)
        client.transport.write(b"hello")
        client.transport.loseWriteConnection()
        await client.lost
        self.assertEqual(bytes(client.data), b"helloEOF:5")
        await self.backend.connections[0].lost

    async def test_backend_eof_closes_tls_client_after_flushing(self) -> None:
        self.backend.greeting = b"bye" * 100_000
        self.backend.echo = False
        self.backend.half_close_after_greeting = True
        await self.start()
        client = await self.connect()
        await client.lost
        self.assertEqual(bytes(client.data), b"bye" * 100_000)
        await self.backend.connections[0].lost
        self.assertEqual(self.service.factory.bridges, set())

    async def test_client_loss_closes_backend(self) -> None:
        await self.start()
        client = await self.connect()
        await until(lambda: self.backend.connections, what="backend connection")
        client.transport.loseConnection()
        await self.backend.connections[0].lost
        await until(lambda: not self.service.factory.bridges, what="bridge gone")

    async def test_backend_loss_closes_client(self) -> None:
        await self.start()
        client = await self.connect()
        await until(lambda: self.backend.connections, what="backend connection")
        self.backend.connections[0].transport.loseConnection()
        await client.lost
        await until(lambda: not self.service.factory.bridges, what="bridge gone")

    async def test_backend_loss_while_client_reads_are_paused(self) -> None:
        # Backpressure has paused reading from the client when the backend dies:
        # the close must resume reads to see the client's close_notify, not linger.
        self.backend.start_paused = True
        service = await self.start()
        service.factory.linger = 60
        client = await self.connect()
        self.assertTrue(await client.handshake)
        client.transport.write(os.urandom(BIG))
        await until(lambda: self.backend.connections, what="backend connection")
        bridge = self.bridge()
        await until(lambda: bridge.read_throttle is not None and bridge.read_throttle.pauses > 0, what="pause")
        self.backend.connections[0].transport.abortConnection()
        started = reactor.seconds()
        await client.lost
        self.assertLess(reactor.seconds() - started, 5)
        await until(lambda: not service.factory.bridges, what="bridge gone")

    async def test_linger_aborts_a_client_that_never_reads(self) -> None:
        self.backend.greeting = os.urandom(BIG)
        self.backend.echo = False
        service = await self.start()
        service.factory.linger = 0.3
        client = await self.connect()
        self.assertTrue(await client.handshake)
        client.transport.pauseProducing()
        await until(lambda: service.factory.bridges and self.bridge().backend is not None, what="bridge")
        backend_side = self.bridge().backend
        assert backend_side is not None
        await until(lambda: backend_side.read_throttle and backend_side.read_throttle.pauses > 0, what="pause")
        self.backend.connections[0].transport.abortConnection()
        # The bridge is not reading the paused backend, so it learns of the
        # loss when it next writes there; then the client cannot be flushed.
        client.transport.write(b"ping")
        await until(lambda: backend_side.lost, what="backend loss noticed")
        self.assertEqual(len(service.factory.bridges), 1)
        await until(lambda: not service.factory.bridges, what="aborted after linger")
        client.transport.resumeProducing()
        await client.lost
        self.assertLess(len(client.data), BIG)

    async def test_unreachable_backend_closes_client(self) -> None:
        await self.start(target=os.path.join(self.pki.dir, "nobody.sock"))
        client = await self.connect()
        await client.lost
        await until(lambda: not self.service.factory.bridges, what="bridge gone")

    async def test_refused_certificates_never_reach_the_backend(self) -> None:
        await self.start()
        dials = []
        original = self.service.factory.connect_backend
        self.service.factory.connect_backend = lambda b: dials.append(b) or original(b)  # type: ignore[method-assign]
        for cert in (None, "other", "expired"):
            client = await self.connect(cert=cert)
            client.transport.write(b"application data")
            reason = await client.lost
            self.assertIsInstance(reason, SSL.Error, cert)
        self.assertEqual((dials, self.backend.connections), ([], []))
        client = await self.connect()
        self.assertTrue(await client.handshake)
        await until(lambda: len(dials) == 1, what="accepted client dials")

    async def test_intermediates_in_the_cert_file_are_sent(self) -> None:
        await self.start(cert=(self.pki.chain_cert, self.pki.chain_key))
        client = await self.connect()
        self.assertTrue(await client.handshake)
        client.transport.write(b"ping")
        await until(lambda: bytes(client.data) == b"ping", what="echo")

    async def test_server_only_tls_accepts_anonymous_clients(self) -> None:
        await self.start(ca=False)
        client = await self.connect(cert=None)
        client.transport.write(b"ping")
        await until(lambda: bytes(client.data) == b"ping", what="echo")

    async def test_client_options_check_the_server_name(self) -> None:
        await self.start()
        for hostname in ("localhost", "127.0.0.1"):
            client = await self.connect(hostname=hostname)
            self.assertTrue(await client.handshake)
            client.transport.loseConnection()
            await client.lost
        client = await self.connect(hostname="wrong.example")
        reason = await client.lost
        from service_identity import VerificationError

        self.assertIsInstance(reason, VerificationError)

    async def test_stop_aborts_connections_that_cannot_flush(self) -> None:
        self.backend.greeting = os.urandom(BIG)
        self.backend.echo = False
        service = await self.start(close_timeout=0.3)
        client = await self.connect()
        self.assertTrue(await client.handshake)
        client.transport.pauseProducing()  # never reads: the bridge cannot flush
        await until(lambda: service.factory.bridges and self.bridge().backend is not None, what="bridge")
        started = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(service.factory.bridges, set())
        await self.backend.connections[0].lost
        client.transport.resumeProducing()
        await client.lost

    async def test_start_errors_fail_the_start_deferred(self) -> None:
        p = self.pki
        bad = BridgeService(reactor, tls_server_description(LOOPBACK, p.server_cert, p.client_key, p.ca), self.socket)
        with self.assertRaises(TLSConfigError):
            await bad.startService()
        self.assertFalse(bad.running)
        service = await self.start()
        assert service.port is not None
        taken = f"tcp:{service.port.getHost().port}:interface=127.0.0.1"
        busy = BridgeService(reactor, tls_server_description(taken, p.server_cert, p.server_key, p.ca), self.socket)
        with self.assertRaises(CannotListenError):
            await busy.startService()
        await busy.stopService()


# -- gRPC through the bridge -----------------------------------------------------


class GRPCBridgeTests(PKIMixin, TestCase):
    def setUp(self) -> None:
        self.make_pki()
        self.socket = os.path.join(self.pki.dir, "grpc.sock")
        self.servicer = VersionServicer()
        self.server = start_unix_grpc(self.socket, self.servicer)
        self.addCleanup(lambda: deferToThread(lambda: self.server.stop(0).wait(5)))

    async def start(self) -> BridgeService:
        p = self.pki
        service = BridgeService(
            reactor, tls_server_description(LOOPBACK, p.server_cert, p.server_key, p.ca), self.socket
        )
        await service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        assert service.port is not None
        self.target = f"127.0.0.1:{service.port.getHost().port}"
        self.service = service
        return service

    def call(self, cert: str | None = "client", *, calls: int = 1) -> Deferred[Any]:
        p = self.pki
        paths = {
            "client": (p.client_cert, p.client_key),
            "other": (p.other_client_cert, p.other_client_key),
            "expired": (p.expired_cert, p.expired_key),
            None: (None, None),
        }[cert]
        cert_pem, key_pem = (p.read(x) if x else None for x in paths)

        def blocking() -> Any:
            with tls_channel(self.target, p.read(p.ca), cert_pem, key_pem) as channel:
                try:
                    if calls == 1:
                        return call_version(channel)
                    stub = version_pb2_grpc.VersionStub(channel)
                    futures = [stub.Version.future(empty_pb2.Empty(), timeout=10) for _ in range(calls)]
                    return [f.result() for f in futures]
                except grpc.RpcError as e:
                    return e

        return deferToThread(blocking)

    async def test_valid_client_certificate(self) -> None:
        await self.start()
        response = await self.call()
        self.assertEqual((response.version, response.revision), ("v", "r"))

    async def test_concurrent_calls_share_the_bridge(self) -> None:
        await self.start()
        responses = await self.call(calls=32)
        self.assertEqual({r.version for r in responses}, {"v"})

    async def test_refused_certificates_are_unavailable(self) -> None:
        await self.start()
        for cert in (None, "other", "expired"):
            error = await self.call(cert)
            self.assertIsInstance(error, grpc.RpcError, cert)
            self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE, cert)
        response = await self.call()
        self.assertEqual(response.version, "v")

    async def test_8mib_response_passes_intact(self) -> None:
        await self.start()
        self.servicer.payload_size = 8 << 20
        response = await self.call()
        self.assertEqual(len(response.version), 8 << 20)
        self.assertEqual(response.version, "x" * (8 << 20))
        self.assertEqual(response.revision, "r")

    async def test_stop_closes_bridged_connections_and_port(self) -> None:
        service = await self.start()
        p = self.pki
        channel = tls_channel(self.target, p.read(p.ca), p.read(p.client_cert), p.read(p.client_key))
        self.addCleanup(lambda: deferToThread(channel.close))
        response = await deferToThread(call_version, channel)
        self.assertEqual(response.version, "v")
        await until(lambda: service.factory.bridges, what="a live bridge")
        assert service.port is not None
        port = service.port.getHost().port
        await service.stopService()
        self.assertEqual(service.factory.bridges, set())
        self.assertIsNone(service.port)
        with self.assertRaises(ConnectionRefusedError):
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Protocol))

        def call_again() -> grpc.StatusCode:
            try:
                call_version(channel, timeout=5)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        self.assertEqual(await deferToThread(call_again), grpc.StatusCode.UNAVAILABLE)

    async def s_client(self, *args: str, stdin: bytes = b"") -> tuple[str, int]:
        openssl = shutil.which("openssl")
        if openssl is None:
            self.skipTest("openssl binary not installed")
        d = getProcessOutputAndValue(
            openssl,
            [
                "s_client",
                "-connect",
                self.target,
                "-CAfile",
                self.pki.ca,
                "-servername",
                "localhost",
                "-verify_return_error",
                "-ign_eof",
                *args,
            ],
            env=dict(os.environ),
            # path=None lets Twisted posix_spawn instead of fork: forking a
            # process that holds grpcio objects can abort in the child.
            path=None,
            reactor=reactor,
            stdinBytes=stdin,
        )
        # Killed by a signal (SIGPIPE writing to a socket the server closed):
        # Twisted errbacks with (out, err, signal).
        d.addErrback(lambda f: (f.value[0], f.value[1], 128 + f.value[2]))
        out, err, code = await d
        return (out + err).decode(errors="replace"), code

    async def test_openssl_s_client(self) -> None:
        await self.start()
        p = self.pki
        # -ign_eof: with TLS 1.3 the client finishes its side of the handshake
        # before the server has checked its certificate, so wait for the alert.
        for args, alert in [
            ((), "alert certificate required"),
            (("-cert", p.other_client_cert, "-key", p.other_client_key), "alert unknown ca"),
            (("-cert", p.expired_cert, "-key", p.expired_key), "alert certificate expired"),
            (("-tls1_2",), "alert handshake failure"),
        ]:
            output, code = await self.s_client(*args)
            self.assertNotEqual(code, 0, output)
            self.assertIn(alert, output)
        # Positive control: grpcio answers the bogus preface and hangs up.
        output, code = await self.s_client(
            "-cert", p.client_cert, "-key", p.client_key, "-alpn", "h2", stdin=b"hello\r\n\r\n"
        )
        self.assertEqual(code, 0, output)
        self.assertIn("ALPN protocol: h2", output)
        self.assertNotIn("alert", output)

    async def test_openssl_refuses_tls_1_1(self) -> None:
        await self.start()
        output, code = await self.s_client("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        if "no protocols available" in output:
            self.skipTest("this openssl build cannot offer TLS 1.1")
        self.assertNotEqual(code, 0, output)
        self.assertIn("alert protocol version", output)
