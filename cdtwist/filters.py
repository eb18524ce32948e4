# -*- test-case-name: tests.test_filters -*-
"""containerd's filter language (``filters/``), so List calls select the same objects.

A filter is a comma separated list of selectors, ``<fieldpath>[<op><value>]``,
all of which must match; :func:`parse_all` ORs several such filters.  Field
paths are dot separated and may quote components (``labels."a.b"``); the
operators are ``==``, ``!=`` and ``~=`` (a Go RE2 regular expression whose
value may also be quoted as ``/re/`` or ``|re|``).

Go works on bytes, so the scanner does too: error positions are byte offsets
and error messages slice the input exactly as containerd does.  ``~=``
patterns are parsed with a port of Go's ``regexp/syntax`` rules (same
accepted language, same rejections) and then translated to an equivalent
Python :mod:`re` pattern.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from twisted.logger import Logger

from cdtwist.errors import InvalidArgument

_log = Logger()

__all__ = [
    "Adaptor",
    "AdaptorFunc",
    "AllOf",
    "Always",
    "AnyOf",
    "FieldsAdaptor",
    "Filter",
    "FilterFunc",
    "Operator",
    "ParseError",
    "RegexpError",
    "Selector",
    "adapt_labels",
    "compile_regexp",
    "parse",
    "parse_all",
    "quote",
]


# ---------------------------------------------------------------------------
# Adaptors and filters (adaptor.go, filter.go)


class Adaptor(Protocol):
    """Maps field paths of one object to values; filters never see the object itself."""

    def field(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        """Return ``(value, present)`` for ``fieldpath``."""
        ...


class AdaptorFunc:
    """Lets a plain function serve as an :class:`Adaptor` (Go's ``AdapterFunc``)."""

    def __init__(self, fn: Callable[[Sequence[str]], tuple[str, bool]]) -> None:
        self._fn = fn

    def field(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        return self._fn(fieldpath)


def adapt_labels(labels: Mapping[str, str] | None, fieldpath: Sequence[str], start: int = 1) -> tuple[str, bool]:
    """Look a label up the way containerd's ``checkMap`` does.

    Label keys contain dots, so everything after the map's own name is
    joined back together: ``labels.a.b`` and ``labels."a.b"`` are the same key.
    """
    if not labels:
        return "", False
    value = labels.get(".".join(fieldpath[start:]))
    if value is None:
        return "", False
    return value, True


FieldValue = str | Mapping[str, str] | Adaptor


class FieldsAdaptor:
    """A generic adaptor covering the shape shared by containerd's object adaptors.

    * a ``str`` value is a plain field (``name``, ``id``, ``image``...): present
      when non-empty (unless named in ``always_present``, as for snapshot
      ``name`` and content ``ref``), and extra path components are ignored,
      exactly as containerd's ``switch fieldpath[0]`` adaptors do;
    * a mapping is a label map, ``labels.<key>`` or ``annotations.<key>`` (:func:`adapt_labels`);
    * an :class:`Adaptor` is a nested message (``runtime.name``,
      ``target.digest``) and receives the rest of the path.
    """

    def __init__(self, fields: Mapping[str, FieldValue], always_present: Iterable[str] = ()) -> None:
        self._fields = fields
        self._always_present = frozenset(always_present)

    def field(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        name = fieldpath[0]
        value = self._fields.get(name)
        if value is None:
            return "", False
        if isinstance(value, str):
            return value, bool(value) or name in self._always_present
        if isinstance(value, Mapping):
            return adapt_labels(value, fieldpath)
        return value.field(fieldpath[1:])


class Filter(Protocol):
    """Anything that can decide whether an adapted object matches."""

    def match(self, adaptor: Adaptor) -> bool:
        """Whether the object behind ``adaptor`` is selected."""
        ...


class FilterFunc:
    """Lets a plain function serve as a :class:`Filter`."""

    def __init__(self, fn: Callable[[Adaptor], bool]) -> None:
        self._fn = fn

    def match(self, adaptor: Adaptor) -> bool:
        return self._fn(adaptor)


class _AlwaysFilter:
    """Empty filters select everything, as in containerd."""

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "Always"


Always: Filter = _AlwaysFilter()


@dataclass(frozen=True)
class AnyOf:
    """OR of filters (Go's ``filters.Any``): what :func:`parse_all` builds."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class AllOf:
    """AND of filters (Go's ``filters.All``): one comma separated expression."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


class Operator(IntEnum):
    """Selector operators, numbered as in Go."""

    PRESENT = 0
    EQUAL = 1
    NOT_EQUAL = 2
    MATCHES = 3

    def __str__(self) -> str:
        return operator_string(self)


_OPERATOR_STRINGS = {0: "?", 1: "==", 2: "!=", 3: "~="}


def operator_string(op: int) -> str:
    """Go's ``operator.String``, which also accepts out-of-range values."""
    return _OPERATOR_STRINGS.get(op, "unknown")


@dataclass(frozen=True)
class Selector:
    """One ``<fieldpath>[<op><value>]`` term."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor.field(self.fieldpath)
        op = self.operator
        if op == Operator.PRESENT:
            return present
        if op == Operator.EQUAL:
            return present and value == self.value
        if op == Operator.NOT_EQUAL:
            # Go ignores presence here: a missing field is "" and so differs.
            return value != self.value
        if op == Operator.MATCHES:
            pattern = _cached_regexp(self.value)
            if isinstance(pattern, RegexpError):
                # Go logs and treats the selector as false on every call.
                _log.error("error compiling regexp {pattern!r}: {error}", pattern=self.value, error=pattern)
                return False
            return pattern.search(_go_subject(value)) is not None
        return False


# ---------------------------------------------------------------------------
# Parsing (parser.go)


class ParseError(ValueError):
    """A syntax error from :func:`parse`, worded exactly like Go's.

    Go's ``Parse`` does not classify its error; only ``ParseAll`` (what every
    containerd service calls) wraps it as invalid argument, so only
    :func:`parse_all` raises :class:`~cdtwist.errors.InvalidArgument`.
    """


def parse(expr: str) -> Filter:
    """Parse one filter expression (Go's ``filters.Parse``)."""
    if expr == "":
        return Always
    return _Parser(_to_bytes(expr)).parse()


def parse_all(*exprs: str) -> Filter:
    """OR of each expression, matching everything when none are given (``ParseAll``).

    :raises InvalidArgument: ``str()`` is Go's ``"filters: parse error: ...: invalid argument"``.
    """
    if not exprs:
        return Always
    filters: list[Filter] = []
    for expr in exprs:
        try:
            filters.append(parse(expr))
        except ParseError as e:
            raise InvalidArgument(str(e)) from e
    return AnyOf(tuple(filters))


def _to_bytes(text: str) -> bytes:
    """Back to the bytes Go would see; surrogate escapes stand for invalid UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _go_string(data: bytes) -> str:
    """Decode bytes that may hold invalid UTF-8 the way gRPC-Go sends them (U+FFFD per bad byte)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    i = 0
    while i < len(data):
        r, w = _decode_rune(data, i)
        out.append(chr(r))
        i += w
    return "".join(out)


class _Parser:
    """Recursive descent over the token stream, one method per grammar rule as in Go."""

    def __init__(self, data: bytes) -> None:
        self.input = data
        self.scanner = _Scanner(data)

    def parse(self) -> Filter:
        return self.selectors()

    def selectors(self) -> Filter:
        selectors: list[Filter] = [self.selector()]
        while True:
            tok = self.scanner.peek()
            if tok == _COMMA:
                pos, tok, _ = self.scanner.scan()
                if tok != TOKEN_SEPARATOR:
                    raise self.error(pos, "expected a separator")
                selectors.append(self.selector())
            elif tok == TOKEN_EOF:
                return AllOf(tuple(selectors))
            else:
                raise self.error(self.scanner.ppos, "unexpected input: " + _rune_string(tok))

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.scanner.peek() in (_COMMA, TOKEN_SEPARATOR, TOKEN_EOF):
            return Selector(fieldpath, Operator.PRESENT)
        op = self.operator()
        return Selector(fieldpath, op, self.value(op == Operator.MATCHES))

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.scanner.peek() == _DOT:
            pos, tok, _ = self.scanner.scan()
            if tok != TOKEN_SEPARATOR:
                raise self.error(pos, "expected a field separator (`.`)")
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == TOKEN_FIELD:
            return text.decode("ascii")
        if tok == TOKEN_QUOTED:
            return self.unquote(pos, text, False)
        if tok == TOKEN_ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected field or quoted")

    def operator(self) -> Operator:
        pos, tok, text = self.scanner.scan()
        if tok == TOKEN_OPERATOR:
            op = _OPERATORS.get(text)
            if op is None:
                # Operator tokens are made of "=!~" only, so %q is plain quoting.
                raise self.error(pos, f'unsupported operator "{text.decode("ascii")}"')
            return op
        if tok == TOKEN_ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok in (TOKEN_VALUE, TOKEN_FIELD):
            return text.decode("utf-8", "surrogateescape")
        if tok == TOKEN_QUOTED:
            return self.unquote(pos, text, allow_alt_quotes)
        if tok == TOKEN_ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected value or quoted")

    def unquote(self, pos: int, text: bytes, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in b"'\"":
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(text).decode("utf-8", "surrogateescape")
        except _QuoteSyntaxError as e:
            raise self.error(pos, f"unquoting failed: {e}")

    def error(self, pos: int, msg: str) -> ParseError:
        data = self.input
        if pos < len(data):
            where = b"[%s >|%s|< %s]" % (data[:pos], data[pos : pos + 1], data[pos + 1 :])
        else:
            where = b"[%s]" % data
        return ParseError(f"filters: parse error: {_go_string(where)}: {msg}")


_OPERATORS = {b"==": Operator.EQUAL, b"!=": Operator.NOT_EQUAL, b"~=": Operator.MATCHES}


def _rune_string(r: int) -> str:
    """Go's ``string(rune)``: invalid runes (the negative tokens) become U+FFFD."""
    if r < 0 or r > 0x10FFFF or 0xD800 <= r <= 0xDFFF:
        return "\ufffd"
    return chr(r)


# ---------------------------------------------------------------------------
# Scanning (scanner.go)

TOKEN_EOF = -1
TOKEN_QUOTED = -2
TOKEN_VALUE = -3
TOKEN_FIELD = -4
TOKEN_SEPARATOR = -5
TOKEN_OPERATOR = -6
TOKEN_ILLEGAL = -7

TOKEN_NAMES = {
    TOKEN_EOF: "EOF",
    TOKEN_QUOTED: "Quoted",
    TOKEN_VALUE: "Value",
    TOKEN_FIELD: "Field",
    TOKEN_SEPARATOR: "Separator",
    TOKEN_OPERATOR: "Operator",
    TOKEN_ILLEGAL: "Illegal",
}

_RUNE_ERROR = 0xFFFD
_MAX_RUNE = 0x10FFFF
_COMMA = ord(",")
_DOT = ord(".")
_BACKSLASH = ord("\\")
_NEWLINE = ord("\n")


def _decode_rune(data: bytes, i: int) -> tuple[int, int]:
    """Go's ``utf8.DecodeRuneInString``: ``(U+FFFD, 1)`` for each invalid byte, ``(U+FFFD, 0)`` at the end."""
    if i >= len(data):
        return _RUNE_ERROR, 0
    c = data[i]
    if c < 0x80:
        return c, 1
    if 0xC2 <= c <= 0xDF:
        n = 2
    elif 0xE0 <= c <= 0xEF:
        n = 3
    elif 0xF0 <= c <= 0xF4:
        n = 4
    else:
        return _RUNE_ERROR, 1
    try:
        # The strict codec rejects exactly what Go does: overlongs, surrogates, > U+10FFFF.
        return ord(data[i : i + n].decode("utf-8")), n
    except (UnicodeDecodeError, TypeError):
        return _RUNE_ERROR, 1


class _Scanner:
    """Go's filter scanner, over UTF-8 bytes so positions are byte offsets."""

    def __init__(self, data: bytes) -> None:
        self.input = data
        self.pos = 0
        self.ppos = 0  # bounds the current rune
        self.value = False
        self.err = ""

    def next(self) -> int:
        if self.pos >= len(self.input):
            return TOKEN_EOF
        self.pos = self.ppos
        r, w = _decode_rune(self.input, self.ppos)
        self.ppos += w
        if r == _RUNE_ERROR:
            # Go rejects a literal U+FFFD too: it cannot tell it from a decoding error.
            if w > 0:
                self.error("rune error")
                return TOKEN_ILLEGAL
            return TOKEN_EOF
        if r == 0:
            self.error("unexpected null")
            return TOKEN_ILLEGAL
        return r

    def peek(self) -> int:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, int, bytes]:
        """Return ``(position, token, text)``; plain runes come back as their own token."""
        ch = self.next()
        pos = self.pos
        while ch >= 0:
            if _is_quote_rune(ch):
                ok = self.scan_quoted(ch)
                return pos, TOKEN_QUOTED if ok else TOKEN_ILLEGAL, self.input[pos : self.ppos]
            if ch in _SEPARATOR_RUNES:
                self.value = False
                return pos, TOKEN_SEPARATOR, self.input[pos : self.ppos]
            if ch in _OPERATOR_RUNES:
                self.scan_operator()
                self.value = True
                return pos, TOKEN_OPERATOR, self.input[pos : self.ppos]
            if _is_space(ch):
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                # The first rune is taken unchecked, as in Go.
                self.scan_value()
                self.value = False
                return pos, TOKEN_VALUE, self.input[pos : self.ppos]
            if _is_field_rune(ch):
                self.scan_field()
                return pos, TOKEN_FIELD, self.input[pos : self.ppos]
            break
        return self.pos, ch, b""

    def scan_field(self) -> None:
        while _is_field_rune(self.peek()):
            self.next()

    def scan_operator(self) -> None:
        while self.peek() in _OPERATOR_RUNES:
            self.next()

    def scan_value(self) -> None:
        while _is_value_rune(self.peek()):
            self.next()

    def scan_quoted(self, quote: int) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch == _NEWLINE or ch < 0:
                self.error("quoted literal not terminated")
                return False
            if ch == _BACKSLASH:
                ch, legal = self.scan_escape(quote)
                if not legal:
                    illegal = True
            else:
                ch = self.next()
        return not illegal

    def scan_escape(self, quote: int) -> tuple[int, bool]:
        ch = self.next()
        if ch in _SIMPLE_ESCAPES or ch == quote:
            return self.next(), True
        if 0x30 <= ch <= 0x37:
            return self.scan_digits(ch, 8, 3)
        digits = _HEX_ESCAPE_DIGITS.get(ch)
        if digits is not None:
            return self.scan_digits(self.next(), 16, digits)
        self.error("illegal escape sequence")
        return ch, False

    def scan_digits(self, ch: int, base: int, n: int) -> tuple[int, bool]:
        while n > 0 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True

    def error(self, msg: str) -> None:
        if not self.err:
            self.err = msg


_SEPARATOR_RUNES = frozenset(b",.")
_OPERATOR_RUNES = frozenset(b"=!~")
_SIMPLE_ESCAPES = frozenset(b"abfnrtv\\")
_HEX_ESCAPE_DIGITS = {ord("x"): 2, ord("u"): 4, ord("U"): 8}
# Go's unicode.IsSpace: Latin-1 spaces plus the White_Space property.
_SPACES = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)


def _digit_val(ch: int) -> int:
    if 0x30 <= ch <= 0x39:
        return ch - 0x30
    if 0x61 <= ch <= 0x66:
        return ch - 0x61 + 10
    if 0x41 <= ch <= 0x46:
        return ch - 0x41 + 10
    return 16


def _is_quote_rune(r: int) -> bool:
    # Backquotes are not quote runes: quote.go can unquote them but the scanner never yields them.
    return r in (0x2F, 0x7C, 0x22)  # / | "


def _is_field_rune(r: int) -> bool:
    return r == 0x5F or 0x41 <= r <= 0x5A or 0x61 <= r <= 0x7A or 0x30 <= r <= 0x39


def _is_space(r: int) -> bool:
    return r in _SPACES


def _is_value_rune(r: int) -> bool:
    # Letter, digit, number, graphic or punctuation, i.e. categories L, M, N, P and S.
    return r >= 0 and r != _COMMA and r not in _SPACES and _go_category(r)[0] in "LMNPS"


# Code points assigned by Unicode 14.0, which Python 3.11 knows but Go 1.19's
# Unicode 13.0 tables (what containerd 1.6.20 is built with) treat as unassigned.
_UNICODE14_NEW = (
    (0x61D, 0x61D), (0x870, 0x88E), (0x890, 0x891), (0x898, 0x89F), (0x8B5, 0x8B5), (0x8C8, 0x8D2),
    (0xC3C, 0xC3C), (0xC5D, 0xC5D), (0xCDD, 0xCDD), (0x170D, 0x170D), (0x1715, 0x1715), (0x171F, 0x171F),
    (0x180F, 0x180F), (0x1AC1, 0x1ACE), (0x1B4C, 0x1B4C), (0x1B7D, 0x1B7E), (0x1DFA, 0x1DFA),
    (0x20C0, 0x20C0), (0x2C2F, 0x2C2F), (0x2C5F, 0x2C5F), (0x2E53, 0x2E5D), (0x9FFD, 0x9FFF),
    (0xA7C0, 0xA7C1), (0xA7D0, 0xA7D1), (0xA7D3, 0xA7D3), (0xA7D5, 0xA7D9), (0xA7F2, 0xA7F4),
    (0xFBC2, 0xFBC2), (0xFD40, 0xFD4F), (0xFDCF, 0xFDCF), (0xFDFE, 0xFDFF), (0x10570, 0x1057A),
    (0x1057C, 0x1058A), (0x1058C, 0x10592), (0x10594, 0x10595), (0x10597, 0x105A1), (0x105A3, 0x105B1),
    (0x105B3, 0x105B9), (0x105BB, 0x105BC), (0x10780, 0x10785), (0x10787, 0x107B0), (0x107B2, 0x107BA),
    (0x10F70, 0x10F89), (0x11070, 0x11075), (0x110C2, 0x110C2), (0x116B9, 0x116B9), (0x11740, 0x11746),
    (0x11AB0, 0x11ABF), (0x12F90, 0x12FF2), (0x16A70, 0x16ABE), (0x16AC0, 0x16AC9), (0x1AFF0, 0x1AFF3),
    (0x1AFF5, 0x1AFFB), (0x1AFFD, 0x1AFFE), (0x1B11F, 0x1B122), (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46),
    (0x1CF50, 0x1CFC3), (0x1D1E9, 0x1D1EA), (0x1DF00, 0x1DF1E), (0x1E290, 0x1E2AE), (0x1E7E0, 0x1E7E6),
    (0x1E7E8, 0x1E7EB), (0x1E7ED, 0x1E7EE), (0x1E7F0, 0x1E7FE), (0x1F6DD, 0x1F6DF), (0x1F7F0, 0x1F7F0),
    (0x1F979, 0x1F979), (0x1F9CC, 0x1F9CC), (0x1FA7B, 0x1FA7C), (0x1FAA9, 0x1FAAC), (0x1FAB7, 0x1FABA),
    (0x1FAC3, 0x1FAC5), (0x1FAD7, 0x1FAD9), (0x1FAE0, 0x1FAE7), (0x1FAF0, 0x1FAF6), (0x2A6DE, 0x2A6DF),
    (0x2B735, 0x2B738),
)  # fmt: skip
_UNICODE14_STARTS = [lo for lo, _ in _UNICODE14_NEW]
_CATEGORY_CHANGES = {0x1734: "Mn"}  # Unicode 14 made HANUNOO SIGN PAMUDPOD a spacing mark


def _is_unicode14_new(cp: int) -> bool:
    i = bisect.bisect_right(_UNICODE14_STARTS, cp) - 1
    return i >= 0 and cp <= _UNICODE14_NEW[i][1]


def _go_category(cp: int) -> str:
    """General category as Go 1.19's Unicode 13 tables see it."""
    if _is_unicode14_new(cp):
        return "Cn"
    return _CATEGORY_CHANGES.get(cp) or unicodedata.category(chr(cp))


# ---------------------------------------------------------------------------
# Quoting (quote.go)


class _QuoteSyntaxError(ValueError):
    def __init__(self) -> None:
        super().__init__("quote syntax error")


def _unquote(s: bytes) -> bytes:
    """containerd's ``unquote``: ``strconv.Unquote`` that also accepts ``/`` and ``|`` quotes."""
    n = len(s)
    if n < 2:
        raise _QuoteSyntaxError()
    quote = s[0]
    if quote != s[-1]:
        raise _QuoteSyntaxError()
    s = s[1:-1]
    if quote == 0x60:  # backquote: raw, minus carriage returns
        if b"`" in s:
            raise _QuoteSyntaxError()
        return s.replace(b"\r", b"")
    if quote not in b"\"'|/":
        raise _QuoteSyntaxError()
    if b"\n" in s:
        raise _QuoteSyntaxError()
    if b"\\" not in s and quote not in s:
        if quote != 0x27:
            return s
        r, size = _decode_rune(s, 0)
        if size == len(s) and (r != _RUNE_ERROR or size != 1):
            return s
    buf = bytearray()
    i = 0
    while i < len(s):
        c, multibyte, i = _unquote_char(s, i, quote)
        if c < 0x80 or not multibyte:
            buf.append(c & 0xFF)  # Go's byte(c), which also wraps negative runes
        else:
            buf += _encode_rune(c)
        if quote == 0x27 and i != len(s):
            raise _QuoteSyntaxError()
    return bytes(buf)


def _unquote_char(s: bytes, i: int, quote: int) -> tuple[int, bool, int]:
    """Decode one (possibly escaped) character: ``(value, multibyte, next index)``."""
    c = s[i]
    if c == quote:
        raise _QuoteSyntaxError()
    if c >= 0x80:
        r, size = _decode_rune(s, i)
        return r, True, i + size
    if c != _BACKSLASH:
        return c, False, i + 1
    if len(s) - i <= 1:
        raise _QuoteSyntaxError()
    c = s[i + 1]
    i += 2
    simple = _C_ESCAPES.get(c)
    if simple is not None:
        return simple, False, i
    if c in _HEX_ESCAPE_DIGITS:
        n = _HEX_ESCAPE_DIGITS[c]
        if len(s) - i < n:
            raise _QuoteSyntaxError()
        v = 0
        for j in range(n):
            x = _digit_val(s[i + j])
            if x >= 16:
                raise _QuoteSyntaxError()
            v = v << 4 | x
        i += n
        if c == 0x78:  # \x: a single byte, possibly not UTF-8
            return v, False, i
        if v >= 1 << 31:
            v -= 1 << 32  # Go's rune is an int32: \U80000000 and up wrap negative
        if v > _MAX_RUNE:
            raise _QuoteSyntaxError()
        return v, True, i
    if 0x30 <= c <= 0x37:
        v = c - 0x30
        if len(s) - i < 2:
            raise _QuoteSyntaxError()
        for j in range(2):
            x = s[i + j] - 0x30
            if x < 0 or x > 7:
                raise _QuoteSyntaxError()
            v = (v << 3) | x
        i += 2
        if v > 255:
            raise _QuoteSyntaxError()
        return v, False, i
    if c == _BACKSLASH:
        return c, False, i
    if c in b"'\"|/" and c == quote:
        return c, False, i
    raise _QuoteSyntaxError()


_C_ESCAPES = {ord("a"): 7, ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}


def _encode_rune(r: int) -> bytes:
    """Go's ``utf8.EncodeRune``: invalid runes encode as U+FFFD."""
    if r < 0 or r > _MAX_RUNE or 0xD800 <= r <= 0xDFFF:
        r = _RUNE_ERROR
    return chr(r).encode("utf-8")


_QUOTE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def quote(value: str) -> str:
    """Double-quote ``value`` so the filter parser reads it back unchanged.

    Useful for label keys and values with dots, spaces or commas.  Surrogate
    escapes (invalid UTF-8 bytes) become ``\\xNN``; U+FFFD is escaped because
    the scanner rejects it raw.
    """
    out = ['"']
    for ch in value:
        cp = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif 0xDC80 <= cp <= 0xDCFF:
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif 0xD800 <= cp <= 0xDFFF:
            raise ValueError(f"cannot quote lone surrogate U+{cp:04X}")
        elif cp == _RUNE_ERROR:
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# ---------------------------------------------------------------------------
# Go regular expressions (regexp/syntax, as regexp.Compile uses it)


class RegexpError(ValueError):
    """A pattern Go's ``regexp.Compile`` rejects; worded like Go's error."""

    def __init__(self, code: str, expr: str) -> None:
        super().__init__(f"error parsing regexp: {code}: `{expr}`")
        self.code = code
        self.expr = expr


_ERR_INTERNAL = "regexp/syntax: internal error"
_ERR_INVALID_CHAR_RANGE = "invalid character class range"
_ERR_INVALID_ESCAPE = "invalid escape sequence"
_ERR_INVALID_NAMED_CAPTURE = "invalid named capture"
_ERR_INVALID_PERL_OP = "invalid or unsupported Perl syntax"
_ERR_INVALID_REPEAT_OP = "invalid nested repetition operator"
_ERR_INVALID_REPEAT_SIZE = "invalid repeat count"
_ERR_INVALID_UTF8 = "invalid UTF-8"
_ERR_MISSING_BRACKET = "missing closing ]"
_ERR_MISSING_PAREN = "missing closing )"
_ERR_MISSING_REPEAT_ARGUMENT = "missing argument to repetition operator"
_ERR_TRAILING_BACKSLASH = "trailing backslash at end of expression"
_ERR_UNEXPECTED_PAREN = "unexpected )"
_ERR_NESTING_DEPTH = "expression nests too deeply"

# Parse flags that change meaning (ClassNL, PerlX and UnicodeGroups are always on).
_FOLD_CASE = 1
_ONE_LINE = 2
_DOT_NL = 4
_NON_GREEDY = 8
_ALL_FLAGS = 15

# Node ops; the pseudo ops only live on the parse stack.
(
    _OP_NO_MATCH,
    _OP_EMPTY,
    _OP_LITERAL,
    _OP_CLASS,
    _OP_ANY_NOT_NL,
    _OP_ANY,
    _OP_BEGIN_LINE,
    _OP_END_LINE,
    _OP_BEGIN_TEXT,
    _OP_END_TEXT,
    _OP_WORD_BOUNDARY,
    _OP_NO_WORD_BOUNDARY,
    _OP_CAPTURE,
    _OP_STAR,
    _OP_PLUS,
    _OP_QUEST,
    _OP_REPEAT,
    _OP_CONCAT,
    _OP_ALTERNATE,
) = range(19)
_OP_PSEUDO = 128
_OP_LEFT_PAREN = 128
_OP_VERTICAL_BAR = 129

_MAX_REPEAT = 1000
_MAX_HEIGHT = 1000
_MAX_SIZE = (128 << 20) // 40  # Go's limit on compiled instructions

Ranges = list[tuple[int, int]]


class _Node:
    """A regexp syntax tree node, shaped like Go's ``syntax.Regexp``."""

    __slots__ = ("op", "flags", "runes", "ranges", "subs", "lo", "hi", "cap", "height", "size")

    def __init__(
        self,
        op: int,
        flags: int = 0,
        runes: list[int] | None = None,
        ranges: Ranges | None = None,
        subs: list[_Node] | None = None,
        lo: int = 0,
        hi: int = 0,
        cap: bool = False,
    ) -> None:
        self.op = op
        self.flags = flags
        self.runes = runes or []
        self.ranges = ranges or []
        self.subs = subs or []
        self.lo = lo  # Go's Min and Max; hi is -1 for no upper bound
        self.hi = hi
        self.cap = cap
        # Kept up to date as the tree grows so that limits never need a recursive walk.
        self.height = 1 + max((sub.height for sub in self.subs), default=0)
        self.size = _size(self)


# Perl and POSIX classes from perl_groups.go: (sign, ranges).
_PERL_GROUPS: dict[str, tuple[int, Ranges]] = {}
for _name, _ranges in {
    "d": [(0x30, 0x39)],
    "s": [(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
}.items():
    _PERL_GROUPS["\\" + _name] = (1, _ranges)
    _PERL_GROUPS["\\" + _name.upper()] = (-1, _ranges)
_POSIX_GROUPS: dict[str, tuple[int, Ranges]] = {}
for _name, _ranges in {
    "alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "ascii": [(0x00, 0x7F)],
    "blank": [(0x09, 0x09), (0x20, 0x20)],
    "cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "digit": [(0x30, 0x39)],
    "graph": [(0x21, 0x7E)],
    "lower": [(0x61, 0x7A)],
    "print": [(0x20, 0x7E)],
    "punct": [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
    "space": [(0x09, 0x0D), (0x20, 0x20)],
    "upper": [(0x41, 0x5A)],
    "word": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "xdigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
}.items():
    _POSIX_GROUPS[f"[:{_name}:]"] = (1, _ranges)
    _POSIX_GROUPS[f"[:^{_name}:]"] = (-1, _ranges)

_GO_CATEGORIES = frozenset(
    "C Cc Cf Co Cs L Ll Lm Lo Lt Lu M Mc Me Mn N Nd Nl No P Pc Pd Pe Pf Pi Po Ps S Sc Sk Sm So Z Zl Zp Zs".split()
)
_MIN_FOLD = 0x0041
_MAX_FOLD = 0x1E943


@functools.cache
def _category_tables() -> dict[str, Ranges]:
    """Ranges of each Go category name, built once from :mod:`unicodedata` on first ``\\p`` use."""
    categories = [unicodedata.category(chr(cp)) for cp in range(_MAX_RUNE + 1)]
    for lo, hi in _UNICODE14_NEW:
        categories[lo : hi + 1] = ["Cn"] * (hi - lo + 1)
    for cp, category in _CATEGORY_CHANGES.items():
        categories[cp] = category
    tables: dict[str, Ranges] = {}
    start = 0
    for category, run in itertools.groupby(categories):
        end = start + sum(1 for _ in run)
        if category != "Cn":
            tables.setdefault(category, []).append((start, end - 1))
            tables.setdefault(category[0], []).append((start, end - 1))
        start = end
    return {name: _clean(ranges) for name, ranges in tables.items()}


@functools.cache
def _fold_orbits() -> tuple[list[int], dict[int, tuple[int, ...]]]:
    """Go's simple case folding orbits (``unicode.SimpleFold``) for Unicode 13.

    Single-character ``lower()`` and ``casefold()`` mappings connect exactly
    the code points Go's orbit table does (checked against Go 1.19).
    """
    adjacent: dict[int, set[int]] = {}
    for cp in range(_MIN_FOLD, _MAX_FOLD + 1):
        if 0xD800 <= cp <= 0xDFFF or _is_unicode14_new(cp):
            continue
        ch = chr(cp)
        for mapped in (ch.lower(), ch.casefold()):
            if len(mapped) == 1 and mapped != ch and not _is_unicode14_new(ord(mapped)):
                adjacent.setdefault(cp, set()).add(ord(mapped))
                adjacent.setdefault(ord(mapped), set()).add(cp)
    orbits: dict[int, tuple[int, ...]] = {}
    for cp in adjacent:
        if cp in orbits:
            continue
        members = {cp}
        todo = [cp]
        while todo:
            for other in adjacent[todo.pop()]:
                if other not in members:
                    members.add(other)
                    todo.append(other)
        orbit = tuple(sorted(members))
        for member in members:
            orbits[member] = orbit
    return sorted(orbits), orbits


def _clean(ranges: Ranges) -> Ranges:
    """Sort and merge overlapping or abutting ranges."""
    out: Ranges = []
    for lo, hi in sorted(ranges, key=lambda r: (r[0], -r[1])):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _negate(ranges: Ranges) -> Ranges:
    """Complement of a clean class over all runes."""
    out: Ranges = []
    next_lo = 0
    for lo, hi in ranges:
        if next_lo <= lo - 1:
            out.append((next_lo, lo - 1))
        next_lo = hi + 1
    if next_lo <= _MAX_RUNE:
        out.append((next_lo, _MAX_RUNE))
    return out


def _fold_ranges(ranges: Ranges) -> Ranges:
    """Add every case-fold equivalent of the runes in ``ranges`` (Go's ``appendFoldedRange``)."""
    keys, orbits = _fold_orbits()
    out = list(ranges)
    for lo, hi in ranges:
        if hi < _MIN_FOLD or lo > _MAX_FOLD or (lo <= _MIN_FOLD and hi >= _MAX_FOLD):
            continue
        for cp in keys[bisect.bisect_left(keys, lo) : bisect.bisect_right(keys, hi)]:
            out.extend((f, f) for f in orbits[cp])
    return out


class _RegexpParser:
    """Go's ``regexp/syntax`` parser (Perl flags), stack machine and all.

    Validity depends on the stack: ``a(?i)*`` repeats ``a``, ``(?i)*`` has
    nothing to repeat and ``a**`` is an error while ``a*(?i)*`` is not, so
    Go's algorithm is followed rather than a textbook grammar.
    """

    def __init__(self, pattern: str) -> None:
        self.s = pattern
        self.flags = _ONE_LINE
        self.stack: list[_Node] = []

    def parse(self) -> _Node:
        s = self.s
        n = len(s)
        i = 0
        last_repeat: int | None = None
        while i < n:
            repeat: int | None = None
            c = s[i]
            if c == "(":
                if i + 1 < n and s[i + 1] == "?":
                    i = self.parse_perl_flags(i)
                else:
                    self.push(_Node(_OP_LEFT_PAREN, self.flags, cap=True))
                    i += 1
            elif c == "|":
                self.parse_vertical_bar()
                i += 1
            elif c == ")":
                self.parse_right_paren()
                i += 1
            elif c == "^":
                self.op(_OP_BEGIN_TEXT if self.flags & _ONE_LINE else _OP_BEGIN_LINE)
                i += 1
            elif c == "$":
                self.op(_OP_END_TEXT if self.flags & _ONE_LINE else _OP_END_LINE)
                i += 1
            elif c == ".":
                self.op(_OP_ANY if self.flags & _DOT_NL else _OP_ANY_NOT_NL)
                i += 1
            elif c == "[":
                i = self.parse_class(i)
            elif c in "*+?":
                op = {"*": _OP_STAR, "+": _OP_PLUS, "?": _OP_QUEST}[c]
                repeat = i
                i = self.repeat(op, 0, 0, i, i + 1, last_repeat)
            elif c == "{":
                parsed = self.parse_repeat(i)
                if parsed is None:
                    self.literal(ord("{"))  # not a repeat: a literal brace
                    i += 1
                else:
                    lo, hi, after = parsed
                    if lo < 0 or lo > _MAX_REPEAT or hi > _MAX_REPEAT or (hi >= 0 and lo > hi):
                        raise RegexpError(_ERR_INVALID_REPEAT_SIZE, s[i:after])
                    repeat = i
                    i = self.repeat(_OP_REPEAT, lo, hi, i, after, last_repeat)
            elif c == "\\":
                i = self.parse_backslash(i)
            else:
                self.literal(ord(c))
                i += 1
            last_repeat = repeat

        self.concat()
        if self.swap_vertical_bar():
            self.stack.pop()
        self.alternate()
        if len(self.stack) != 1:
            raise RegexpError(_ERR_MISSING_PAREN, s)
        root = self.stack[0]
        if root.height > _MAX_HEIGHT:
            raise RegexpError(_ERR_NESTING_DEPTH, s)
        if root.size > _MAX_SIZE:
            raise RegexpError(_ERR_INTERNAL, s)
        return root

    # -- stack manipulation

    def push(self, node: _Node) -> None:
        self.stack.append(node)

    def op(self, op: int) -> None:
        self.push(_Node(op, self.flags))

    def literal(self, r: int) -> None:
        self.push(_Node(_OP_LITERAL, self.flags, runes=[r]))

    def repeat(self, op: int, lo: int, hi: int, before: int, after: int, last_repeat: int | None) -> int:
        if after < len(self.s) and self.s[after] == "?":
            after += 1  # non-greedy: irrelevant to whether there is a match
        if last_repeat is not None:
            raise RegexpError(_ERR_INVALID_REPEAT_OP, self.s[last_repeat:after])
        if not self.stack or self.stack[-1].op >= _OP_PSEUDO:
            raise RegexpError(_ERR_MISSING_REPEAT_ARGUMENT, self.s[before:after])
        node = _Node(op, self.flags, subs=[self.stack[-1]], lo=lo, hi=hi)
        self.stack[-1] = node
        if op == _OP_REPEAT and (lo >= 2 or hi >= 2) and not _repeat_is_valid(node, _MAX_REPEAT):
            raise RegexpError(_ERR_INVALID_REPEAT_SIZE, self.s[before:after])
        return after

    def split_off(self) -> list[_Node]:
        """Pop everything above the topmost ``(`` or ``|``."""
        i = len(self.stack)
        while i > 0 and self.stack[i - 1].op < _OP_PSEUDO:
            i -= 1
        subs = self.stack[i:]
        del self.stack[i:]
        return subs

    def concat(self) -> None:
        subs = self.split_off()
        self.push(_collapse(subs, _OP_CONCAT) if subs else _Node(_OP_EMPTY, self.flags))

    def alternate(self) -> None:
        subs = self.split_off()
        self.push(_collapse(subs, _OP_ALTERNATE) if subs else _Node(_OP_NO_MATCH, self.flags))

    def swap_vertical_bar(self) -> bool:
        if len(self.stack) >= 2 and self.stack[-2].op == _OP_VERTICAL_BAR:
            self.stack[-1], self.stack[-2] = self.stack[-2], self.stack[-1]
            return True
        return False

    def parse_vertical_bar(self) -> None:
        self.concat()
        if not self.swap_vertical_bar():
            self.op(_OP_VERTICAL_BAR)

    def parse_right_paren(self) -> None:
        self.concat()
        if self.swap_vertical_bar():
            self.stack.pop()
        self.alternate()
        if len(self.stack) < 2:
            raise RegexpError(_ERR_UNEXPECTED_PAREN, self.s)
        inner = self.stack.pop()
        paren = self.stack.pop()
        if paren.op != _OP_LEFT_PAREN:
            raise RegexpError(_ERR_UNEXPECTED_PAREN, self.s)
        self.flags = paren.flags
        self.push(_Node(_OP_CAPTURE, subs=[inner]) if paren.cap else inner)

    # -- lexical pieces

    def parse_perl_flags(self, i: int) -> int:
        s = self.s
        n = len(s)
        if n - i > 4 and s[i + 2] == "P" and s[i + 3] == "<":
            end = s.find(">", i)
            if end < 0:
                raise RegexpError(_ERR_INVALID_NAMED_CAPTURE, s[i:])
            name = s[i + 4 : end]
            if not name or not all(ch == "_" or (ch.isascii() and ch.isalnum()) for ch in name):
                raise RegexpError(_ERR_INVALID_NAMED_CAPTURE, s[i : end + 1])
            self.push(_Node(_OP_LEFT_PAREN, self.flags, cap=True))
            return end + 1

        j = i + 2
        flags = self.flags
        negated = False
        saw_flag = False
        while j < n:
            c = s[j]
            j += 1
            if c in _FLAG_BITS:
                flags |= _FLAG_BITS[c]
                saw_flag = True
            elif c == "m":
                flags &= ~_ONE_LINE  # multi-line is the absence of one-line
                saw_flag = True
            elif c == "-":
                if negated:
                    break
                negated = True
                # Invert so that setting a bit below clears it; inverted back at the end.
                flags ^= _ALL_FLAGS
                saw_flag = False
            elif c in ":)":
                if negated:
                    if not saw_flag:
                        break
                    flags ^= _ALL_FLAGS
                if c == ":":
                    self.push(_Node(_OP_LEFT_PAREN, self.flags))
                self.flags = flags
                return j
            else:
                break
        raise RegexpError(_ERR_INVALID_PERL_OP, s[i:j])

    def parse_repeat(self, i: int) -> tuple[int, int, int] | None:
        """``{n}``, ``{n,}`` or ``{n,m}`` at ``i``: ``(min, max, after)``, max -1 for none, min -1 if huge."""
        s = self.s
        n = len(s)
        parsed = self.parse_int(i + 1)
        if parsed is None:
            return None
        lo, j = parsed
        if j >= n:
            return None
        if s[j] != ",":
            hi = lo
        else:
            j += 1
            if j >= n:
                return None
            if s[j] == "}":
                hi = -1
            else:
                parsed = self.parse_int(j)
                if parsed is None:
                    return None
                hi, j = parsed
                if hi < 0:
                    lo = -1
        if j >= n or s[j] != "}":
            return None
        return lo, hi, j + 1

    def parse_int(self, i: int) -> tuple[int, int] | None:
        s = self.s
        n = len(s)
        if i >= n or not "0" <= s[i] <= "9":
            return None
        if s[i] == "0" and i + 1 < n and "0" <= s[i + 1] <= "9":
            return None  # no leading zeros
        j = i
        while j < n and "0" <= s[j] <= "9":
            j += 1
        value = 0
        for digit in s[i:j]:
            if value >= 100_000_000:
                value = -1
                break
            value = value * 10 + ord(digit) - 0x30
        return value, j

    def parse_backslash(self, i: int) -> int:
        s = self.s
        if i + 1 < len(s):
            c = s[i + 1]
            special = _BACKSLASH_OPS.get(c)
            if special is not None:
                self.op(special)
                return i + 2
            if c == "C":
                raise RegexpError(_ERR_INVALID_ESCAPE, s[i : i + 2])
            if c == "Q":
                end = s.find("\\E", i + 2)
                text = s[i + 2 :] if end < 0 else s[i + 2 : end]
                for ch in text:
                    self.literal(ord(ch))
                return len(s) if end < 0 else end + 2
            if c in "pP":
                ranges: Ranges = []
                i = self.parse_unicode_class(i, ranges)
                self.push(_Node(_OP_CLASS, self.flags, ranges=_clean(ranges)))
                return i
            group = _PERL_GROUPS.get(s[i : i + 2])
            if group is not None:
                ranges = []
                self.append_group(ranges, group)
                self.push(_Node(_OP_CLASS, self.flags, ranges=_clean(ranges)))
                return i + 2
        r, i = self.parse_escape(i)
        self.literal(r)
        return i

    def parse_escape(self, i: int) -> tuple[int, int]:
        s = self.s
        n = len(s)
        j = i + 1
        if j >= n:
            raise RegexpError(_ERR_TRAILING_BACKSLASH, "")
        c = s[j]
        j += 1
        if c in "1234567" and (j >= n or not "0" <= s[j] <= "7"):
            pass  # a lone \1-\7 would be a backreference: unsupported
        elif "0" <= c <= "7":
            r = ord(c) - 0x30
            for _ in range(2):
                if j >= n or not "0" <= s[j] <= "7":
                    break
                r = r * 8 + ord(s[j]) - 0x30
                j += 1
            return r, j
        elif c == "x":
            if j < n:
                return self.parse_hex_escape(i, j)
        elif c in _REGEXP_C_ESCAPES:
            return _REGEXP_C_ESCAPES[c], j
        elif ord(c) < 0x80 and not (c.isascii() and c.isalnum()):
            return ord(c), j  # escaped punctuation is itself
        raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])

    def parse_hex_escape(self, i: int, j: int) -> tuple[int, int]:
        s = self.s
        n = len(s)
        c = s[j]
        j += 1
        if c == "{":
            digits = 0
            r = 0
            while True:
                if j >= n:
                    raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])
                c = s[j]
                j += 1
                if c == "}":
                    break
                v = _unhex(c)
                if v < 0:
                    raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])
                r = r * 16 + v
                if r > _MAX_RUNE:
                    raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])
                digits += 1
            if digits == 0:
                raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])
            return r, j
        x = _unhex(c)
        y = -1
        if j < n:
            y = _unhex(s[j])
            j += 1
        if x < 0 or y < 0:
            raise RegexpError(_ERR_INVALID_ESCAPE, s[i:j])
        return x * 16 + y, j

    def parse_class(self, i: int) -> int:
        s = self.s
        n = len(s)
        j = i + 1
        negated = j < n and s[j] == "^"
        if negated:
            j += 1
        ranges: Ranges = []
        first = True  # ] is literal as the first character
        while j >= n or s[j] != "]" or first:
            first = False
            if n - j > 2 and s[j] == "[" and s[j + 1] == ":":
                after = self.parse_named_class(j, ranges)
                if after is not None:
                    j = after
                    continue
            if n - j >= 2 and s[j] == "\\" and s[j + 1] in "pP":
                j = self.parse_unicode_class(j, ranges)
                continue
            group = _PERL_GROUPS.get(s[j : j + 2])
            if group is not None:
                self.append_group(ranges, group)
                j += 2
                continue
            start = j
            lo, j = self.parse_class_char(j, i)
            hi = lo
            if n - j >= 2 and s[j] == "-" and s[j + 1] != "]":  # [a-] is a and -
                hi, j = self.parse_class_char(j + 1, i)
                if hi < lo:
                    raise RegexpError(_ERR_INVALID_CHAR_RANGE, s[start:j])
            if self.flags & _FOLD_CASE:
                ranges.extend(_fold_ranges([(lo, hi)]))
            else:
                ranges.append((lo, hi))
        ranges = _clean(ranges)
        if negated:
            ranges = _negate(ranges)
        self.push(_Node(_OP_CLASS, self.flags, ranges=ranges))
        return j + 1

    def parse_class_char(self, j: int, class_start: int) -> tuple[int, int]:
        if j >= len(self.s):
            raise RegexpError(_ERR_MISSING_BRACKET, self.s[class_start:])
        if self.s[j] == "\\":
            return self.parse_escape(j)
        return ord(self.s[j]), j + 1

    def parse_named_class(self, j: int, ranges: Ranges) -> int | None:
        # Go searches the rest of the pattern for ":]", not just this class.
        end = self.s.find(":]", j + 2)
        if end < 0:
            return None
        name = self.s[j : end + 2]
        group = _POSIX_GROUPS.get(name)
        if group is None:
            raise RegexpError(_ERR_INVALID_CHAR_RANGE, name)
        self.append_group(ranges, group)
        return end + 2

    def append_group(self, ranges: Ranges, group: tuple[int, Ranges]) -> None:
        sign, members = group
        if self.flags & _FOLD_CASE:
            members = _clean(_fold_ranges(members))
        ranges.extend(members if sign > 0 else _negate(members))

    def parse_unicode_class(self, j: int, ranges: Ranges) -> int:
        """``\\pL``, ``\\p{Name}``, ``\\P{^Name}``...; Unicode scripts are not supported."""
        s = self.s
        n = len(s)
        sign = -1 if s[j + 1] == "P" else 1
        k = j + 2
        if k < n and s[k] == "{":
            end = s.find("}", j)
            if end < 0:
                raise RegexpError(_ERR_INVALID_CHAR_RANGE, s[j:])
            seq, name, k = s[j : end + 1], s[j + 3 : end], end + 1
        else:
            k = min(k + 1, n)
            seq, name = s[j:k], s[j + 2 : k]
        if name.startswith("^"):
            sign = -sign
            name = name[1:]
        if name == "Any":
            table: Ranges = [(0, _MAX_RUNE)]
        elif name in _GO_CATEGORIES:
            table = _category_tables().get(name, [])
            if self.flags & _FOLD_CASE:
                table = _clean(_fold_ranges(table))
        else:
            raise RegexpError(_ERR_INVALID_CHAR_RANGE, seq)
        ranges.extend(table if sign > 0 else _negate(table))
        return k


