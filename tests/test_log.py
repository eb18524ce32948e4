# -*- test-case-name: tests.test_log -*-
"""Tests for :mod:`cdtwist.log`.

Expected text/JSON lines were cross-checked against logrus 1.8 (the version
containerd 1.6.20 vendors) configured as containerd configures it.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, timedelta, timezone
from io import StringIO
from typing import Any

from twisted.logger import LegacyLogObserverWrapper, LogEvent, LogLevel, LogPublisher
from twisted.logger import Logger as TwistedLogger
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cdtwist.log import (
    LEVEL_KEY,
    TIME_NS_KEY,
    Logger,
    LogLevelName,
    LogObserver,
    dump_stacks,
    format_time,
    get_logger,
    go_quote,
    make_observer,
    parse_level,
)

NOW = 1795822201123456789  # 2026-11-27T23:30:01.123456789Z
T = 'time="2026-11-27T23:30:01.123456789Z"'
JT = '"time":"2026-11-27T23:30:01.123456789Z"'
BOOM = "Traceback (most recent call last):\\nFailure: builtins.ValueError: boom"


class _Base(SynchronousTestCase):
    fmt = "text"

    def setUp(self) -> None:
        self.out = StringIO()
        self.observer = LogObserver(self.out, self.fmt, "info", tz=UTC)
        self.log = Logger("tests.test_log", observer=self.observer, clock=lambda: NOW)

    def pinned(self, event: LogEvent) -> None:
        """Forward to the observer with the time fixed, for loggers we do not build."""
        event[TIME_NS_KEY] = NOW
        self.observer(event)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


class ParseLevelTests(SynchronousTestCase):
    def test_names(self) -> None:
        for name in ("trace", "debug", "info", "warning", "error", "fatal", "panic"):
            self.assertIs(parse_level(name), LogLevelName(name))
            self.assertIs(parse_level(name.upper()), LogLevelName(name))
        self.assertIs(parse_level("warn"), LogLevelName.WARNING)
        self.assertEqual(str(parse_level("Warn")), "warning")

    def test_unknown(self) -> None:
        """The error names the bad value, worded like logrus."""
        e = self.assertRaises(ValueError, parse_level, "verbose")
        self.assertEqual(str(e), 'not a valid logrus Level: "verbose"')
        e = self.assertRaises(ValueError, parse_level, "")
        self.assertEqual(str(e), 'not a valid logrus Level: ""')

    def test_severity(self) -> None:
        ordered = sorted(LogLevelName, key=lambda n: n.severity)
        self.assertEqual(
            [str(n) for n in ordered], ["trace", "debug", "info", "warning", "error", "fatal", "panic"]
        )

    def test_twisted_levels(self) -> None:
        self.assertEqual(
            [n.twisted_level for n in LogLevelName],
            [
                LogLevel.debug,
                LogLevel.debug,
                LogLevel.info,
                LogLevel.warn,
                LogLevel.error,
                LogLevel.critical,
                LogLevel.critical,
            ],
        )


class TextFormatTests(_Base):
    def test_fields(self) -> None:
        """Keywords not used by the format become sorted key=value fields."""
        self.log.info("starting cdtwist", version="1.6.20", revision="1e1ea6e9")
        self.assertEqual(
            self.lines(), [f'{T} level=info msg="starting cdtwist" revision=1e1ea6e9 version=1.6.20']
        )

    def test_plugin_logger(self) -> None:
        log = get_logger(plugin_type="io.containerd.event.v1", observer=self.pinned)
        log.info('loading plugin "{plugin}"...', plugin="io.containerd.event.v1.exchange")
        self.assertEqual(
            self.lines(),
            [
                f'{T} level=info msg="loading plugin \\"io.containerd.event.v1.exchange\\"..."'
                " type=io.containerd.event.v1"
            ],
        )

    def test_plugin_id(self) -> None:
        get_logger(plugin_type="io.containerd.grpc.v1", plugin_id="cri", observer=self.pinned).warn("x")
        self.assertEqual(self.lines(), [f"{T} level=warning msg=x id=cri type=io.containerd.grpc.v1"])

    def test_quoting(self) -> None:
        """Bare only for [A-Za-z0-9-._/@^+]*; otherwise Go's %q (so empty stays bare)."""
        cases = [
            ("", "v="),
            ("plain", "v=plain"),
            ("@^+-._/", "v=@^+-._/"),
            ("a b", 'v="a b"'),
            ('q"uote', 'v="q\\"uote"'),
            ("k=v", 'v="k=v"'),
            ("x:y", 'v="x:y"'),
            ("back\\slash", 'v="back\\\\slash"'),
            ("tab\there", 'v="tab\\there"'),
            ("nl\n", 'v="nl\\n"'),
            ("bell\a\x01\x7f", 'v="bell\\a\\x01\\x7f"'),
            ("é", 'v="é"'),
            ("\u00a0", 'v="\\u00a0"'),
            ("\u200b", 'v="\\u200b"'),
            ("\U0001f600", 'v="\U0001f600"'),
            ("\U000e0001", 'v="\\U000e0001"'),
            ("a<b>&c", 'v="a<b>&c"'),
            ("\u2028", 'v="\\u2028"'),
            (b"bad\xffbyte", 'v="bad\\xffbyte"'),
        ]
        for value, _ in cases:
            self.log.info("m", v=value)
        self.assertEqual(self.lines(), [f"{T} level=info msg=m {want}" for _, want in cases])

    def test_go_values(self) -> None:
        """Non-strings print as fmt.Sprint prints the Go value they stand for."""
        cases = [
            (True, "true"),
            (False, "false"),
            (None, '"<nil>"'),
            (3, "3"),
            (-7, "-7"),
            (1.5, "1.5"),
            (1.0, "1"),
            (1e6, "1e+06"),
            (100000.0, "100000"),
            (123456789.0, "1.23456789e+08"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e21, "1e+21"),
            (2.5e-300, "2.5e-300"),
            (ValueError("boom here"), '"boom here"'),
            (["a", "b c"], '"[a b c]"'),
            ({"b": 2, "a": 1}, '"map[a:1 b:2]"'),
        ]
        for value, _ in cases:
            self.log.info("m", v=value)
        self.assertEqual(self.lines(), [f"{T} level=info msg=m v={want}" for _, want in cases])

    def test_sorting_and_clashes(self) -> None:
        """Fields sort bytewise after time/level/msg; reserved names get a fields. prefix."""
        self.log.warn(**{"time": 1, "msg": 2, "level": 3, "zeta": 4, "Alpha": 5})
        self.assertEqual(
            self.lines(), [f"{T} level=warning Alpha=5 fields.level=3 fields.msg=2 fields.time=1 zeta=4"]
        )

    def test_empty_message(self) -> None:
        self.log.info(count=2)
        self.log.info("", count=3)
        self.assertEqual(self.lines(), [f"{T} level=info count=2", f"{T} level=info count=3"])

    def test_consumed_keys(self) -> None:
        """Any reference to a key in the format (attribute, index, call, nested spec) consumes it."""

        class Stats:
            secs = 1.5

        self.log.info(
            "pulled {ref} in {stats.secs}s from {hosts[0]} {what()} {n:>{width}}",
            ref="docker.io/library/busybox:latest",
            stats=Stats(),
            hosts=["registry-1.docker.io"],
            what=lambda: "ok",
            n=7,
            width=3,
            extra="left",
        )
        self.assertEqual(
            self.lines(),
            [
                f'{T} level=info msg="pulled docker.io/library/busybox:latest in 1.5s'
                f' from registry-1.docker.io ok   7" extra=left'
            ],
        )

    def test_log_keys_not_fields(self) -> None:
        self.log.info("m", log_custom=1)
        self.assertEqual(self.lines(), [f"{T} level=info msg=m"])

    def test_bound_fields(self) -> None:
        """with_fields adds to bound fields; call keywords win over bound fields."""
        log = self.log.with_fields(namespace="k8s.io", id="abc")
        log.with_fields(runtime="io.containerd.runc.v2").info("started", id="def")
        self.assertEqual(
            self.lines(),
            [f"{T} level=info msg=started id=def namespace=k8s.io runtime=io.containerd.runc.v2"],
        )
        self.assertEqual(dict(self.log.fields), {})

    def test_multiline_message(self) -> None:
        self.log.info("a\nb")
        self.assertEqual(self.lines(), [f'{T} level=info msg="a\\nb"'])

    def test_failure(self) -> None:
        """log.failure puts the traceback in error= and logs at error, not fatal."""
        self.log.failure("handler failed", Failure(ValueError("boom")), method="/x")
        self.assertEqual(self.lines(), [f'{T} level=error msg="handler failed" error="{BOOM}" method=/x'])

    def test_failure_in_flight(self) -> None:
        try:
            raise ValueError("x y")
        except ValueError:
            self.log.failure("oops")
        [line] = self.lines()
        self.assertTrue(
            line.startswith(f'{T} level=error msg=oops error="Traceback (most recent call last):\\n')
        )
        self.assertIn("test_failure_in_flight", line)
        self.assertTrue(line.endswith('builtins.ValueError: x y"'))

    def test_error_keyword(self) -> None:
        """``error=exc`` is logrus's WithError: the message, no traceback."""
        self.log.error("failed to load plugin", error=ValueError("no such file"))
        self.assertEqual(self.lines(), [f'{T} level=error msg="failed to load plugin" error="no such file"'])

    def test_levels(self) -> None:
        self.observer.set_level("trace")
        self.log.trace("a")
        self.log.debug("b")
        self.log.warning("c")
        self.log.critical("d")
        self.log.fatal("e")
        self.log.panic("f")
        self.log.log("warn", "g")
        self.assertEqual(
            self.lines(),
            [
                f"{T} level=trace msg=a",
                f"{T} level=debug msg=b",
                f"{T} level=warning msg=c",
                f"{T} level=error msg=d",
                f"{T} level=fatal msg=e",
                f"{T} level=panic msg=f",
                f"{T} level=warning msg=g",
            ],
        )

    def test_twisted_levels_on_events(self) -> None:
        events: list[LogEvent] = []
        log = Logger("x", observer=events.append)
        log.trace("a")
        log.fatal("b")
        self.assertEqual(
            [(e["log_level"], e[LEVEL_KEY]) for e in events],
            [
                (LogLevel.debug, LogLevelName.TRACE),
                (LogLevel.critical, LogLevelName.FATAL),
            ],
        )

    def test_level_field(self) -> None:
        """A ``level`` keyword is a field (prefixed), not emit's level; ``format=`` works as in Twisted."""
        self.log.info("m", level="x")
        self.log.log("warn", "m", level="y")
        self.log.fatal(format="{a}", a=1, level="z")
        self.assertEqual(
            self.lines(),
            [
                f"{T} level=info msg=m fields.level=x",
                f"{T} level=warning msg=m fields.level=y",
                f"{T} level=fatal msg=1 fields.level=z",
            ],
        )

    def test_time_zone(self) -> None:
        observer = LogObserver(self.out, "text", "info", tz=timezone(timedelta(hours=1, minutes=30)))
        Logger("x", observer=observer, clock=lambda: NOW).info("m")
        self.assertEqual(self.lines(), ['time="2026-11-28T01:00:01.123456789+01:30" level=info msg=m'])

    def test_float_time(self) -> None:
        """Twisted's float log_time is read through its shortest repr."""
        self.observer({"log_time": 1795822201.1234567, "log_format": "m", "log_level": LogLevel.info})
        self.assertEqual(self.lines(), ['time="2026-11-27T23:30:01.123456700Z" level=info msg=m'])

    def test_missing_time_uses_clock(self) -> None:
        observer = LogObserver(self.out, "text", "info", tz=UTC, clock=lambda: NOW)
        observer({"log_format": "m"})
        self.assertEqual(self.lines(), [f"{T} level=info msg=m"])

    def test_unformattable_event(self) -> None:
        """A render error becomes a line about it instead of an exception."""
        self.log.info("m", log_fields={1: "a", "b": 2})
        [line] = self.lines()
        self.assertTrue(
            line.startswith(f'{T} level=info msg="unable to format log event" error="TypeError: ')
        )

    def test_bad_format_string(self) -> None:
        self.log.info("{missing}")
        [line] = self.lines()
        self.assertTrue(line.startswith(f'{T} level=info msg="Unable to format event '))

    def test_invalid_twisted_level(self) -> None:
        self.log.emit("bogus", "m")  # type: ignore[arg-type]
        [line] = self.lines()
        self.assertTrue(line.startswith(f"{T} level=error msg=\"Got invalid log level 'bogus' in <Logger"))
        self.assertIn("InvalidLogLevelError", line)

    def test_log_trace_passthrough(self) -> None:
        """Twisted's own ``log_trace`` observer tracing still works."""
        trace: list[Any] = []
        self.log.info("m", log_trace=trace)
        self.assertEqual(trace, [(self.log, self.observer)])


