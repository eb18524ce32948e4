"""The debug socket: stacks and runtime counters over HTTP on a UNIX socket."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cdtwist.debug import DebugService


@implementer(IAgentEndpointFactory)
class _UnixAgent:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):  # noqa: N802
        return UNIXClientEndpoint(reactor, self.path)


class DebugServiceTests(TestCase):
    async def test_vars_and_stacks(self) -> None:
        d = tempfile.mkdtemp(prefix="cdtd")
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "debug.sock")
        pool = ThreadPool(0, 2, name="test-debug")
        pool.start()
        self.addCleanup(pool.stop)
        service = DebugService(path, 0, 0, reactor, pool, counters={"custom": lambda: 42})
        await service.startService()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        agent = Agent.usingEndpointFactory(reactor, _UnixAgent(path))
        response = await agent.request(b"GET", b"http://debug/debug/vars")
        data = json.loads(await readBody(response))
        self.assertEqual(data["custom"], 42)
        self.assertEqual(data["pid"], os.getpid())
        for key in ("threads", "open_fds", "reactor_delayed_calls", "io_pool_queue", "rss_bytes"):
            self.assertIn(key, data)
        self.assertGreater(data["open_fds"], 2)
        response = await agent.request(b"GET", b"http://debug/debug/pprof/goroutine")
        body = (await readBody(response)).decode()
        self.assertIn("MainThread", body)
        await service.stopService()
        self.assertFalse(os.path.exists(path))
