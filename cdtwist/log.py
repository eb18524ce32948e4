# -*- test-case-name: tests.test_log -*-
"""containerd-compatible logging on top of :mod:`twisted.logger`.

Operators grep and parse containerd's logs, so cdtwist must write the same
lines: logrus's text formatter (``time="..." level=info msg="..." k=v``) or
its JSON formatter, with containerd's levels (``trace`` .. ``panic``).  All
code still logs through :mod:`twisted.logger` so Twisted's own events (twistd
start-up, ``log.err``, unhandled Deferred errors) end up in the same stream.

Fields rule: an event's ``key=value`` fields are

1. the fields bound to the :class:`Logger` (``get_logger(plugin_type=...)``,
   :meth:`Logger.with_fields`), carried in the event's ``log_fields`` key;
2. then every keyword of the call whose name does not start with ``log_``
   and is not referenced by the format string (``{name}``, ``{name.attr}``,
   ``{name[0]}`` and ``{name()}`` all consume ``name``);  a keyword
   overrides a bound field of the same name;
3. then ``error``: the traceback of ``log_failure`` (``log.failure``) or of
   a legacy ``log.err`` failure.

Legacy :mod:`twisted.python.log` events contribute no fields (their extra
keys are free-form); keys added by Twisted's legacy-observer wrapper are
ignored.  Field names that clash with ``time``, ``msg``, ``level`` or
``logrus_error`` become ``fields.<name>``, as in logrus.

Levels: trace is emitted as Twisted ``debug`` and fatal/panic as
``critical``; the precise level travels in ``log_cdlevel`` so trace can be
filtered below debug.  Events without it (Twisted's own) map debug, info,
warn and error straight across and ``critical`` to ``error``: Twisted uses
critical for unhandled errors, which containerd would log at error, and a
``level=fatal`` line would wrongly suggest the daemon exited.  Unlike logrus,
fatal and panic only label the line here; stopping is the caller's job.
"""

from __future__ import annotations

import enum
import math
import re
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from functools import lru_cache
from types import FrameType, MappingProxyType
from typing import Any, TextIO, cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.logger import Logger as _TwistedLogger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "FIELDS_KEY",
    "JSON_FORMAT",
    "LEVEL_KEY",
    "TEXT_FORMAT",
    "TIME_NS_KEY",
    "LogLevelName",
    "LogObserver",
    "Logger",
    "dump_stacks",
    "format_time",
    "get_logger",
    "go_quote",
    "make_observer",
    "parse_level",
]

TEXT_FORMAT = "text"
JSON_FORMAT = "json"

#: Event key holding the containerd level (a :class:`LogLevelName`).
#: Not ``log_trace``: Twisted already uses that key for observer tracing.
LEVEL_KEY = "log_cdlevel"
#: Event key holding the fields bound to the emitting :class:`Logger`.
FIELDS_KEY = "log_fields"
#: Event key holding the emission time in integer nanoseconds (RFC3339Nano).
TIME_NS_KEY = "log_time_ns"


class LogLevelName(enum.StrEnum):
    """containerd/logrus level names; ``str()`` is what appears in ``level=``."""

    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    FATAL = "fatal"
    PANIC = "panic"

    @property
    def severity(self) -> int:
        """Rank for threshold filtering (StrEnum comparison would be alphabetical)."""
        return _SEVERITY[self]

    @property
    def twisted_level(self) -> LogLevel:
        """The :class:`twisted.logger.LogLevel` events of this level are emitted at."""
        return _TO_TWISTED[self]


_SEVERITY: dict[LogLevelName, int] = {name: rank for rank, name in enumerate(LogLevelName)}
_TO_TWISTED: dict[LogLevelName, LogLevel] = {
    LogLevelName.TRACE: LogLevel.debug,
    LogLevelName.DEBUG: LogLevel.debug,
    LogLevelName.INFO: LogLevel.info,
    LogLevelName.WARNING: LogLevel.warn,
    LogLevelName.ERROR: LogLevel.error,
    LogLevelName.FATAL: LogLevel.critical,
    LogLevelName.PANIC: LogLevel.critical,
}
_FROM_TWISTED: dict[LogLevel, LogLevelName] = {
    LogLevel.debug: LogLevelName.DEBUG,
    LogLevel.info: LogLevelName.INFO,
    LogLevel.warn: LogLevelName.WARNING,
    LogLevel.error: LogLevelName.ERROR,
    LogLevel.critical: LogLevelName.ERROR,
}
_ALIASES: dict[str, LogLevelName] = {name.value: name for name in LogLevelName} | {
    "warn": LogLevelName.WARNING
}


