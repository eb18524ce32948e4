# -*- test-case-name: tests.test_tasks_service -*-
"""Calling reactor-side coroutines from gRPC pool threads, with every wait bounded.

``blockingCallFromThread`` waits forever, even after the reactor stopped
(twisted#10124).  :func:`call` waits on a ``threading.Event`` instead, for
at most ``timeout`` seconds and only while ``alive()`` holds (the gRPC
call is still wanted); giving up cancels the work on the reactor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from cdtwist.errors import Canceled, DeadlineExceeded

T = TypeVar("T")

#: How often a long wait re-checks that its caller is still there.
POLL = 1.0


class Pending:
    """One piece of reactor work a thread waits for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        #: set when the work is done or the caller may have gone away
        self.wakeup = threading.Event()
        self.result: Any = None
        self.failure: Failure | None = None
        self.deferred: Deferred[Any] | None = None
        self.abandoned = False

    def settle(self, result: Any) -> None:
        if isinstance(result, Failure):
            self.failure = result
        else:
            self.result = result
        self.done.set()
        self.wakeup.set()

    def cancel(self) -> None:
        """On the reactor: stop the work if it is still running."""
        self.abandoned = True
        if self.deferred is not None and not self.deferred.called:
            self.deferred.cancel()


def call(
    reactor: Any,
    fn: Callable[..., Awaitable[T] | Deferred[T] | T],
    *args: Any,
    timeout: float | None = None,
    alive: Callable[[], bool] | None = None,
    add_callback: Callable[[Callable[[], None]], object] | None = None,
) -> T:
    """Run ``fn(*args)`` on the reactor thread and block until it finishes.

    ``alive``/``add_callback`` are a gRPC context's ``is_active`` and
    ``add_callback``: the wait ends as soon as the client goes away.

    :raises DeadlineExceeded: after ``timeout`` seconds (the work is cancelled).
    :raises Canceled: once ``alive()`` turns false (the work is cancelled).
    """
    pending = Pending()

    def start() -> None:
        if pending.abandoned:
            return
        try:
            result = fn(*args)
        except BaseException:
            pending.settle(Failure())
            return
        if isinstance(result, Deferred):
            d = result
        elif hasattr(result, "__await__"):
            d = ensureDeferred(result)  # type: ignore[arg-type]
        else:
            pending.settle(result)
            return
        pending.deferred = d
        d.addBoth(_settle_quietly, pending)

    if add_callback is not None:
        add_callback(pending.wakeup.set)
    reactor.callFromThread(start)
    if not _wait(pending, timeout, alive):
        reactor.callFromThread(pending.cancel)
        if alive is not None and not alive():
            raise Canceled()
        raise DeadlineExceeded()
    if pending.failure is not None:
        pending.failure.raiseException()
    return pending.result  # type: ignore[no-any-return]


def _settle_quietly(result: Any, pending: Pending) -> None:
    pending.settle(result)
    return None


def _wait(pending: Pending, timeout: float | None, alive: Callable[[], bool] | None) -> bool:
    """True once the work is done; False on timeout or when the caller went away."""
    if alive is None:
        return pending.done.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if pending.done.is_set():
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        pending.wakeup.wait(POLL if remaining is None else min(POLL, remaining))
        pending.wakeup.clear()
        if pending.done.is_set():
            return True
        if not alive():
            return False
