"""The GC scheduler's policy on a fake clock (ports containerd's ``gc/scheduler/scheduler_test.go``)."""

from __future__ import annotations

import threading

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import Canceled, CdtwistError
from cdtwist.gc import Stats
from cdtwist.gc.scheduler import GCScheduler, SchedulerConfig, go_float


class FakeCollector:
    """Collections take no real time but report ``d`` seconds; or stay pending when ``hold``."""

    def __init__(self, d: float = 0.0, hold: bool = False) -> None:
        self.d = d
        self.hold = hold
        self.runs = 0
        self.pending: list[Deferred[Stats]] = []
        self.fail = False

    def __call__(self) -> Deferred[Stats]:
        self.runs += 1
        if self.fail:
            raise CdtwistError("boom")
        if self.hold:
            d: Deferred[Stats] = Deferred()
            self.pending.append(d)
            return d
        return succeed(Stats(meta=self.d))

    def finish(self) -> None:
        self.pending.pop(0).callback(Stats(meta=self.d))


def direct(f, *args):  # type: ignore[no-untyped-def]
    return f(*args)


def make(collector: FakeCollector, **config: object) -> tuple[GCScheduler, Clock]:
    clock = Clock()
    cfg = SchedulerConfig(**config)  # type: ignore[arg-type]
    scheduler = GCScheduler(collector, cfg, clock, direct)
    scheduler.start()
    return scheduler, clock


def run_for(clock: Clock, seconds: float, step: float = 0.0001, each=None) -> None:  # type: ignore[no-untyped-def]
    steps = int(round(seconds / step))
    for _ in range(steps):
        if each is not None:
            each()
        clock.advance(step)