def parse_level(name: str) -> LogLevelName:
    """Parse a level the way ``logrus.ParseLevel`` does (case-insensitive, ``warn`` alias).

    Raises :class:`ValueError` naming the bad value, with logrus's wording.
    """
    try:
        return _ALIASES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"not a valid logrus Level: {go_quote(str(name))}")


def _event_level(event: LogEvent) -> LogLevelName:
    """The containerd level of any event, ours or Twisted's."""
    name = event.get(LEVEL_KEY)
    if isinstance(name, str):
        try:
            return parse_level(name)
        except ValueError:
            pass
    return _FROM_TWISTED.get(cast(LogLevel, event.get("log_level")), LogLevelName.INFO)


# --------------------------------------------------------------------------
# Loggers


def _caller_module(depth: int) -> str:
    """Module name of the frame ``depth`` levels above the caller, for default namespaces."""
    try:
        return cast(str, sys._getframe(depth + 1).f_globals["__name__"])
    except (KeyError, ValueError):
        return "<unknown>"


class Logger(_TwistedLogger):
    """A Twisted :class:`~twisted.logger.Logger` with bound fields and containerd's levels.

    Bound fields play the role of logrus's ``WithField``; *clock* (integer
    nanoseconds) exists so tests can pin timestamps.
    """

    def __init__(
        self,
        namespace: str | None = None,
        source: object | None = None,
        observer: ILogObserver | None = None,
        *,
        fields: Mapping[str, object] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if namespace is None:
            namespace = _caller_module(1)
        super().__init__(namespace, source, observer)
        self.fields: Mapping[str, object] = MappingProxyType(dict(fields or {}))
        self.clock: Callable[[], int] = clock or time.time_ns

    def __get__(self, instance: object, owner: type | None = None) -> Logger:
        """Keep fields and clock when used as a class attribute (Twisted's descriptor)."""
        assert owner is not None
        return self.__class__(
            f"{owner.__module__}.{owner.__name__}",
            owner if instance is None else instance,
            observer=self.observer,
            fields=self.fields,
            clock=self.clock,
        )

    def with_fields(self, **fields: object) -> Logger:
        """A logger with *fields* added to (or replacing) the bound ones, like ``WithFields``."""
        return self.__class__(
            self.namespace,
            self.source,
            observer=self.observer,
            fields={**self.fields, **fields},
            clock=self.clock,
        )

    def emit(self, level: LogLevel, /, format: str | None = None, **kwargs: object) -> None:
        """Twisted's ``emit`` plus bound fields, ``log_cdlevel`` and a nanosecond timestamp."""
        if level not in LogLevel.iterconstants():
            super().emit(level, format, **kwargs)  # Twisted reports the bad level
            return
        now = self.clock()
        event: dict[str, Any] = kwargs
        if self.fields or FIELDS_KEY in event:
            event[FIELDS_KEY] = {**self.fields, **cast(Mapping[str, object], event.get(FIELDS_KEY) or {})}
        event.setdefault(LEVEL_KEY, _FROM_TWISTED[level])
        event.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=now / 1e9,
        )
        event[TIME_NS_KEY] = now
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))
        self.observer(event)

    def log(self, level: str, /, format: str | None = None, **kwargs: object) -> None:
        """Emit at a containerd level given by name (``"trace"`` .. ``"panic"``)."""
        name = parse_level(level)
        kwargs[LEVEL_KEY] = name
        self.emit(name.twisted_level, format, **kwargs)

    def trace(self, format: str | None = None, **kwargs: object) -> None:
        """Emit below debug; shown only when the threshold is ``trace``."""
        self.log(LogLevelName.TRACE, format, **kwargs)

    def warning(self, format: str | None = None, **kwargs: object) -> None:
        """Alias of :meth:`warn`, matching the printed level name."""
        self.log(LogLevelName.WARNING, format, **kwargs)

    def fatal(self, format: str | None = None, **kwargs: object) -> None:
        """Emit at ``fatal`` (Twisted critical); unlike logrus it does not exit."""
        self.log(LogLevelName.FATAL, format, **kwargs)

    def panic(self, format: str | None = None, **kwargs: object) -> None:
        """Emit at ``panic`` (Twisted critical); unlike logrus it does not raise."""
        self.log(LogLevelName.PANIC, format, **kwargs)