_FLAG_BITS = {"i": _FOLD_CASE, "s": _DOT_NL, "U": _NON_GREEDY}
_BACKSLASH_OPS = {
    "A": _OP_BEGIN_TEXT,
    "b": _OP_WORD_BOUNDARY,
    "B": _OP_NO_WORD_BOUNDARY,
    "z": _OP_END_TEXT,
}
_REGEXP_C_ESCAPES = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def _unhex(c: str) -> int:
    if "0" <= c <= "9":
        return ord(c) - 0x30
    if "a" <= c <= "f":
        return ord(c) - 0x61 + 10
    if "A" <= c <= "F":
        return ord(c) - 0x41 + 10
    return -1


def _collapse(subs: list[_Node], op: int) -> _Node:
    """Join ``subs`` under ``op``, flattening nested nodes and literal runs as Go does."""
    if len(subs) == 1:
        return subs[0]
    flat: list[_Node] = []
    for sub in subs:
        for node in sub.subs if sub.op == op else [sub]:
            prev = flat[-1] if flat else None
            if (
                op == _OP_CONCAT
                and prev is not None
                and prev.op == node.op == _OP_LITERAL
                and prev.flags & _FOLD_CASE == node.flags & _FOLD_CASE
            ):
                flat[-1] = _Node(_OP_LITERAL, prev.flags, runes=prev.runes + node.runes)
            else:
                flat.append(node)
    return flat[0] if len(flat) == 1 else _Node(op, subs=flat)


