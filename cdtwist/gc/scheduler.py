# -*- test-case-name: tests.test_gc_scheduler -*-
"""``io.containerd.gc.v1.scheduler``: when to collect (containerd's ``gc/scheduler``).

The policy is containerd's, setting for setting: a collection runs
``startup_delay`` after boot; after that at most every ``interval``, where
the interval keeps collections to ``pause_threshold`` of wall time (average
pause / threshold), and only when something asked for it: a deletion since
the last run, ``mutation_threshold`` mutations, or an explicit
:meth:`GCScheduler.schedule_and_wait` (a lease deleted with ``sync``), which
schedules one ``schedule_delay`` from now.  ``deletion_threshold`` deletions
schedule one right away.

Every decision is made on the reactor thread with reactor timers; the
collection itself runs in the I/O thread pool, so the reactor never waits
on the database.  Mutations are reported from whatever thread committed them.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from cdtwist.config import parse_duration_ns
from cdtwist.content.local import go_duration
from cdtwist.errors import Canceled, CdtwistError
from cdtwist.gc import Stats
from cdtwist.log import get_logger
from cdtwist.plugin import GC, METADATA, Registration, register

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)


@dataclass
class SchedulerConfig:
    """containerd's ``[plugins."io.containerd.gc.v1.scheduler"]``, same keys and defaults."""

    pause_threshold: float = 0.02
    deletion_threshold: int = 0
    mutation_threshold: int = 100
    schedule_delay: str = "0s"
    startup_delay: str = "100ms"

    def __post_init__(self) -> None:
        # Durations are refused at config load, as Go's UnmarshalText does.
        parse_duration_ns(self.schedule_delay)
        parse_duration_ns(self.startup_delay)


def go_float(value: float) -> str:
    """``fmt.Sprint`` of a float64 for the values a threshold takes."""
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