def get_logger(
    namespace: str | None = None,
    *,
    plugin_type: str | None = None,
    plugin_id: str | None = None,
    observer: ILogObserver | None = None,
    **fields: object,
) -> Logger:
    """The module-level logger: ``get_logger(__name__)`` or ``get_logger(plugin_type=..., plugin_id=...)``.

    Plugin loggers print ``type=`` and ``id=`` like containerd's plugin
    loading; *namespace* defaults to the calling module.
    """
    if namespace is None:
        namespace = _caller_module(1)
    if plugin_type is not None:
        fields["type"] = plugin_type
    if plugin_id is not None:
        fields["id"] = plugin_id
    return Logger(namespace, observer=observer, fields=fields)


# --------------------------------------------------------------------------
# Go value rendering


_HEX = "0123456789abcdef"
_SIMPLE_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}
_PLAIN_QUOTED = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII except " and \


def go_quote(text: str) -> str:
    """Quote like Go's ``%q`` / ``strconv.Quote``, which logrus uses for values.

    Surrogate escapes (from undecodable bytes) print as ``\\xNN`` because
    that is what Go prints for the invalid UTF-8 they stand for.
    """
    if _PLAIN_QUOTED.fullmatch(text):
        return f'"{text}"'
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif 0xD800 <= code <= 0xDFFF:
            raw = ch.encode("utf-8", "surrogateescape" if code >= 0xDC80 else "surrogatepass")
            out.extend(f"\\x{b:02x}" for b in raw)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _float_digits(value: float) -> tuple[str, str, int]:
    """Sign, shortest round-trip digits and decimal exponent (value = 0.d * 10**(exp+1))."""
    sign, digits, exponent = Decimal(repr(value)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exp = cast(int, exponent) + len(digits) - 1
    return ("-" if sign else ""), text, exp


def _go_float(value: float, exp_below: int, exp_from: int, pad_exp: bool) -> str:
    """Go's shortest float text: %e outside [exp_below, exp_from), %f inside."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign, digits, exp = _float_digits(value)
    if digits == "0":
        return sign + "0"
    if exp < exp_below or exp >= exp_from:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        exp_digits = f"{abs(exp):02d}" if pad_exp or exp >= 0 else str(abs(exp))
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{exp_digits}"
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    whole = digits[: exp + 1].ljust(exp + 1, "0")
    frac = digits[exp + 1 :]
    return sign + whole + ("." + frac if frac else "")


def _go_sprint(value: object) -> str:
    """``fmt.Sprint`` of the Go value a Python value stands for (logrus's non-string path)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<nil>"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _go_float(value, -4, 6, pad_exp=True)  # %v: shortest %g
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "surrogateescape")  # a Go string is bytes
    if isinstance(value, Failure):
        return str(value.value)
    if isinstance(value, Mapping):
        items = sorted((_go_sprint(k), _go_sprint(v)) for k, v in value.items())
        return "map[" + " ".join(f"{k}:{v}" for k, v in items) + "]"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + " ".join(_go_sprint(v) for v in value) + "]"
    try:
        return str(value)
    except Exception as e:  # a broken __str__ must not lose the line
        return f"%!v(PANIC={type(e).__name__}: {e})"


_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._/@^+]")


def _text_value(value: object) -> str:
    """logrus ``appendValue``: bare when only ``[A-Za-z0-9-._/@^+]`` (or empty), else %q."""
    text = _go_sprint(value)
    return go_quote(text) if _NEEDS_QUOTING.search(text) else text