class JSONFormatTests(_Base):
    fmt = "json"

    def test_fields(self) -> None:
        """Keys sort like a Go map: fields mix with level/msg/time."""
        self.log.with_fields(type="io.containerd.event.v1").info("starting", version="1.6.20", count=2)
        self.assertEqual(
            self.lines(),
            [
                f'{{"count":2,"level":"info","msg":"starting",{JT},'
                '"type":"io.containerd.event.v1","version":"1.6.20"}'
            ],
        )

    def test_escaping(self) -> None:
        """Go's encoder: HTML-escaped, \\u00XX controls, U+2028/9 escaped, bad UTF-8 → \\ufffd."""
        self.log.info("a<b>&c", v='q"\\\n\t\a\x01\x7f\u2028é\udcff')
        self.assertEqual(
            self.lines(),
            [
                f'{{"level":"info","msg":"a\\u003cb\\u003e\\u0026c",{JT},'
                '"v":"q\\"\\\\\\n\\t\\u0007\\u0001\x7f\\u2028é\\ufffd"}'
            ],
        )

    def test_values(self) -> None:
        self.log.info(
            "",
            a=None,
            b=True,
            c=1e6,
            d=1e-5,
            e=1e21,
            f=1e-7,
            g=[1, "x"],
            h={"z": 1, "y": [2.5]},
            i=ValueError("bad"),
            j=float("nan"),
        )
        self.assertEqual(
            self.lines(),
            [
                '{"a":null,"b":true,"c":1000000,"d":0.00001,"e":1e+21,"f":1e-7,'
                '"g":[1,"x"],"h":{"y":[2.5],"z":1},"i":"bad","j":"NaN","level":"info","msg":"",'
                f"{JT}}}"
            ],
        )

    def test_clashes(self) -> None:
        self.log.warn(**{"time": 1, "msg": 2, "level": 3, "zeta": 4, "Alpha": 5})
        self.assertEqual(
            self.lines(),
            [
                '{"Alpha":5,"fields.level":3,"fields.msg":2,"fields.time":1,'
                f'"level":"warning","msg":"",{JT},"zeta":4}}'
            ],
        )

    def test_failure(self) -> None:
        self.log.failure("handler failed", Failure(ValueError("boom")))
        self.assertEqual(self.lines(), [f'{{"error":"{BOOM}","level":"error","msg":"handler failed",{JT}}}'])