def _repeat_is_valid(node: _Node, n: int) -> bool:
    """Whether nested counted repetitions stay within ``n`` copies (Go's ``repeatIsValid``)."""
    todo = [(node, n)]
    while todo:
        node, n = todo.pop()
        if node.op == _OP_REPEAT:
            m = node.hi
            if m == 0:
                continue
            if m < 0:
                m = node.lo
            if m > n:
                return False
            if m > 0:
                n //= m
        todo.extend((sub, n) for sub in node.subs)
    return True


def _size(node: _Node) -> int:
    """Go's estimate of compiled instructions (``calcSize``), from the children's sizes."""
    op = node.op
    if op == _OP_LITERAL:
        size = len(node.runes)
    elif op in (_OP_CAPTURE, _OP_STAR):
        size = 2 + node.subs[0].size
    elif op in (_OP_PLUS, _OP_QUEST):
        size = 1 + node.subs[0].size
    elif op == _OP_CONCAT:
        size = sum(sub.size for sub in node.subs)
    elif op == _OP_ALTERNATE:
        size = sum(sub.size for sub in node.subs) + len(node.subs) - 1
    elif op == _OP_REPEAT:
        sub = node.subs[0].size
        if node.hi == -1:
            size = 2 + sub if node.lo == 0 else 1 + node.lo * sub
        else:
            size = node.hi * sub + node.hi - node.lo
    else:
        size = 1
    return max(size, 1)