def _json_string(text: str) -> str:
    """Go ``encoding/json`` string with HTML escaping; surrogates (invalid UTF-8) become ``\\ufffd``."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or ch in "<>&":
            out.append("\\u00" + _HEX[code >> 4] + _HEX[code & 0xF])
        elif code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_value(value: object) -> str:
    """JSON the way Go marshals the equivalent value (sorted map keys, Go float text)."""
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return _json_string(_go_float(value, 0, 0, pad_exp=False))  # Go refuses; keep the line
        return _go_float(value, -6, 21, pad_exp=False)
    if isinstance(value, bytes | bytearray):
        return _json_string(bytes(value).decode("utf-8", "surrogateescape"))
    if isinstance(value, Mapping):
        items = sorted((_go_sprint(k), v) for k, v in value.items())
        return "{" + ",".join(f"{_json_string(k)}:{_json_value(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ",".join(_json_value(v) for v in value) + "]"
    return _json_string(_go_sprint(value))


def format_time(ns: int, tz: tzinfo | None = None) -> str:
    """containerd's ``RFC3339NanoFixed``: 9 fraction digits, ``Z`` for a zero offset.

    *tz* ``None`` means the local zone, as Go's ``time.Now()`` uses.
    """
    seconds, frac = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC)
    moment = moment.astimezone(tz) if tz is not None else moment.astimezone()
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds()) // 60 if offset is not None else 0
    if minutes == 0:
        zone = "Z"
    else:
        hours, mins = divmod(abs(minutes), 60)
        zone = f"{'-' if minutes < 0 else '+'}{hours:02d}:{mins:02d}"
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{frac:09d}{zone}"


# --------------------------------------------------------------------------
# Events to records


@lru_cache(maxsize=2048)
def _format_keys(fmt: str) -> frozenset[str]:
    """Top-level event keys a PEP 3101 format string reads (including nested specs)."""
    keys: set[str] = set()
    try:
        for _, field, spec, _ in string.Formatter().parse(fmt):
            if field:
                root = re.match(r"[^.\[]*", field)
                name = root.group(0) if root else field
                keys.add(name[:-2] if name.endswith("()") else name)
            if spec and "{" in spec:
                keys |= _format_keys(spec)
    except ValueError:
        pass  # Twisted will report the bad format in msg
    return frozenset(keys)


def _traceback(failure: object) -> str:
    """A failure's traceback for the ``error`` field, never raising."""
    try:
        return cast(Failure, failure).getTraceback().rstrip("\n")
    except Exception as e:
        return f"(unable to obtain traceback): {e}"


def _legacy_noise(key: str, value: object, event: LogEvent, msg: str) -> bool:
    """Keys that ``LegacyLogObserverWrapper`` adds to new-style events in place."""
    if key == "message":
        return value == ()
    if key == "time":
        return value == event.get("log_time")
    if key == "system":
        return value == event.get("log_system", "-")
    if key == "format":
        return value == "%(log_legacy)s"
    if key == "isError":
        return value in (0, 1)
    if key == "failure":
        return value is event.get("log_failure")
    if key == "why":
        return "log_failure" in event and value == msg
    return False


def _time_ns(event: LogEvent, clock: Callable[[], int]) -> int:
    """Event time in ns: ours is exact; Twisted's float is read via its shortest repr."""
    ns = event.get(TIME_NS_KEY)
    if isinstance(ns, int):
        return ns
    seconds = event.get("log_time")
    if isinstance(seconds, int | float) and math.isfinite(seconds):
        return int(Decimal(repr(float(seconds))) * 1_000_000_000)
    return clock()


def _record(event: LogEvent) -> tuple[str, dict[str, object]]:
    """Message and fields of an event, following the module's fields rule."""
    fields: dict[str, object] = {}
    failure = event.get("log_failure")
    if "log_logger" not in event and "isError" in event and "message" in event:
        # twisted.python.log.msg/err: the message and failure only.
        if failure is None and event.get("isError"):
            failure = event.get("failure")
        if failure is not None and not event.get("message"):
            why = event.get("why")
            msg = _go_sprint(why) if why else "Unhandled Error"
        else:
            msg = formatEvent(event)
    else:
        msg = formatEvent(event)
        bound = event.get(FIELDS_KEY)
        if isinstance(bound, Mapping):
            fields.update(bound)
        fmt = event.get("log_format")
        consumed = _format_keys(fmt) if isinstance(fmt, str) else frozenset()
        for key, value in event.items():
            if (
                isinstance(key, str)
                and not key.startswith("log_")
                and key not in consumed
                and not _legacy_noise(key, value, event, msg)
            ):
                fields[key] = value
    if failure is not None:
        fields["error"] = _traceback(failure)
    for clash in ("time", "msg", "level", "logrus_error"):
        if clash in fields:
            fields["fields." + clash] = fields.pop(clash)
    return msg, fields