class LevelFilterTests(_Base):
    def emit_all(self) -> None:
        for name in LogLevelName:
            self.log.log(name, str(name))

    def levels(self) -> list[str]:
        return [re.search(r"level=(\w+)", line).group(1) for line in self.lines()]  # type: ignore[union-attr]

    def test_default_info(self) -> None:
        self.emit_all()
        self.assertEqual(self.levels(), ["info", "warning", "error", "fatal", "panic"])

    def test_debug_hides_trace(self) -> None:
        self.observer.set_level("debug")
        self.emit_all()
        self.assertEqual(self.levels(), ["debug", "info", "warning", "error", "fatal", "panic"])

    def test_trace(self) -> None:
        self.assertIs(self.observer.set_level("TRACE"), LogLevelName.TRACE)
        self.emit_all()
        self.assertEqual(len(self.lines()), 7)

    def test_panic_only(self) -> None:
        self.observer.set_level("panic")
        self.emit_all()
        self.assertEqual(self.levels(), ["panic"])

    def test_set_level_at_run_time(self) -> None:
        self.log.debug("hidden")
        self.observer.set_level("debug")
        self.log.debug("shown")
        self.observer.set_level("warn")
        self.log.info("hidden")
        self.assertEqual(self.lines(), [f"{T} level=debug msg=shown"])
        self.assertIs(self.observer.level, LogLevelName.WARNING)

    def test_bad_set_level_keeps_level(self) -> None:
        self.assertRaises(ValueError, self.observer.set_level, "loud")
        self.assertIs(self.observer.level, LogLevelName.INFO)

    def test_enabled(self) -> None:
        self.assertFalse(self.observer.enabled("debug"))
        self.assertTrue(self.observer.enabled("info"))
        self.assertTrue(self.observer.enabled("fatal"))

    def test_twisted_events_filtered(self) -> None:
        log = TwistedLogger("twisted", observer=self.pinned)
        log.debug("no")
        self.observer.set_level("debug")
        log.debug("yes")
        self.assertEqual(self.lines(), [f"{T} level=debug msg=yes"])


