"""Proxy plugins and the plain (namespace-free) servers, in process.

A :class:`ProxyChannel` started on the reactor dials a grpcio server on a
temp UNIX socket that serves a plain Snapshots or Content API over a real
native snapshotter or local blob store: every call goes over the wire and
back, errors included.  Registrations from config, the metadata's choice
of content backend, client endpoint strings and introspection's live
status are checked beside.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from cdtwist.config import Config, ProxyPlugin
from cdtwist.content.local import Info as ContentInfo
from cdtwist.content.local import LocalStore
from cdtwist.content.plain import PlainContentServicer
from cdtwist.endpoints import client_description
from cdtwist.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplemented_,
    Unavailable,
)
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.introspection.service import plugin_to_proto
from cdtwist.metadata.plugin import content_backend
from cdtwist.plugin import CONTENT, SNAPSHOTTER, PluginError, Registration
from cdtwist.plugin.context import Meta, Plugin
from cdtwist.proxy.channel import ProxyChannel
from cdtwist.proxy.content import ProxyContentStore
from cdtwist.proxy.plugins import registrations
from cdtwist.proxy.snapshotter import ProxySnapshotter
from cdtwist.snapshots import Cleaner, Info, Kind
from cdtwist.snapshots.native import NativeSnapshotter
from cdtwist.snapshots.plain import PlainSnapshotsServicer
from cdtwist.tap import load_registrations
from cdtwist.tls import CDTLSClientParser, TLSConfigError, tls_client_description


class RegistrationTests(unittest.TestCase):
    def test_types_and_unknown(self) -> None:
        warnings: list[str] = []
        regs = registrations(
            {
                "a": ProxyPlugin("snapshot", "/a.sock"),
                "b": ProxyPlugin(SNAPSHOTTER, "/b.sock"),
                "c": ProxyPlugin("content", "/c.sock"),
                "d": ProxyPlugin("diff", "/d.sock"),
            },
            warnings,
        )
        self.assertEqual([r.uri for r in regs], [f"{SNAPSHOTTER}.a", f"{SNAPSHOTTER}.b", f"{CONTENT}.c"])
        self.assertEqual(warnings, ['proxy_plugins.d: unknown proxy plugin type "diff", skipped'])

    def test_ordered_before_metadata_and_disable_applies(self) -> None:
        config = Config(proxy_plugins={"remote": ProxyPlugin("snapshot", "/r.sock")})
        uris = [r.uri for r in load_registrations(config)]
        self.assertLess(uris.index(f"{SNAPSHOTTER}.remote"), uris.index("io.containerd.metadata.v1.bolt"))
        config = Config(
            proxy_plugins={"remote": ProxyPlugin("snapshot", "/r.sock")},
            disabled_plugins=[f"{SNAPSHOTTER}.remote"],
        )
        self.assertNotIn(f"{SNAPSHOTTER}.remote", [r.uri for r in load_registrations(config)])

    def test_name_taken_by_a_builtin(self) -> None:
        config = Config(proxy_plugins={"native": ProxyPlugin("snapshot", "/r.sock")})
        with self.assertRaises(PluginError) as caught:
            load_registrations(config)
        self.assertIn("proxy_plugins.native", str(caught.exception))

    def test_metadata_prefers_the_proxy_content_store(self) -> None:
        local, remote = object(), object()
        self.assertIs(content_backend({"content": local}), local)
        self.assertIs(content_backend({"content": local, "remote": remote}), remote)
        self.assertIsNone(content_backend({}))


class EndpointTests(unittest.TestCase):
    def test_client_descriptions(self) -> None:
        self.assertEqual(client_description("/run/x.sock"), "unix:/run/x.sock")
        self.assertEqual(client_description("10.0.0.1:9000"), "tcp:host=10.0.0.1:port=9000")
        self.assertEqual(client_description("[::1]:9000"), "tcp:host=\\:\\:1:port=9000")
        self.assertEqual(client_description("tls:example.com:443"), "tls:example.com:443")
        with self.assertRaises(InvalidArgument):
            client_description("")

    def test_cdtls_client_strings(self) -> None:
        parser = CDTLSClientParser()
        text = tls_client_description("tcp:host=h.example:port=1", hostname="other.example")
        self.assertEqual(text, "cdtls:endpoint=tcp\\:host\\=h.example\\:port\\=1:hostname=other.example")
        with self.assertRaises(TLSConfigError) as caught:
            parser.parseStreamClient(reactor, color="red")
        self.assertIn("unknown key color=", str(caught.exception))
        with self.assertRaises(TLSConfigError) as caught:
            parser.parseStreamClient(reactor)
        self.assertIn("missing endpoint=", str(caught.exception))
        with self.assertRaises(TLSConfigError) as caught:
            parser.parseStreamClient(reactor, endpoint="unix:/x.sock")
        self.assertIn("hostname= is needed", str(caught.exception))
        # The host of a TCP endpoint is the name checked by default.
        endpoint = parser.parseStreamClient(reactor, endpoint="tcp:host=localhost:port=1")
        self.assertIsNotNone(endpoint)


class _Served:
    """A grpcio server on a temp UNIX socket, errors mapped as the daemon maps them."""

    def __init__(self, servicer: Any, directory: str) -> None:
        self.path = os.path.join(directory, "s.sock")
        self.executor = ThreadPoolExecutor(4)
        self.server = grpc.server(self.executor, interceptors=[ErrorAndMetricsInterceptor(None)])
        servicer.register_grpc(self.server)
        self.server.add_insecure_port("unix:" + self.path)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None).wait(5)
        self.executor.shutdown(wait=True)


class _ProxyCase(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cdtpu", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pool = ThreadPool(0, 4, name="test-proxy")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def blocking(self, fn: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, self.pool, fn, *args)

    async def channel(self, address: str) -> ProxyChannel:
        channel = ProxyChannel("p", address, reactor=reactor, io_pool=self.pool, bridge_dir=self.dir)
        await channel.start()
        self.addCleanup(channel.stop)
        return channel


class ProxySnapshotterTests(_ProxyCase):
    async def test_round_trip(self) -> None:
        engine = NativeSnapshotter(os.path.join(self.dir, "native"))
        self.addCleanup(engine.close)
        served = _Served(PlainSnapshotsServicer(engine), self.dir)
        self.addCleanup(served.stop)
        sn = ProxySnapshotter("p", await self.channel(served.path))
        self.assertIsNone(await self.blocking(sn.health_error))
        self.assertIsInstance(sn, Cleaner)

        def scenario() -> None:
            mounts = sn.prepare("a", "", {"l": "1"})
            self.assertEqual(mounts[0].type, "bind")
            with open(os.path.join(mounts[0].source, "f"), "w") as f:
                f.write("x" * 100)
            self.assertGreaterEqual(sn.usage("a").size, 100)
            sn.commit("base", "a", {"c": "2"})
            self.assertEqual(sn.stat("base").kind, Kind.COMMITTED)
            self.assertEqual(sn.stat("base").labels, {"c": "2"})
            self.assertGreaterEqual(sn.usage("base").size, 100)
            sn.view("v", "base")
            self.assertIn("ro", sn.mounts("v")[0].options)
            info = sn.update(Info(name="base", labels={"c": "3", "d": "4"}), "labels.d")
            self.assertEqual(info.labels, {"c": "2", "d": "4"})
            seen: list[str] = []
            sn.walk(lambda i: seen.append(i.name))
            self.assertEqual(sorted(seen), ["base", "v"])
            seen.clear()
            sn.walk(lambda i: seen.append(i.name), "kind==view")
            self.assertEqual(seen, ["v"])
            with self.assertRaises(NotFound):
                sn.stat("missing")
            with self.assertRaises(AlreadyExists):
                sn.prepare("v", "base")
            with self.assertRaises(FailedPrecondition):
                sn.remove("base")  # has a child
            sn.remove("v")
            sn.remove("base")
            with self.assertRaises(NotImplemented_):  # native removes at once: no Cleaner
                sn.cleanup()
            seen.clear()
            sn.walk(lambda i: seen.append(i.name))
            self.assertEqual(seen, [])

        await self.blocking(scenario)

    async def test_unreachable(self) -> None:
        sn = ProxySnapshotter("p", await self.channel(os.path.join(self.dir, "nobody.sock")))
        err = await self.blocking(sn.health_error)
        self.assertIsInstance(err, Unavailable)
        self.assertIn("cannot reach", str(err))
        with self.assertRaises(Unavailable):
            await self.blocking(sn.stat, "x")
        proto = plugin_to_proto(Plugin(Registration(type=SNAPSHOTTER, id="p", init=lambda ic: None), Meta(), None, sn))
        self.assertEqual(proto.init_err.code, grpc.StatusCode.UNAVAILABLE.value[0])


class ProxyContentTests(_ProxyCase):
    async def test_round_trip(self) -> None:
        local = LocalStore(os.path.join(self.dir, "content"))
        served = _Served(PlainContentServicer(local), self.dir)
        self.addCleanup(served.stop)
        store = ProxyContentStore("p", await self.channel(served.path))
        data = os.urandom(3 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        def scenario() -> None:
            w = store.writer("ref", total=len(data))
            self.assertEqual(w.status().offset, 0)
            self.assertEqual(w.write(data[:1000]), 1000)
            w.close()
            self.assertEqual([s.ref for s in store.list_statuses()], ["ref"])
            self.assertEqual(store.status("ref").offset, 1000)
            w = store.writer("ref", total=len(data))  # resumes where the ingest stands
            self.assertEqual(w.offset, 1000)
            w.write(data[1000:])
            w.commit(len(data), digest)
            self.assertEqual(w.digest(), digest)
            self.assertEqual(store.info(digest).size, len(data))
            with store.reader(digest) as ra:
                self.assertEqual(ra.read_at(5, 10), data[5:15])
                self.assertEqual(b"".join(ra.iter_chunks(100, 2 << 20, 1 << 19)), data[100 : 100 + (2 << 20)])
                self.assertEqual(ra.read_all(), data)
            found: list[str] = []
            store.walk(lambda i: found.append(i.digest))
            self.assertEqual(found, [digest])
            with self.assertRaises(AlreadyExists):
                store.writer("ref2", expected=digest)
            with self.assertRaises(FailedPrecondition):  # the plain store keeps no labels
                store.update(ContentInfo(digest, labels={"a": "b"}))
            w = store.writer("ref3")
            w.write(b"abc")
            w.close()
            store.abort("ref3")
            with self.assertRaises(NotFound):
                store.status("ref3")
            store.delete(digest)
            with self.assertRaises(NotFound):
                store.info(digest)

        await self.blocking(scenario)