def _render_text(level: LogLevelName, timestamp: str, msg: str, fields: Mapping[str, object]) -> str:
    """One logrus ``TextFormatter`` line (no colours, full timestamp, sorted keys)."""
    parts = [f"time={_text_value(timestamp)}", f"level={level.value}"]
    if msg:
        parts.append(f"msg={_text_value(msg)}")
    for key in sorted(fields):
        name = key if key.isprintable() else go_quote(key)  # never break the line
        parts.append(f"{name}={_text_value(fields[key])}")
    return " ".join(parts) + "\n"


def _render_json(level: LogLevelName, timestamp: str, msg: str, fields: Mapping[str, object]) -> str:
    """One logrus ``JSONFormatter`` line: a Go map, so keys come out sorted."""
    data = {**fields, "time": timestamp, "msg": msg, "level": level.value}
    return _json_value(data) + "\n"


_RENDERERS: dict[str, Callable[[LogLevelName, str, str, Mapping[str, object]], str]] = {
    TEXT_FORMAT: _render_text,
    JSON_FORMAT: _render_json,
}


# --------------------------------------------------------------------------
# Observer


@implementer(ILogObserver)
class LogObserver:
    """Writes events at or above a run-time adjustable level to *stream*, one line each.

    Safe to call from any thread: each line is a single ``write`` under a
    lock.  Give it the real stderr/stdout captured before twistd redirects
    standard I/O into the log, or output would loop back into itself.
    """

    def __init__(
        self,
        stream: TextIO,
        fmt: str = TEXT_FORMAT,
        level: str = LogLevelName.INFO,
        *,
        tz: tzinfo | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        try:
            self._render = _RENDERERS[fmt]
        except KeyError:
            raise ValueError(f"unknown log format: {fmt}")
        self.format = fmt
        self._level = parse_level(level)
        self._stream = stream
        self._tz = tz
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def level(self) -> LogLevelName:
        """The current threshold."""
        return self._level

    def set_level(self, name: str) -> LogLevelName:
        """Change the threshold (SIGHUP reload); a bad name raises and keeps the old one."""
        self._level = parse_level(name)
        return self._level

    def enabled(self, level: str) -> bool:
        """Whether events at *level* would be written now, to skip costly work."""
        return parse_level(level).severity >= self._level.severity

    def __call__(self, event: LogEvent) -> None:
        level = _event_level(event)
        if level.severity < self._level.severity:
            return
        timestamp = format_time(_time_ns(event, self._clock), self._tz)
        try:
            msg, fields = _record(event)
            line = self._render(level, timestamp, msg, fields)
        except Exception as e:  # an observer that raises gets unhooked by Twisted
            line = self._render(
                level, timestamp, "unable to format log event", {"error": f"{type(e).__name__}: {e}"}
            )
        with self._lock:
            self._stream.write(line)
            flush = getattr(self._stream, "flush", None)
            if flush is not None:
                flush()


def make_observer(stream: TextIO, fmt: str, level: str) -> LogObserver:
    """The observer for ``[debug] format``/``level``; errors read like containerd's."""
    return LogObserver(stream, fmt, level)


# --------------------------------------------------------------------------
# Stack dumps


def _frames(frame: FrameType | None) -> Iterable[FrameType]:
    """Innermost-first walk, the order of a goroutine dump."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def dump_stacks() -> str:
    """Every thread's stack, laid out like Go's goroutine dump, for SIGUSR1.

    The calling thread comes first (marked ``running``), then the others by
    ident; each header names the thread, its ident and native thread id.
    """
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    current = threading.get_ident()
    frames[current] = sys._getframe(1)
    blocks = []
    for ident in sorted(frames, key=lambda i: (i != current, i)):
        thread = threads.get(ident)
        attrs = [thread.name if thread is not None else "unknown"]
        if thread is not None and thread.native_id is not None:
            attrs.append(f"tid {thread.native_id}")
        if thread is not None and thread.daemon:
            attrs.append("daemon")
        if ident == current:
            attrs.append("running")
        lines = [f"thread {ident} [{', '.join(attrs)}]:"]
        for frame in _frames(frames[ident]):
            module = frame.f_globals.get("__name__", "?")
            lines.append(f"{module}.{frame.f_code.co_qualname}()")
            lines.append(f"\t{frame.f_code.co_filename}:{frame.f_lineno}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