_WORD = "[0-9A-Za-z_]"
_SIMPLE_EMITS = {
    _OP_NO_MATCH: "(?!)",
    _OP_EMPTY: "(?:)",
    _OP_ANY_NOT_NL: "[^\\n]",
    _OP_ANY: "(?s:.)",
    _OP_BEGIN_LINE: "(?m:^)",
    _OP_END_LINE: "(?m:$)",
    _OP_BEGIN_TEXT: "\\A",
    _OP_END_TEXT: "\\Z",  # Python's \Z is Go's \z: the very end, not before a final newline
    _OP_WORD_BOUNDARY: "(?a:\\b)",
    # Python's \B never matches an empty string; Go's does.
    _OP_NO_WORD_BOUNDARY: f"(?:(?<={_WORD})(?={_WORD})|(?<!{_WORD})(?!{_WORD}))",
}
_REPEAT_SUFFIXES = {_OP_STAR: "*", _OP_PLUS: "+", _OP_QUEST: "?"}


def _emit_char(cp: int) -> str:
    if cp < 0x80 and chr(cp).isalnum():
        return chr(cp)
    return f"\\U{cp:08x}"


def _emit_class(ranges: Ranges) -> str:
    if not ranges:
        return "(?!)"
    parts = [_emit_char(lo) if lo == hi else f"{_emit_char(lo)}-{_emit_char(hi)}" for lo, hi in ranges]
    return "[" + "".join(parts) + "]"