class SchedulerTests(SynchronousTestCase):
    def test_pause_threshold(self) -> None:
        """100µs collections under a 2% threshold run about every 5ms, however many deletions."""
        tc = FakeCollector(d=0.0001)
        scheduler, clock = make(tc, pause_threshold=0.02, startup_delay="0s")
        run_for(clock, 0.015, each=lambda: scheduler.mutation_callback(True))
        self.assertLessEqual(tc.runs, 4)
        self.assertGreaterEqual(tc.runs, 2)
        self.assertAlmostEqual(scheduler.interval, 0.0001 / 0.02 - 0.0001)

    def test_deletion_threshold(self) -> None:
        tc = FakeCollector(d=1.0)
        scheduler, clock = make(tc, pause_threshold=0.001, deletion_threshold=5, startup_delay="0s")
        for _ in range(5):
            clock.advance(0.001)
            self.assertEqual(tc.runs, 0)
            scheduler.mutation_callback(True)
        clock.advance(0)
        self.assertEqual(tc.runs, 1)
        clock.advance(0.030)
        self.assertEqual(tc.runs, 1)

    def test_trigger(self) -> None:
        tc = FakeCollector(d=0.010)
        scheduler, clock = make(tc, pause_threshold=0.0, startup_delay="0s")
        got: list[Stats] = []
        scheduler.schedule_and_wait().addCallback(got.append)
        clock.advance(0)
        self.assertEqual(got, [Stats(meta=0.010)])
        self.assertEqual(got[0].elapsed, 0.010)
        self.assertEqual(tc.runs, 1)

    def test_startup_delay(self) -> None:
        tc = FakeCollector(d=1.0)
        scheduler, clock = make(tc, pause_threshold=0.001, startup_delay="1ms")
        clock.advance(0.0009)
        self.assertEqual(tc.runs, 0)
        run_for(clock, 0.030)
        self.assertEqual(tc.runs, 1)

    def test_no_startup_collection_without_delay(self) -> None:
        tc = FakeCollector()
        scheduler, clock = make(tc, startup_delay="0s")
        clock.advance(10)
        self.assertEqual(tc.runs, 0)

    def test_idle_collections_are_skipped(self) -> None:
        """After the startup run, a timer that finds nothing to do only looks again an interval later."""
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc)
        clock.advance(0.1)
        self.assertEqual(tc.runs, 1)
        interval = scheduler.interval
        self.assertAlmostEqual(interval, 0.001 / 0.02 - 0.001)
        clock.advance(interval * 10)
        self.assertEqual(tc.runs, 1)
        # a deletion is picked up at the next look
        scheduler.mutation_callback(True)
        clock.advance(interval)
        self.assertEqual(tc.runs, 2)

    def test_mutation_threshold(self) -> None:
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, mutation_threshold=3)
        clock.advance(0.1)
        self.assertEqual(tc.runs, 1)
        for _ in range(2):
            scheduler.mutation_callback(False)
        clock.advance(scheduler.interval * 3)
        self.assertEqual(tc.runs, 1)
        scheduler.mutation_callback(False)
        clock.advance(scheduler.interval)
        self.assertEqual(tc.runs, 2)

    def test_mutation_threshold_zero_only_deletions(self) -> None:
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, mutation_threshold=0)
        clock.advance(0.1)
        for _ in range(1000):
            scheduler.mutation_callback(False)
        clock.advance(5)
        self.assertEqual(tc.runs, 1)

    def test_first_deletion_schedules_when_nothing_is(self) -> None:
        """With no startup run nothing is scheduled: a deletion (deletion_threshold 0) schedules one."""
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, startup_delay="0s", schedule_delay="10ms")
        scheduler.mutation_callback(False)
        clock.advance(1)
        self.assertEqual(tc.runs, 0)
        scheduler.mutation_callback(True)
        clock.advance(0.009)
        self.assertEqual(tc.runs, 0)
        clock.advance(0.0011)
        self.assertEqual(tc.runs, 1)

    def test_trigger_waits_schedule_delay(self) -> None:
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, schedule_delay="50ms", startup_delay="0s")
        scheduler.schedule_and_wait()
        clock.advance(0.049)
        self.assertEqual(tc.runs, 0)
        clock.advance(0.0011)
        self.assertEqual(tc.runs, 1)

    def test_trigger_keeps_an_earlier_schedule(self) -> None:
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, schedule_delay="50ms", startup_delay="10ms")
        scheduler.schedule_and_wait()
        clock.advance(0.010)
        self.assertEqual(tc.runs, 1)

    def test_events_during_a_collection(self) -> None:
        """Mutations committed while a collection runs count only if newer than its end; waiters
        arriving meanwhile get the next collection."""
        tc = FakeCollector(d=0.001, hold=True)
        scheduler, clock = make(tc, startup_delay="0s")
        first: list[Stats] = []
        scheduler.schedule_and_wait().addCallback(first.append)
        clock.advance(0)
        self.assertEqual(tc.runs, 1)
        scheduler.mutation_callback(True)  # e.g. the sweep's own commit
        second: list[Stats] = []
        scheduler.schedule_and_wait().addCallback(second.append)
        clock.advance(0.001)
        tc.finish()
        self.assertEqual(len(first), 1)
        self.assertEqual(second, [])
        self.assertEqual(scheduler.deletions, 0)
        clock.advance(0)
        self.assertEqual(tc.runs, 2)
        tc.finish()
        self.assertEqual(len(second), 1)

    def test_failure_reschedules_and_fails_waiters(self) -> None:
        tc = FakeCollector(d=0.001)
        scheduler, clock = make(tc, startup_delay="10ms")
        clock.advance(0.01)
        self.assertEqual(tc.runs, 1)
        tc.fail = True
        errors: list[BaseException] = []
        scheduler.schedule_and_wait().addErrback(lambda f: errors.append(f.value))
        clock.advance(0)
        self.assertEqual(tc.runs, 2)
        self.assertEqual([str(e) for e in errors], ["gc failed"])
        self.assertEqual(len(self.flushLoggedErrors(CdtwistError)), 1)
        # retried about a second later (the triggered flag is still set)
        tc.fail = False
        clock.advance(0.5)
        self.assertEqual(tc.runs, 2)
        clock.advance(1.0)
        self.assertEqual(tc.runs, 3)

    def test_stop_cancels_waiters_and_waits_for_a_running_collection(self) -> None:
        tc = FakeCollector(hold=True)
        scheduler, clock = make(tc, startup_delay="0s", schedule_delay="1s")
        running: list[Stats] = []
        scheduler.schedule_and_wait()
        clock.advance(1)
        late: list[BaseException] = []
        scheduler.schedule_and_wait().addErrback(lambda f: late.append(f.value))
        stopped: list[None] = []
        scheduler.stop().addCallback(stopped.append)
        self.assertEqual(len(late), 1)
        self.assertIsInstance(late[0], Canceled)
        self.assertEqual(stopped, [])
        tc.finish()
        self.assertEqual(stopped, [None])
        clock.advance(100)
        self.assertEqual(tc.runs, 1)
        self.assertEqual(running, [])
        refused: list[BaseException] = []
        scheduler.schedule_and_wait().addErrback(lambda f: refused.append(f.value))
        self.assertIsInstance(refused[0], Canceled)

    def test_blocking_wait_from_a_thread(self) -> None:
        tc = FakeCollector(d=0.002)
        calls: list[tuple[object, ...]] = []
        lock = threading.Lock()

        def queue_call(f, *args):  # type: ignore[no-untyped-def]
            with lock:
                calls.append((f, *args))

        clock = Clock()
        scheduler = GCScheduler(tc, SchedulerConfig(startup_delay="0s"), clock, queue_call)
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(scheduler.schedule_and_wait_blocking(poll=0.01)))
        worker.start()
        for _ in range(500):
            with lock:
                pending, calls[:] = list(calls), []
            for f, *args in pending:
                f(*args)
            clock.advance(0)
            if result:
                break
            worker.join(0.01)
        worker.join(5)
        self.assertEqual(result, [Stats(meta=0.002)])

    def test_blocking_wait_canceled(self) -> None:
        tc = FakeCollector()
        scheduler = GCScheduler(tc, SchedulerConfig(), Clock(), lambda f, *a: None)
        self.assertRaises(Canceled, scheduler.schedule_and_wait_blocking, lambda: False, 0.01)

    def test_thresholds_clamped_like_containerd(self) -> None:
        s = GCScheduler(FakeCollector(), SchedulerConfig(pause_threshold=0.9, mutation_threshold=-1), Clock(), direct)
        self.assertEqual((s.pause_threshold, s.mutation_threshold), (0.5, 0))
        s = GCScheduler(FakeCollector(), SchedulerConfig(pause_threshold=-1, schedule_delay="-1s"), Clock(), direct)
        self.assertEqual((s.pause_threshold, s.schedule_delay), (0.0, 0.0))