class ObserverConstructionTests(SynchronousTestCase):
    def test_make_observer(self) -> None:
        observer = make_observer(StringIO(), "json", "warn")
        self.assertEqual(observer.format, "json")
        self.assertIs(observer.level, LogLevelName.WARNING)

    def test_unknown_format(self) -> None:
        e = self.assertRaises(ValueError, make_observer, StringIO(), "xml", "info")
        self.assertEqual(str(e), "unknown log format: xml")

    def test_unknown_level(self) -> None:
        e = self.assertRaises(ValueError, make_observer, StringIO(), "text", "loud")
        self.assertEqual(str(e), 'not a valid logrus Level: "loud"')


class TwistedEventTests(_Base):
    def test_new_style(self) -> None:
        """Twisted's own events: consumed keys vanish, others become fields; critical is error."""
        log = TwistedLogger("twisted.scripts._twistd_unix", observer=self.pinned)
        log.info("reactor class: {reactor}.", reactor="twisted.internet.epollreactor.EPollReactor")
        log.failure("Unhandled error in Deferred:", Failure(ValueError("boom")), debugInfo="d")
        self.assertEqual(
            self.lines(),
            [
                f'{T} level=info msg="reactor class: twisted.internet.epollreactor.EPollReactor."',
                f'{T} level=error msg="Unhandled error in Deferred:" debugInfo=d error="{BOOM}"',
            ],
        )

    def legacy(self) -> legacy_log.LogPublisher:
        return legacy_log.LogPublisher(publishPublisher=LogPublisher(self.pinned))

    def test_legacy_msg(self) -> None:
        """twisted.python.log.msg: the joined message, no free-form fields."""
        self.legacy().msg("hello", "world", system="-", extra=1)
        self.assertEqual(self.lines(), [f'{T} level=info msg="hello world"'])

    def test_legacy_err(self) -> None:
        """log.err: why (or "Unhandled Error") as msg, the traceback as error."""
        publisher = self.legacy()
        publisher.msg(failure=Failure(ValueError("boom")), why="while frobbing", isError=1)
        publisher.msg(failure=Failure(ValueError("boom")), why=None, isError=1)
        publisher.msg("not a failure", isError=1)
        self.assertEqual(
            self.lines(),
            [
                f'{T} level=error msg="while frobbing" error="{BOOM}"',
                f'{T} level=error msg="Unhandled Error" error="{BOOM}"',
                f'{T} level=error msg="not a failure"',
            ],
        )

    def test_legacy_format(self) -> None:
        self.legacy().msg(format="%(a)s-%(b)s", a=1, b=2)
        self.assertEqual(self.lines(), [f"{T} level=info msg=1-2"])

    def test_after_legacy_wrapper(self) -> None:
        """Keys a LegacyLogObserverWrapper adds in place do not leak into fields."""
        publisher = LogPublisher(LegacyLogObserverWrapper(lambda e: None), self.pinned)
        log = Logger("x", observer=publisher)
        log.info("m", extra=1)
        log.failure("handler failed", Failure(ValueError("boom")))
        self.assertEqual(
            self.lines(),
            [f"{T} level=info msg=m extra=1", f'{T} level=error msg="handler failed" error="{BOOM}"'],
        )

    def test_bare_event(self) -> None:
        """An event with nothing but a time still makes a line."""
        self.pinned({})
        self.assertEqual(self.lines(), [f"{T} level=info"])