def _emit(root: _Node) -> str:
    """Write a Python pattern with the same language; no global flags are used.

    Iterative, since Go accepts trees up to 1000 deep.  Every construct that
    needs grouping brings its own ``(?:``, so captures are written bare.
    """
    out: list[str] = []
    todo: list[_Node | str] = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            out.append(node)
            continue
        op = node.op
        simple = _SIMPLE_EMITS.get(op)
        if simple is not None:
            out.append(simple)
        elif op == _OP_LITERAL:
            if node.flags & _FOLD_CASE:
                _, orbits = _fold_orbits()
                for r in node.runes:
                    orbit = orbits.get(r)
                    out.append(_emit_class([(f, f) for f in orbit]) if orbit else _emit_char(r))
            else:
                out.extend(_emit_char(r) for r in node.runes)
        elif op == _OP_CLASS:
            out.append(_emit_class(node.ranges))
        elif op == _OP_CAPTURE:
            todo.append(node.subs[0])
        elif op in _REPEAT_SUFFIXES:
            out.append("(?:")
            todo += [")" + _REPEAT_SUFFIXES[op], node.subs[0]]
        elif op == _OP_REPEAT:
            out.append("(?:")
            bounds = f"{node.lo}," if node.hi < 0 else f"{node.lo},{node.hi}"
            todo += [f"){{{bounds}}}", node.subs[0]]
        elif op == _OP_CONCAT:
            todo.extend(reversed(node.subs))
        elif op == _OP_ALTERNATE:
            out.append("(?:")
            todo.append(")")
            for k, sub in enumerate(reversed(node.subs)):
                todo.append(sub)
                if k < len(node.subs) - 1:
                    todo.append("|")
        else:  # pragma: no cover - pseudo ops never reach the tree
            raise AssertionError(f"unexpected regexp op {op}")
    return "".join(out)