class ConfigTests(SynchronousTestCase):
    def test_defaults_are_containerds(self) -> None:
        cfg = SchedulerConfig()
        self.assertEqual(
            (
                cfg.pause_threshold,
                cfg.deletion_threshold,
                cfg.mutation_threshold,
                cfg.schedule_delay,
                cfg.startup_delay,
            ),
            (0.02, 0, 100, "0s", "100ms"),
        )

    def test_bad_duration_refused(self) -> None:
        err = self.assertRaises(ValueError, SchedulerConfig, schedule_delay="soon")
        self.assertEqual(str(err), 'time: invalid duration "soon"')

    def test_go_float(self) -> None:
        self.assertEqual([go_float(v) for v in (0.02, 0.0, 0.5, 1e-05)], ["0.02", "0", "0.5", "1e-05"])


class PluginTests(SynchronousTestCase):
    def test_registrations_keep_containerds_ids_and_requirements(self) -> None:
        import cdtwist.content.plugin  # noqa: F401
        import cdtwist.content.service  # noqa: F401
        import cdtwist.gc.scheduler  # noqa: F401
        import cdtwist.leases.service  # noqa: F401
        from cdtwist.plugin import registry

        expected = {
            "io.containerd.content.v1.content": (),
            "io.containerd.gc.v1.scheduler": ("io.containerd.metadata.v1",),
            "io.containerd.service.v1.content-service": ("io.containerd.event.v1", "io.containerd.metadata.v1"),
            "io.containerd.service.v1.leases-service": ("io.containerd.metadata.v1",),
            "io.containerd.grpc.v1.content": ("io.containerd.service.v1",),
            "io.containerd.grpc.v1.leases": ("io.containerd.service.v1",),
        }
        for uri, requires in expected.items():
            reg = registry.get(uri)
            assert reg is not None, uri
            self.assertEqual(reg.requires, requires, uri)
        self.assertIs(registry.get("io.containerd.gc.v1.scheduler").config, SchedulerConfig)  # type: ignore[union-attr]

    def test_init_exports_and_mutations(self) -> None:
        import os

        from cdtwist.gc.scheduler import _init
        from cdtwist.metadata.db import DB
        from cdtwist.metadata.gc import collector_for
        from cdtwist.metadata.plugin import BoltConfig
        from cdtwist.plugin import METADATA
        from cdtwist.plugin.context import Meta

        db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(db.close)
        db.open()

        class Metadata:
            config = BoltConfig()

        md = Metadata()
        md.db = db  # type: ignore[attr-defined]

        class Reactor(Clock):
            def callFromThread(self, f, *args):  # noqa: N802
                f(*args)

        class IC:
            config = SchedulerConfig(schedule_delay="1.5s")
            meta = Meta()
            reactor = Reactor()
            io_pool = None

            def get(self, type_: str) -> object:
                return {METADATA: md}[type_]

        ic = IC()
        scheduler = _init(ic)  # type: ignore[arg-type]
        self.assertEqual(
            ic.meta.exports,
            {"PauseThreshold": "0.02", "DeletionThreshold": "0", "MutationThreshold": "100", "ScheduleDelay": "1.5s"},
        )
        db.update(lambda tx: tx.execute("INSERT INTO namespaces(name) VALUES ('x')"))
        self.assertEqual(scheduler.mutations, 1)
        collector_for(db).mark_dirty()
        db.update(lambda tx: tx.execute("INSERT INTO namespaces(name) VALUES ('y')"))
        self.assertEqual((scheduler.mutations, scheduler.deletions), (2, 1))