class NamespaceTests(SynchronousTestCase):
    def test_get_logger(self) -> None:
        self.assertEqual(get_logger().namespace, "tests.test_log")
        self.assertEqual(get_logger("cdtwist.server").namespace, "cdtwist.server")
        self.assertEqual(get_logger(plugin_type="t").namespace, "tests.test_log")
        self.assertEqual(
            dict(get_logger(plugin_type="t", plugin_id="i", extra=1).fields),
            {
                "type": "t",
                "id": "i",
                "extra": 1,
            },
        )

    def test_logger_default_namespace(self) -> None:
        self.assertEqual(Logger().namespace, "tests.test_log")

    def test_descriptor(self) -> None:
        """As a class attribute it keeps fields and clock (Twisted's descriptor)."""
        events: list[LogEvent] = []

        class Thing:
            log = Logger(observer=events.append, fields={"type": "t"}, clock=lambda: NOW)

        thing = Thing()
        thing.log.info("m")
        self.assertEqual(thing.log.namespace, "tests.test_log.Thing")
        [event] = events
        self.assertIs(event["log_source"], thing)
        self.assertEqual(event["log_fields"], {"type": "t"})
        self.assertEqual(event[TIME_NS_KEY], NOW)


class TimeFormatTests(SynchronousTestCase):
    def test_utc(self) -> None:
        self.assertEqual(format_time(NOW, UTC), "2026-11-27T23:30:01.123456789Z")

    def test_padding_and_offset(self) -> None:
        self.assertEqual(
            format_time(1795822201_000000007, timezone(timedelta(hours=-5))),
            "2026-11-27T18:30:01.000000007-05:00",
        )

    def test_local(self) -> None:
        self.assertRegex(format_time(NOW), r"^2026-11-2\dT\d\d:\d\d:01\.123456789(Z|[+-]\d\d:\d\d)$")