def compile_regexp(pattern: str) -> re.Pattern[str]:
    """Compile a Go (RE2) pattern into an equivalent Python pattern.

    Use ``.search()`` for Go's ``MatchString``.  Accepts exactly what Go's
    ``regexp.Compile`` accepts, except Unicode script classes (``\\p{Greek}``),
    which :mod:`unicodedata` cannot provide.

    :raises RegexpError: where Go's ``regexp.Compile`` fails.
    """
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in pattern):
        raise RegexpError(_ERR_INVALID_UTF8, pattern)  # surrogate escapes stand for invalid bytes
    try:
        return re.compile(_emit(_RegexpParser(pattern).parse()))
    except (RecursionError, re.error, OverflowError) as e:
        # Python's own limits; Go would have accepted the pattern.
        raise RegexpError(_ERR_INTERNAL, f"{pattern} ({e})")


@functools.lru_cache(maxsize=512)
def _cached_regexp(pattern: str) -> re.Pattern[str] | RegexpError:
    """Go recompiles on every match; caching (including failures) changes nothing observable."""
    try:
        return compile_regexp(pattern)
    except RegexpError as e:
        return e


_SURROGATES = re.compile("[\ud800-\udfff]")


def _go_subject(value: str) -> str:
    """Go reads each invalid byte of the subject as U+FFFD."""
    if value.isascii():
        return value
    return _SURROGATES.sub("\ufffd", value)