class GCScheduler:
    """Decides when :attr:`collect` runs; lives on the reactor thread.

    :param collect: starts a collection and returns a Deferred firing with
        its :class:`~cdtwist.gc.Stats` (in production: the metadata collector
        in the I/O pool).
    :param clock: the reactor's timers and time.
    :param call_from_thread: how another thread reaches the reactor.
    """

    def __init__(
        self,
        collect: Callable[[], Deferred[Stats]],
        config: SchedulerConfig,
        clock: IReactorTime,
        call_from_thread: Callable[..., Any],
    ) -> None:
        self.collect = collect
        self.clock = clock
        self._call_from_thread = call_from_thread
        self.pause_threshold = min(max(config.pause_threshold, 0.0), 0.5)
        self.deletion_threshold = config.deletion_threshold
        self.mutation_threshold = max(config.mutation_threshold, 0)
        self.schedule_delay = max(parse_duration_ns(config.schedule_delay), 0) / 1e9
        self.startup_delay = max(parse_duration_ns(config.startup_delay), 0) / 1e9

        self._timer: IDelayedCall | None = None
        self.next_collection: float | None = None
        self.last_collection: float | None = None
        self.interval = 1.0
        self.gc_time = 0.0
        self.collections = 0
        self.triggered = False
        self.deletions = 0
        self.mutations = 0

        self._waiters: list[Deferred[Stats]] = []
        self._running: Deferred[None] | None = None
        #: events that arrived during a collection; a None time means "a trigger, after it".
        self._pending: list[tuple[float | None, bool, bool]] = []
        self._stopped = False

    # -- lifecycle (reactor) -------------------------------------------------

    def start(self) -> None:
        if self.startup_delay > 0:
            self._schedule(self.startup_delay)

    def stop(self) -> Deferred[None]:
        """No more collections; waits for one in progress (the database must outlive it)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(Canceled())
        running = self._running
        if running is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        running.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    # -- what happened (any thread) ------------------------------------------

    def mutation_callback(self, dirty: bool) -> None:
        """A transaction committed; ``dirty`` if references were removed since the last collection."""
        self._call_from_thread(self._on_event, self.clock.seconds(), True, dirty)

    def schedule_and_wait(self) -> Deferred[Stats]:
        """A collection soon; fires with its stats (reactor thread)."""
        waiter: Deferred[Stats] = Deferred()
        if self._stopped:
            waiter.errback(Canceled())
            return waiter
        self._waiters.append(waiter)
        self._on_event(None if self._running is not None else self.clock.seconds(), False, False)
        return waiter

    def schedule_and_wait_blocking(self, is_active: Callable[[], bool] = lambda: True, poll: float = 0.25) -> Stats:
        """:meth:`schedule_and_wait` from a pool thread; Canceled once ``is_active`` turns False."""
        results: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def begin() -> None:
            self.schedule_and_wait().addCallbacks(
                lambda stats: results.put((True, stats)), lambda failure: results.put((False, failure.value))
            )

        self._call_from_thread(begin)
        while True:
            try:
                ok, value = results.get(timeout=poll)
            except queue.Empty:
                if not is_active():
                    raise Canceled() from None
                continue
            if ok:
                return value  # type: ignore[no-any-return]
            raise value

    # -- the loop (reactor) ----------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._fire)
        self.next_collection = self.clock.seconds() + delay

    def _on_event(self, ts: float | None, mutation: bool, dirty: bool) -> None:
        if self._stopped:
            return
        if self._running is not None:
            self._pending.append((None if not mutation else ts, mutation, dirty))
            return
        if ts is None:
            ts = self.clock.seconds()
        if self.last_collection is not None and self.last_collection > ts:
            return
        if dirty:
            self.deletions += 1
        if mutation:
            self.mutations += 1
        else:
            self.triggered = True
        if (
            self.triggered
            or (self.deletion_threshold > 0 and self.deletions >= self.deletion_threshold)
            or (
                self.next_collection is None
                and (
                    (self.deletion_threshold == 0 and self.deletions > 0)
                    or (self.mutation_threshold > 0 and self.mutations >= self.mutation_threshold)
                )
            )
        ):
            if self.next_collection is None or self.next_collection > self.clock.seconds() + self.schedule_delay:
                self._schedule(self.schedule_delay)

    def _fire(self) -> None:
        self._timer = None
        if (
            not self.triggered
            and self.last_collection is not None
            and self.deletions == 0
            and (self.mutation_threshold == 0 or self.mutations < self.mutation_threshold)
        ):
            # Nothing asked for a collection: look again after an interval.
            self._schedule(self.interval)
            return
        waiters, self._waiters = self._waiters, []
        running = maybeDeferred(self.collect)
        self._running = running
        running.addCallbacks(self._collected, self._failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _collected(self, stats: Stats, waiters: list[Deferred[Stats]]) -> None:
        last = self.clock.seconds()
        log.debug("garbage collected", d=go_duration(int(stats.elapsed * 1e9)))
        self.gc_time += stats.elapsed
        self.collections += 1
        self.triggered = False
        self.deletions = 0
        self.mutations = 0
        if self.pause_threshold > 0.0:
            avg = self.gc_time / self.collections
            self.interval = avg / self.pause_threshold - avg
        self.last_collection = last
        self._running = None
        if not self._stopped:
            self._schedule(self.interval)
        for waiter in waiters:
            waiter.callback(stats)
        self._replay()

    def _failed(self, failure: Failure, waiters: list[Deferred[Stats]]) -> None:
        log.failure("garbage collection failed", failure=failure)
        last = self.clock.seconds()
        if self.next_collection is not None and self.last_collection is not None:
            delay = self.next_collection - self.last_collection + 1.0
        else:
            delay = self.interval + 1.0
        self.last_collection = last
        self._running = None
        if not self._stopped:
            self._schedule(delay)
        for waiter in waiters:
            waiter.errback(CdtwistError("gc failed"))
        self._replay()

    def _replay(self) -> None:
        pending, self._pending = self._pending, []
        for ts, mutation, dirty in pending:
            self._on_event(ts, mutation, dirty)


def _init(ic: InitContext) -> GCScheduler:
    from cdtwist.metadata.gc import collector_for

    config: SchedulerConfig = ic.config
    metadata = ic.get(METADATA)
    collector = collector_for(metadata.db)

    def collect() -> Deferred[Stats]:
        return deferToThreadPool(ic.reactor, ic.io_pool, collector.garbage_collect)  # type: ignore[arg-type]

    scheduler = GCScheduler(collect, config, ic.reactor, ic.reactor.callFromThread)  # type: ignore[attr-defined]
    metadata.db.on_commit(lambda: scheduler.mutation_callback(collector.dirty))
    ic.meta.exports.update(
        {
            "PauseThreshold": go_float(scheduler.pause_threshold),
            "DeletionThreshold": str(scheduler.deletion_threshold),
            "MutationThreshold": str(scheduler.mutation_threshold),
            "ScheduleDelay": go_duration(int(round(scheduler.schedule_delay * 1e9))),
        }
    )
    return scheduler


register(Registration(type=GC, id="scheduler", requires=(METADATA,), config=SchedulerConfig, init=_init))