class GoQuoteTests(SynchronousTestCase):
    def test_quote(self) -> None:
        self.assertEqual(go_quote('a "b"\n\\'), '"a \\"b\\"\\n\\\\"')
        self.assertEqual(go_quote("\ud800"), '"\\xed\\xa0\\x80"')


class _Recorder:
    """A stream that notices overlapping or multi-line writes."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.busy = False
        self.overlapped = False

    def write(self, text: str) -> int:
        if self.busy:
            self.overlapped = True
        self.busy = True
        time.sleep(0)
        self.writes.append(text)
        self.busy = False
        return len(text)

    def flush(self) -> None:
        pass


class ThreadSafetyTests(SynchronousTestCase):
    def test_one_write_per_line(self) -> None:
        stream = _Recorder()
        observer = LogObserver(stream, "text", "info", tz=UTC)  # type: ignore[arg-type]
        log = Logger("x", observer=observer, clock=lambda: NOW)

        def spam(n: int) -> None:
            for i in range(200):
                log.info("from thread {n}", n=n, i=i, text="a b\nc")

        threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertFalse(stream.overlapped)
        self.assertEqual(len(stream.writes), 1600)
        for text in stream.writes:
            self.assertEqual(text.count("\n"), 1)
            self.assertTrue(text.endswith('text="a b\\nc"\n'))


def _park(event: threading.Event) -> None:
    event.wait(30)


class DumpStacksTests(SynchronousTestCase):
    def test_dump(self) -> None:
        release = threading.Event()
        thread = threading.Thread(target=_park, args=(release,), name="cdtwist-waiter", daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(release.set)

        dump = dump_stacks()

        blocks = dump.rstrip("\n").split("\n\n")
        me = threading.current_thread()
        self.assertEqual(
            blocks[0].splitlines()[0], f"thread {me.ident} [{me.name}, tid {me.native_id}, running]:"
        )
        self.assertEqual(blocks[0].splitlines()[1], "tests.test_log.DumpStacksTests.test_dump()")
        self.assertNotIn("dump_stacks", blocks[0])
        [mine] = [b for b in blocks if b.startswith(f"thread {thread.ident} ")]
        lines = mine.splitlines()
        self.assertEqual(lines[0], f"thread {thread.ident} [cdtwist-waiter, tid {thread.native_id}, daemon]:")
        self.assertIn("tests.test_log._park()", lines)
        self.assertIn("threading.Event.wait()", lines)
        self.assertTrue(all(line.startswith("\t") for line in lines[2::2]))
