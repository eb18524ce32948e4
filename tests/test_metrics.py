"""Prometheus metrics over HTTP: /v1/metrics on a UNIX socket or TCP."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from prometheus_client import Counter
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from cdtwist.metrics import MetricsService, new_registry
from tests.test_debug import _UnixAgent


class MetricsServiceTests(TestCase):
    async def test_serves_registry_on_unix_socket(self) -> None:
        d = tempfile.mkdtemp(prefix="cdtm")
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "metrics.sock")
        pool = ThreadPool(0, 2, name="test-metrics")
        pool.start()
        self.addCleanup(pool.stop)
        registry = new_registry()
        Counter("cdtwist_test_total", "a test counter", registry=registry).inc(3)
        service = MetricsService(f"unix:{path}:mode=600", registry, reactor, pool)
        await service.startService()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        agent = Agent.usingEndpointFactory(reactor, _UnixAgent(path))
        response = await agent.request(b"GET", b"http://metrics/v1/metrics")
        self.assertEqual(response.code, 200)
        body = (await readBody(response)).decode()
        self.assertIn("cdtwist_test_total 3.0", body)
        self.assertIn("process_resident_memory_bytes", body)
        missing = await agent.request(b"GET", b"http://metrics/metrics")
        self.assertEqual(missing.code, 404)
        await readBody(missing)
        await service.stopService()
        self.assertFalse(os.path.exists(path))
