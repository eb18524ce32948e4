# -*- test-case-name: tests.test_debug -*-
"""The ``[debug].address`` socket: what an operator asks a stuck daemon.

Like containerd's debug socket (pprof + expvar over HTTP on a UNIX socket):
``/debug/pprof/goroutine?debug=2`` returns every thread's stack and
``/debug/vars`` a JSON object of runtime counters.  Served by twisted.web;
counters that read /proc are gathered in the I/O pool, the reactor's own
counters on the reactor thread.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.threads import deferToThreadPool

from cdtwist.log import dump_stacks
from cdtwist.web import WebService

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Request, Site


#: Extra counters: name -> callable run on the reactor thread.
Counters = dict[str, Callable[[], Any]]


def process_counters() -> dict[str, Any]:
    """Blocking (/proc): run in a pool."""
    fds = len(os.listdir("/proc/self/fd"))
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {
        "pid": os.getpid(),
        "threads": threading.active_count(),
        "thread_names": sorted(t.name for t in threading.enumerate()),
        "open_fds": fds,
        "rss_bytes": rss,
    }


def debug_site(reactor: Any, pool: ThreadPool, counters: Counters) -> Site:
    """Built on demand: twisted.web is only imported when debugging is configured."""
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Stacks(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:  # noqa: N802
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return dump_stacks().encode()

    class Vars(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> object:  # noqa: N802
            values: dict[str, Any] = {
                "reactor_delayed_calls": len(reactor.getDelayedCalls()),
                "io_pool_queue": pool.q.qsize(),
                "io_pool_workers": len(pool.threads),
            }
            for name, counter in counters.items():
                try:
                    values[name] = counter()
                except Exception as e:  # a broken counter must not break the page
                    values[name] = f"error: {e}"

            def done(proc: dict[str, Any]) -> None:
                values.update(proc)
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(values, sort_keys=True, indent=1).encode() + b"\n")
                request.finish()

            def failed(failure: Any) -> None:
                request.setResponseCode(500)
                request.write(str(failure.value).encode())
                request.finish()

            deferToThreadPool(reactor, pool, process_counters).addCallbacks(done, failed)
            return NOT_DONE_YET

    root = Resource()
    debug = Resource()
    pprof = Resource()
    root.putChild(b"debug", debug)
    debug.putChild(b"pprof", pprof)
    pprof.putChild(b"goroutine", Stacks())
    debug.putChild(b"vars", Vars())
    site = Site(root)
    site.noisy = False
    return site


class DebugService(WebService):
    name = "debug"

    def __init__(self, address: str, uid: int, gid: int, reactor: Any, pool: ThreadPool,
                 counters: Counters | None = None) -> None:
        super().__init__(address, reactor, pool, uid, gid)
        self.counters: Counters = counters or {}

    def site(self) -> Site:
        return debug_site(self.reactor, self.pool, self.counters)
