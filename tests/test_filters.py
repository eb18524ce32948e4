"""Tests for :mod:`cdtwist.filters`.

The first classes port containerd's ``filters/filter_test.go`` and
``filters/scanner_test.go``; the expected error texts and regexp results
further down were checked against containerd 1.6.20 built with Go 1.19.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import filters
from cdtwist.errors import InvalidArgument, to_grpc_code
from cdtwist.filters import (
    TOKEN_EOF,
    TOKEN_FIELD,
    TOKEN_ILLEGAL,
    TOKEN_NAMES,
    TOKEN_OPERATOR,
    TOKEN_QUOTED,
    TOKEN_SEPARATOR,
    TOKEN_VALUE,
    AdaptorFunc,
    AllOf,
    Always,
    AnyOf,
    FieldsAdaptor,
    Operator,
    ParseError,
    RegexpError,
    Selector,
    adapt_labels,
    compile_regexp,
    operator_string,
    parse,
    parse_all,
    quote,
)

# The first example may build the lazy Unicode tables, and CI machines are shared.
NO_DEADLINE = settings(deadline=None)


# -- filter_test.go


class _Entry:
    def __init__(self, name: str = "", other: str = "", labels: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.other = other
        self.labels = dict(labels or {})

    def __repr__(self) -> str:
        return f"_Entry({self.name!r}, {self.other!r}, {self.labels!r})"


CORPUS = [
    _Entry("foo", labels={"foo": "true"}),
    _Entry("bar"),
    _Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    _Entry("bar", labels={"bar": "true"}),
    _Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    _Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    _Entry("baz", other="too complex, yo"),
    _Entry("bazo", other="abc"),
    _Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def adapt(entry: _Entry) -> AdaptorFunc:
    """The example adaptor from filter_test.go."""

    def field(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath[0] == "name":
            return entry.name, len(entry.name) > 0
        if fieldpath[0] == "other":
            return entry.other, len(entry.other) > 0
        if fieldpath[0] == "labels":
            value = entry.labels.get(".".join(fieldpath[1:]))
            return (value, True) if value is not None else ("", False)
        return "", False

    return AdaptorFunc(field)


def select(expr: str, corpus: Sequence[_Entry] = CORPUS) -> list[_Entry]:
    f = parse(expr)
    return [entry for entry in corpus if f.match(adapt(entry))]


# (name, input, indices of the expected corpus entries); from TestFilters.
FILTER_CASES: list[tuple[str, str, list[int]]] = [
    ("Empty", "", list(range(9))),
    ("Present", "name", list(range(9))),
    ("LabelPresent", "labels.foo", [0, 2, 8]),
    ("NameAndLabelPresent", "labels.foo,name", [0, 2, 8]),
    ("LabelValue", "labels.foo==true", [0]),
    ("LabelValuePunctuated", "labels.foo==omg_asdf.asdf-qwer", [8]),
    ("Name", "name==bar", [1, 3]),
    ("NameNotEqual", "name!=bar", [0, 2, 4, 5, 6, 7, 8]),
    ("NameAndLabelPresent", "name==bar,labels.bar", [3]),
    ("QuotedValue", 'other=="too complex, yo"', [6]),
    ("RegexpValue", "other~=[abc]+,name!=foo", [6, 7]),
    ("RegexpQuotedValue", "other~=/[abc]+/,name!=foo", [6, 7]),
    ("RegexpQuotedValue", "other~=/[abc]{1,2}/,name!=foo", [6, 7]),
    ("RegexpQuotedValueGarbage", 'other~=/[abc]{0,1}"\\//,name!=foo', []),
    ("NameAndLabelValue", "name==bar,labels.bar==true", [3]),
    ("NameAndLabelValueNoMatch", "name==bar,labels.bar==wrong", []),
    ("LabelQuotedFieldPathPresent", 'name==foo,labels."more complex label"', [2]),
    ("LabelQuotedFieldPathPresentWithQuoted", 'labels."more complex label with \\\\ and \\""==present', [4]),
    ("LabelQuotedFieldPathPresentWithQuotedEmbed", 'labels."more complex label with \\\\ and \\"".post==present', [5]),
]

# (name, input, Go's error text); from TestFilters.
FILTER_ERROR_CASES: list[tuple[str, str, str]] = [
    (
        "LabelValueNoAltQuoting",
        "labels.|foo|==omg_asdf.asdf-qwer",
        "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
    ),
    (
        "LabelQuotedFieldPathPresentWithQuotedEmbedInvalid",
        'labels.?"more complex label with \\\\ and \\"".post==present',
        'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]: '
        "expected field or quoted",
    ),
    ("TrailingComma", "name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
    ("TrailingFieldSeparator", "labels.", "filters: parse error: [labels.]: expected field or quoted"),
    (
        "MissingValue",
        "image~=,id?=?fbaq",
        "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
    ),
    (
        "FieldQuotedLiteralNotTerminated",
        "labels.ns/key==value",
        "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
    ),
    (
        "ValueQuotedLiteralNotTerminated",
        "labels.key==/value",
        "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
    ),
]


class FilterTests(SynchronousTestCase):
    """filter_test.go's TestFilters and TestOperatorStrings."""

    def test_filters(self) -> None:
        for name, expr, expected in FILTER_CASES:
            self.assertEqual(select(expr), [CORPUS[i] for i in expected], f"{name}: {expr!r}")

    def test_filter_errors(self) -> None:
        for name, expr, message in FILTER_ERROR_CASES:
            with self.assertRaises(ParseError, msg=name) as caught:
                parse(expr)
            self.assertEqual(str(caught.exception), message, name)

    def test_operator_strings(self) -> None:
        for op, expected in [
            (Operator.PRESENT, "?"),
            (Operator.EQUAL, "=="),
            (Operator.NOT_EQUAL, "!="),
            (Operator.MATCHES, "~="),
        ]:
            self.assertEqual(str(op), expected)
        self.assertEqual(operator_string(10), "unknown")


# -- scanner_test.go

Tok = tuple[int, int, str] | tuple[int, int, str, str]

SCANNER_CASES: list[tuple[str, str, list[Tok]]] = [
    ("Field", "name", [(0, TOKEN_FIELD, "name"), (4, TOKEN_EOF, "")]),
    (
        "SelectorsWithOperators",
        "name==value,foo!=bar",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "=="),
            (6, TOKEN_VALUE, "value"),
            (11, TOKEN_SEPARATOR, ","),
            (12, TOKEN_FIELD, "foo"),
            (15, TOKEN_OPERATOR, "!="),
            (17, TOKEN_VALUE, "bar"),
            (20, TOKEN_EOF, ""),
        ],
    ),
    (
        "SelectorsWithFieldPaths",
        "name==value,labels.foo=value,other.bar~=match",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "=="),
            (6, TOKEN_VALUE, "value"),
            (11, TOKEN_SEPARATOR, ","),
            (12, TOKEN_FIELD, "labels"),
            (18, TOKEN_SEPARATOR, "."),
            (19, TOKEN_FIELD, "foo"),
            (22, TOKEN_OPERATOR, "="),
            (23, TOKEN_VALUE, "value"),
            (28, TOKEN_SEPARATOR, ","),
            (29, TOKEN_FIELD, "other"),
            (34, TOKEN_SEPARATOR, "."),
            (35, TOKEN_FIELD, "bar"),
            (38, TOKEN_OPERATOR, "~="),
            (40, TOKEN_VALUE, "match"),
            (45, TOKEN_EOF, ""),
        ],
    ),
    (
        "RegexpValue",
        "name~=[abc]+,foo=test",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_VALUE, "[abc]+"),
            (12, TOKEN_SEPARATOR, ","),
            (13, TOKEN_FIELD, "foo"),
            (16, TOKEN_OPERATOR, "="),
            (17, TOKEN_VALUE, "test"),
            (21, TOKEN_EOF, ""),
        ],
    ),
    (
        "RegexpEscapedValue",
        "name~=[abc]\\+,foo=test",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_VALUE, "[abc]\\+"),
            (13, TOKEN_SEPARATOR, ","),
            (14, TOKEN_FIELD, "foo"),
            (17, TOKEN_OPERATOR, "="),
            (18, TOKEN_VALUE, "test"),
            (22, TOKEN_EOF, ""),
        ],
    ),
    (
        "RegexpQuotedValue",
        "name~=/[abc]{0,2}/,foo=test",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_QUOTED, "/[abc]{0,2}/"),
            (18, TOKEN_SEPARATOR, ","),
            (19, TOKEN_FIELD, "foo"),
            (22, TOKEN_OPERATOR, "="),
            (23, TOKEN_VALUE, "test"),
            (27, TOKEN_EOF, ""),
        ],
    ),
    (
        "Cowsay",
        "name~=牛,labels.moo=true",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_VALUE, "牛"),
            (9, TOKEN_SEPARATOR, ","),
            (10, TOKEN_FIELD, "labels"),
            (16, TOKEN_SEPARATOR, "."),
            (17, TOKEN_FIELD, "moo"),
            (20, TOKEN_OPERATOR, "="),
            (21, TOKEN_VALUE, "true"),
            (25, TOKEN_EOF, ""),
        ],
    ),
    (
        "CowsayRegexpQuoted",
        "name~=|牛|,labels.moo=true",
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_QUOTED, "|牛|"),
            (11, TOKEN_SEPARATOR, ","),
            (12, TOKEN_FIELD, "labels"),
            (18, TOKEN_SEPARATOR, "."),
            (19, TOKEN_FIELD, "moo"),
            (22, TOKEN_OPERATOR, "="),
            (23, TOKEN_VALUE, "true"),
            (27, TOKEN_EOF, ""),
        ],
    ),
    (
        "Escapes",
        'name~="asdf\\n\\tfooo"',
        [
            (0, TOKEN_FIELD, "name"),
            (4, TOKEN_OPERATOR, "~="),
            (6, TOKEN_QUOTED, '"asdf\\n\\tfooo"'),
            (20, TOKEN_EOF, ""),
        ],
    ),
    (
        "NullInput",
        "foo\x00bar",
        [
            (0, TOKEN_FIELD, "foo"),
            (3, TOKEN_ILLEGAL, "", "unexpected null"),
            (4, TOKEN_FIELD, "bar"),
            (7, TOKEN_EOF, ""),
        ],
    ),
    (
        "SpacesChomped",
        "foo = bar    ",
        [(0, TOKEN_FIELD, "foo"), (4, TOKEN_OPERATOR, "="), (6, TOKEN_VALUE, "bar"), (13, TOKEN_EOF, "")],
    ),
    (
        "ValuesPunctauted",
        "compound.labels==punctuated_value.foo-bar",
        [
            (0, TOKEN_FIELD, "compound"),
            (8, TOKEN_SEPARATOR, "."),
            (9, TOKEN_FIELD, "labels"),
            (15, TOKEN_OPERATOR, "=="),
            (17, TOKEN_VALUE, "punctuated_value.foo-bar"),
            (41, TOKEN_EOF, ""),
        ],
    ),
    (
        "PartialInput",
        "interrupted=",
        [(0, TOKEN_FIELD, "interrupted"), (11, TOKEN_OPERATOR, "="), (12, TOKEN_EOF, "")],
    ),
    (
        "DoubleValue",
        "doublevalue=value value",
        [
            (0, TOKEN_FIELD, "doublevalue"),
            (11, TOKEN_OPERATOR, "="),
            (12, TOKEN_VALUE, "value"),
            (18, TOKEN_FIELD, "value"),
            (23, TOKEN_EOF, ""),
        ],
    ),
    (
        "LeadingWithQuoted",
        '"leading quote".postquote==value',
        [
            (0, TOKEN_QUOTED, '"leading quote"'),
            (15, TOKEN_SEPARATOR, "."),
            (16, TOKEN_FIELD, "postquote"),
            (25, TOKEN_OPERATOR, "=="),
            (27, TOKEN_VALUE, "value"),
            (32, TOKEN_EOF, ""),
        ],
    ),
    (
        "MissingValue",
        "input==,id!=ff",
        [
            (0, TOKEN_FIELD, "input"),
            (5, TOKEN_OPERATOR, "=="),
            (7, TOKEN_SEPARATOR, ","),
            (8, TOKEN_FIELD, "id"),
            (10, TOKEN_OPERATOR, "!="),
            (12, TOKEN_VALUE, "ff"),
            (14, TOKEN_EOF, ""),
        ],
    ),
    (
        "QuotedRegexp",
        "input~=/foo\\/bar/,id!=ff",
        [
            (0, TOKEN_FIELD, "input"),
            (5, TOKEN_OPERATOR, "~="),
            (7, TOKEN_QUOTED, "/foo\\/bar/"),
            (17, TOKEN_SEPARATOR, ","),
            (18, TOKEN_FIELD, "id"),
            (20, TOKEN_OPERATOR, "!="),
            (22, TOKEN_VALUE, "ff"),
            (24, TOKEN_EOF, ""),
        ],
    ),
    (
        "QuotedRegexpAlt",
        "input~=|foo/bar|,id!=ff",
        [
            (0, TOKEN_FIELD, "input"),
            (5, TOKEN_OPERATOR, "~="),
            (7, TOKEN_QUOTED, "|foo/bar|"),
            (16, TOKEN_SEPARATOR, ","),
            (17, TOKEN_FIELD, "id"),
            (19, TOKEN_OPERATOR, "!="),
            (21, TOKEN_VALUE, "ff"),
            (23, TOKEN_EOF, ""),
        ],
    ),
    (
        "IllegalQuoted",
        "labels.containerd.io/key==value",
        [
            (0, TOKEN_FIELD, "labels"),
            (6, TOKEN_SEPARATOR, "."),
            (7, TOKEN_FIELD, "containerd"),
            (17, TOKEN_SEPARATOR, "."),
            (18, TOKEN_FIELD, "io"),
            (20, TOKEN_ILLEGAL, "/key==value", "quoted literal not terminated"),
            (31, TOKEN_EOF, ""),
        ],
    ),
    (
        "IllegalQuotedWithNewLine",
        'labels."containerd.io\nkey"==value',
        [
            (0, TOKEN_FIELD, "labels"),
            (6, TOKEN_SEPARATOR, "."),
            (7, TOKEN_ILLEGAL, '"containerd.io\n', "quoted literal not terminated"),
            (22, TOKEN_FIELD, "key"),
            (25, TOKEN_ILLEGAL, '"==value', "quoted literal not terminated"),
            (33, TOKEN_EOF, ""),
        ],
    ),
    (
        "IllegalEscapeSequence",
        'labels."\\g"',
        [
            (0, TOKEN_FIELD, "labels"),
            (6, TOKEN_SEPARATOR, "."),
            (7, TOKEN_ILLEGAL, '"\\g"', "illegal escape sequence"),
            (11, TOKEN_EOF, ""),
        ],
    ),
    (
        "IllegalNumericEscapeSequence",
        'labels."\\xaz"',
        [
            (0, TOKEN_FIELD, "labels"),
            (6, TOKEN_SEPARATOR, "."),
            (7, TOKEN_ILLEGAL, '"\\xaz"', "illegal numeric escape sequence"),
            (13, TOKEN_EOF, ""),
        ],
    ),
]


def scan_all(text: str) -> list[Tok]:
    """Every token up to EOF, with the scanner's error on illegal ones, like scanner_test.go."""
    scanner = filters._Scanner(text.encode())
    out: list[Tok] = []
    for _ in range(1000):
        pos, tok, value = scanner.scan()
        if tok == TOKEN_ILLEGAL:
            out.append((pos, tok, value.decode(), scanner.err))
        else:
            out.append((pos, tok, value.decode()))
        if tok == TOKEN_EOF:
            break
    # Must stay at EOF.
    assert scanner.scan()[1] == TOKEN_EOF
    return out


class ScannerTests(SynchronousTestCase):
    """scanner_test.go's TestScanner."""

    def test_scanner(self) -> None:
        for name, text, expected in SCANNER_CASES:
            self.assertEqual(scan_all(text), expected, name)

    def test_token_names(self) -> None:
        self.assertEqual(TOKEN_NAMES[TOKEN_QUOTED], "Quoted")
        self.assertEqual(len(TOKEN_NAMES), 7)

    def test_unicode_spaces_chomped(self) -> None:
        """Go's unicode.IsSpace, not str.isspace: U+001C is not a space but U+3000 is."""
        self.assertEqual(
            scan_all("a\u3000=b"),
            [(0, TOKEN_FIELD, "a"), (4, TOKEN_OPERATOR, "="), (5, TOKEN_VALUE, "b"), (6, TOKEN_EOF, "")],
        )
        self.assertEqual(scan_all("\x1c")[0], (0, 0x1C, ""))

    def test_replacement_character_illegal(self) -> None:
        """A literal U+FFFD is indistinguishable from a decoding error in Go."""
        self.assertEqual(scan_all("\ufffd")[0], (0, TOKEN_ILLEGAL, "", "rune error"))

    def test_invalid_utf8(self) -> None:
        scanner = filters._Scanner(b"a\xffb")
        self.assertEqual(scanner.scan(), (0, TOKEN_FIELD, b"a"))
        self.assertEqual(scanner.scan(), (1, TOKEN_ILLEGAL, b""))
        self.assertEqual(scanner.err, "rune error")
        self.assertEqual(scanner.scan(), (2, TOKEN_FIELD, b"b"))

    def test_value_stops_at_unicode13_unassigned(self) -> None:
        """U+1FAE0 is new in Unicode 14, so Go 1.19 does not take it as part of a value."""
        self.assertEqual(scan_all("a==b\U0001fae0")[2], (3, TOKEN_VALUE, "b"))
        self.assertEqual(scan_all("a==b\U0001f600")[2], (3, TOKEN_VALUE, "b\U0001f600"))


# -- parser errors checked against Go

PARSE_ERRORS: list[tuple[str, str]] = [
    ("name==foo bar", "[name==foo >| |< bar]: unexpected input:  "),
    ("name===foo", '[name >|=|< ==foo]: unsupported operator "==="'),
    ("name=!x", '[name >|=|< !x]: unsupported operator "=!"'),
    ("name!", '[name >|!|< ]: unsupported operator "!"'),
    ("name foo", '[name  >|f|< oo]: expected an operator ("=="|"!="|"~=")'),
    ("name~=/a/ x", "[name~=/a/ >| |< x]: unexpected input:  "),
    ('name=="\\q"', '[name== >|"|< \\q"]: illegal escape sequence'),
    ('name=="\\U00110000"', '[name== >|"|< \\U00110000"]: unquoting failed: quote syntax error'),
    ('name=="\\400"', '[name== >|"|< \\400"]: unquoting failed: quote syntax error'),
    ('name=="\\x4"', '[name== >|"|< \\x4"]: illegal numeric escape sequence'),
    ('name=="a\\', '[name== >|"|< a\\]: illegal escape sequence'),
    ("name==\ufffd", "[name== >|\ufffd|< \ufffd\ufffd]: rune error"),
    ("name==a\x00", "[name==a >|\x00|< ]: unexpected input: \ufffd"),
    ("labels.é", "[labels. >|\ufffd|< \ufffd]: expected field or quoted"),
    ('labels."a\nb"==c', '[labels. >|"|< a\nb"==c]: quoted literal not terminated'),
    ("name==", "[name==]: expected value or quoted"),
    ("name!=,x", "[name!= >|,|< x]: expected value or quoted"),
    (",", "[ >|,|< ]: expected field or quoted"),
    ("  ", "[  ]: expected field or quoted"),
    ('name=="a"b', '[name=="a" >|b|< ]: unexpected input: b'),
    ("labels.`a`", "[labels. >|`|< a`]: expected field or quoted"),
    ("name==/a/", "[name== >|/|< a/]: invalid quote encountered"),
    ("name~=|a|,labels.|b|", "[name~=|a|,labels. >|||< b|]: invalid quote encountered"),
    ('name~=/a\\"/', '[name~= >|/|< a\\"/]: illegal escape sequence'),
    ("name  ==  foo  ", "[name  ==  foo >| |<  ]: unexpected input:  "),
    (".name", "[ >|.|< name]: expected field or quoted"),
    ("name..x", "[name. >|.|< x]: expected field or quoted"),
    ("name~~=x", '[name >|~|< ~=x]: unsupported operator "~~="'),
    ("name==a,,b", "[name==a, >|,|< b]: expected field or quoted"),
    ("a|b", "[a >|||< b]: quoted literal not terminated"),
]


class ParseTests(SynchronousTestCase):
    def test_errors(self) -> None:
        for expr, where in PARSE_ERRORS:
            with self.assertRaises(ParseError, msg=repr(expr)) as caught:
                parse(expr)
            self.assertEqual(str(caught.exception), "filters: parse error: " + where, repr(expr))

    def test_structure(self) -> None:
        self.assertIs(parse(""), Always)
        self.assertEqual(
            parse('name==foo, labels."a.b",labels.c~=|x|'),
            AllOf(
                (
                    Selector(("name",), Operator.EQUAL, "foo"),
                    Selector(("labels", "a.b"), Operator.PRESENT),
                    Selector(("labels", "c"), Operator.MATCHES, "x"),
                )
            ),
        )

    def test_values(self) -> None:
        cases = {
            "name==a=b": "a=b",
            "name==a.b-c/d|e": "a.b-c/d|e",
            'name=="a\\x41\\101\\u00e9\\U0001F600\\a\\"\\\\"': 'aAAé\U0001f600\a"\\',
            "name==`a`": "`a`",  # backquotes are not quotes to the scanner
            'name==""': "",
            "name~=/a\\/b/": "a/b",
            "name~=|a/b|": "a/b",
            'name=="\\xff"': "\udcff",  # one invalid byte, kept as a surrogate escape
            'name=="\\UFFFFFFFF"': "\udcff",  # Go's rune overflow keeps the low byte
            'name=="\\uD800"': "\ufffd",
        }
        for expr, value in cases.items():
            [selector] = parse(expr).filters  # type: ignore[attr-defined]
            self.assertEqual(selector.value, value, expr)

    def test_quoted_fields(self) -> None:
        self.assertEqual(parse('labels."a.b"."c"').filters[0].fieldpath, ("labels", "a.b", "c"))  # type: ignore[attr-defined]
        self.assertEqual(parse('"leading".x').filters[0].fieldpath, ("leading", "x"))  # type: ignore[attr-defined]

    def test_no_or_operator(self) -> None:
        """``|`` only quotes ``~=`` values; alternatives are separate ParseAll expressions."""
        self.assertEqual(parse("name==a|name==b").filters, (Selector(("name",), Operator.EQUAL, "a|name==b"),))  # type: ignore[attr-defined]
        f = parse_all("name==a", "name==b")
        self.assertEqual([f.match(FieldsAdaptor({"name": n})) for n in "abc"], [True, True, False])


class ParseAllTests(SynchronousTestCase):
    def test_no_expressions_match_everything(self) -> None:
        self.assertIs(parse_all(), Always)
        self.assertTrue(parse_all().match(FieldsAdaptor({})))

    def test_any(self) -> None:
        f = parse_all("name==foo", "labels.bar")
        self.assertIsInstance(f, AnyOf)
        self.assertEqual([e.name for e in CORPUS if f.match(adapt(e))], ["foo", "foo", "bar"])

    def test_empty_expression_in_list(self) -> None:
        self.assertTrue(parse_all("name==nothing", "").match(FieldsAdaptor({})))

    def test_invalid_argument(self) -> None:
        with self.assertRaises(InvalidArgument) as caught:
            parse_all("name==foo", "labels.|foo|==x")
        self.assertEqual(
            str(caught.exception),
            "filters: parse error: [labels. >|||< foo|==x]: invalid quote encountered: invalid argument",
        )
        self.assertEqual(to_grpc_code(caught.exception), grpc.StatusCode.INVALID_ARGUMENT)

    def test_parse_error_is_unclassified(self) -> None:
        """Like Go's Parse, parse() alone does not make an invalid-argument error."""
        with self.assertRaises(ParseError) as caught:
            parse("name==")
        self.assertEqual(to_grpc_code(caught.exception), grpc.StatusCode.UNKNOWN)


class SelectorTests(SynchronousTestCase):
    def test_not_equal_ignores_presence(self) -> None:
        self.assertTrue(parse("labels.x!=y").match(FieldsAdaptor({})))
        self.assertFalse(parse('labels.x!=""').match(FieldsAdaptor({})))

    def test_equal_needs_presence(self) -> None:
        self.assertFalse(parse('name==""').match(FieldsAdaptor({"name": ""})))
        self.assertTrue(parse('labels.x==""').match(FieldsAdaptor({"labels": {"x": ""}})))

    def test_matches_ignores_presence(self) -> None:
        self.assertTrue(parse("labels.x~=^$").match(FieldsAdaptor({})))

    def test_invalid_regexp_matches_nothing(self) -> None:
        """Go parses the filter, then logs and fails the selector on every match."""
        events: list[dict[str, object]] = []
        self.patch(filters, "_log", Logger(observer=events.append))
        f = parse("name~=[")
        self.assertFalse(f.match(FieldsAdaptor({"name": "["})))
        self.assertFalse(f.match(FieldsAdaptor({"name": "["})))
        self.assertFalse(parse("name~=/a**/").match(FieldsAdaptor({"name": "aa"})))
        self.assertEqual([e["pattern"] for e in events], ["[", "[", "a**"])
        self.assertEqual(events[0]["log_level"], LogLevel.error)

    def test_regexp_search_semantics(self) -> None:
        f = parse("name~=oo")
        self.assertTrue(f.match(FieldsAdaptor({"name": "foo.bar"})))
        self.assertFalse(parse("name~=^oo").match(FieldsAdaptor({"name": "foo"})))

    def test_filter_func(self) -> None:
        seen: list[Sequence[str]] = []
        f = filters.FilterFunc(lambda a: a.field(["x", "y"])[1])
        self.assertTrue(f.match(AdaptorFunc(lambda fp: (seen.append(fp), ("", True))[1])))
        self.assertEqual(seen, [["x", "y"]])


class AdaptorTests(SynchronousTestCase):
    def test_adapt_labels(self) -> None:
        labels = {"a.b": "1", "c": ""}
        self.assertEqual(adapt_labels(labels, ["labels", "a", "b"]), ("1", True))
        self.assertEqual(adapt_labels(labels, ["labels", "a.b"]), ("1", True))
        self.assertEqual(adapt_labels(labels, ["labels", "c"]), ("", True))
        self.assertEqual(adapt_labels(labels, ["labels", "d"]), ("", False))
        self.assertEqual(adapt_labels({}, ["labels", ""]), ("", False))
        self.assertEqual(adapt_labels(None, ["labels", "c"]), ("", False))
        self.assertEqual(adapt_labels({"x": "1"}, ["annotations", "x"], start=1), ("1", True))
        self.assertEqual(adapt_labels({"b": "1"}, ["event", "labels", "b"], start=2), ("1", True))

    def test_fields_adaptor(self) -> None:
        obj = FieldsAdaptor({"name": "alpine", "id": "", "labels": {"foo.bar": "x", "foo": "y"}})
        cases = {
            'labels."foo.bar"==x': True,
            "labels.foo.bar==x": True,
            "labels.foo": True,
            "labels.foo==x": False,
            "labels.baz": False,
            "name~=^a": True,
            "name~=^b": False,
            "name==alpine,labels.foo==y": True,
            "id": False,
            "id!=x": True,
            "name.extra==alpine": True,  # containerd adaptors ignore the rest of a plain field's path
            "other": False,
        }
        for expr, expected in cases.items():
            self.assertEqual(parse(expr).match(obj), expected, expr)

    def test_fields_adaptor_always_present(self) -> None:
        obj = FieldsAdaptor({"parent": ""}, always_present=["parent"])
        self.assertTrue(parse("parent").match(obj))
        self.assertTrue(parse('parent==""').match(obj))

    def test_fields_adaptor_nested(self) -> None:
        obj = FieldsAdaptor({"runtime": FieldsAdaptor({"name": "io.containerd.runc.v2"})})
        self.assertTrue(parse("runtime.name==io.containerd.runc.v2").match(obj))
        self.assertFalse(parse("runtime").match(obj))
        self.assertFalse(parse("runtime.options").match(obj))

    def test_empty_fieldpath(self) -> None:
        self.assertEqual(FieldsAdaptor({"a": "b"}).field([]), ("", False))


class QuoteTests(SynchronousTestCase):
    def test_unquote(self) -> None:
        u = filters._unquote
        self.assertEqual(u(b'"abc"'), b"abc")
        self.assertEqual(u(b"/a\\/b/"), b"a/b")
        self.assertEqual(u(b"|a\\|b|"), b"a|b")
        self.assertEqual(u(b"`a\\n\r`"), b"a\\n")
        self.assertEqual(u(b"'a'"), b"a")
        self.assertEqual(u(b"'\\n'"), b"\n")
        self.assertEqual(u(b'"\\x41\\101\\u00e9"'), "AAé".encode())
        self.assertEqual(u(b'"\\U80000041"'), b"A")
        self.assertEqual(u(b'"\\ud800"'), "\ufffd".encode())
        for bad in [
            b"",
            b'"',
            b'"a',
            b"'ab'",
            b"`a`b`",
            b'"a\nb"',
            b'"\\"',
            b'"\\/"',
            b'"\\q"',
            b'"a"b"',
            b"xax",
            b'"\\4"',
        ]:
            self.assertRaises(filters._QuoteSyntaxError, u, bad)

    def test_quote(self) -> None:
        self.assertEqual(quote('a "b"\\\n\x01\ufffd'), '"a \\"b\\"\\\\\\n\\x01\\ufffd"')
        self.assertEqual(quote("\udcff"), '"\\xff"')
        self.assertRaises(ValueError, quote, "\ud800")

    @NO_DEADLINE
    @given(st.text())
    def test_quote_round_trip_value(self, value: str) -> None:
        f = parse(f"labels.k=={quote(value)}")
        self.assertEqual(f.filters[0].value, value)  # type: ignore[attr-defined]
        self.assertTrue(f.match(FieldsAdaptor({"labels": {"k": value}})))

    @NO_DEADLINE
    @given(st.text(), st.text())
    def test_quote_round_trip_label(self, key: str, value: str) -> None:
        f = parse_all(f"labels.{quote(key)}=={quote(value)},labels.{quote(key)}")
        self.assertTrue(f.match(FieldsAdaptor({"labels": {key: value}})))

    @NO_DEADLINE
    @given(st.binary())
    def test_quote_round_trip_bytes(self, data: bytes) -> None:
        value = data.decode("utf-8", "surrogateescape")
        self.assertEqual(parse(f"a~={quote(value)}").filters[0].value, value)  # type: ignore[attr-defined]


class PropertyTests(SynchronousTestCase):
    @NO_DEADLINE
    @given(st.text())
    def test_parse_only_raises_parse_error(self, expr: str) -> None:
        try:
            f = parse(expr)
        except ParseError as e:
            self.assertTrue(str(e).startswith("filters: parse error: ["))
        else:
            f.match(FieldsAdaptor({"name": expr, "labels": {expr: expr}}))

    @NO_DEADLINE
    @given(st.text(st.sampled_from('ab.,=!~"/|\\ x\n')))
    def test_parse_dense_alphabet(self, expr: str) -> None:
        try:
            parse(expr)
        except ParseError:
            pass

    @NO_DEADLINE
    @given(st.text())
    def test_scanner_positions(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        scanner = filters._Scanner(data)
        last = -1
        for _ in range(len(data) + 2):
            pos, tok, _ = scanner.scan()
            self.assertTrue(last <= pos <= len(data))
            last = pos
            if tok == TOKEN_EOF:
                break
        else:
            self.fail("no EOF")

    @NO_DEADLINE
    @given(
        st.lists(st.from_regex(r"[a-z]{1,5}(==|!=)[a-z]{1,5}", fullmatch=True), min_size=1, max_size=4),
        st.text("abc", max_size=3),
    )
    def test_parse_all_is_or(self, exprs: list[str], name: str) -> None:
        obj = FieldsAdaptor(dict.fromkeys("abcdefghijklmnopqrstuvwxyz", name))
        self.assertEqual(parse_all(*exprs).match(obj), any(parse(e).match(obj) for e in exprs))

    @NO_DEADLINE
    @given(st.text())
    def test_quote_meta_matches_itself(self, text: str) -> None:
        """Go's regexp.QuoteMeta output matches exactly the quoted text."""
        meta = "".join("\\" + c if c in "\\.+*?()|[]{}^$" else c for c in text)
        self.assertIsNotNone(compile_regexp(f"^{meta}$").search(text))
        self.assertIsNotNone(compile_regexp(f"(?i)^{meta}$").search(text))


# -- Go regular expressions; expectations come from Go 1.19's regexp package

REGEXP_MATCHES: list[tuple[str, str, bool]] = [
    ("[abc]+", "xxbxx", True),
    ("^a$", "a\n", False),  # $ is \z unless (?m)
    ("(?m)^a$", "a\n", True),
    ("(?m)^$", "a\n", True),
    ("\\Aa\\z", "a", True),
    ("a\\z", "a\n", False),
    (".", "\n", False),
    ("(?s).", "\n", True),
    ("[^a]", "\n", True),
    ("\\s", "\x0b", False),  # Go's \s has no vertical tab
    ("[[:space:]]", "\x0b", True),
    ("\\d", "٣", False),  # ASCII only
    ("\\w", "é", False),
    ("\\bé", "é", False),  # word boundaries are ASCII too
    ("\\B", "", True),  # Python's \B would not match here
    ("\\b", "", False),
    ("(?i)k", "\u212a", True),
    ("(?i)s", "ſ", True),
    ("(?i)ß", "ẞ", True),
    ("(?i)i", "ı", False),
    ("(?i)i", "İ", False),
    ("(?i)σ", "ς", True),
    ("(?i)[^k]", "\u212a", False),
    ("(?i)\\W", "\u212a", False),
    ("\\W", "\u212a", True),
    ("(?i)[[:upper:]]", "q", True),
    ("\\pL", "牛", True),
    ("\\p{Lu}", "a", False),
    ("(?i)\\p{Lu}", "a", True),
    ("\\PL", "1", True),
    ("\\p{^L}", "a", False),
    ("\\pN", "Ⅻ", True),
    ("\\p{Any}", "\n", True),
    ("\\p{C}", "\u0378", False),  # unassigned is not in Go's C
    ("\\p{L}", "\U0001e290", False),  # new in Unicode 14
    ("\\p{Mn}", "\u1734", True),  # Mc since Unicode 14
    ("\\x{263a}", "☺", True),
    ("\\x41\\101\\0", "AA\x00", True),
    ("\\Qa.b\\E", "axb", False),
    ("\\Qa.b", "a.b", True),
    ("a{,2}", "a{,2}", True),  # not a repeat in Go
    ("a{01}", "a{01}", True),
    ("x{2}", "xx", True),
    ("a(?i)*", "b", True),
    ("a*\\Q\\E*", "b", True),
    ("(?U)a+?", "a", True),
    ("(?i:A)a", "aa", True),
    ("(?i:A)a", "aA", False),
    ("(?P<1>a)", "a", True),
    ("[]a]", "]", True),
    ("[^]a]", "b", True),
    ("[a-]", "-", True),
    ("[a-c-e]", "d", False),
    ("[[:alpha]", ":", True),
    ("[\\d-z]", "-", True),
    ("^*$", "", True),
    ("a|", "x", True),
    ("[^\\x00-\\x{10FFFF}]", "a", False),
]

REGEXP_ERRORS = [
    "[",
    "a**",
    "a*+",
    "a*??",
    "a{2}{3}",
    "*",
    "(?i)*",
    "a|*",
    "(*)",
    "(",
    ")",
    "a)",
    "x{1001}",
    "x{2,1}",
    "(a{2}){501}",
    "((a{10}){10}){11}",
    "\\1",
    "\\8",
    "\\q",
    "\\C",
    "\\Z",
    "\\x",
    "\\x{}",
    "\\x{110000}",
    "\\xg0",
    "\\",
    "[\\b]",
    "[z-a]",
    "[[:foo:]]",
    "\\pX",
    "\\p{lu}",
    "\\p{Cn}",
    "\\p{Greek",
    "(?P<>a)",
    "(?P<a-b>a)",
    "(?P=a)",
    "(?<a>x)",
    "(?=a)",
    "(?!a)",
    "(?-)",
    "(?i-)",
    "(?--i)",
    "(?x)",
    "(?",
    "(?i",
    "\udcff",
    "(" * 1001 + ")" * 1001,
    "(?:" + "a" * 3400 + "){1000}",
]


class RegexpTests(SynchronousTestCase):
    def test_matches(self) -> None:
        for pattern, subject, expected in REGEXP_MATCHES:
            got = compile_regexp(pattern).search(subject) is not None
            self.assertEqual(got, expected, f"{pattern!r} on {subject!r}")

    def test_errors(self) -> None:
        for pattern in REGEXP_ERRORS:
            self.assertRaises(RegexpError, compile_regexp, pattern)

    def test_error_text(self) -> None:
        with self.assertRaises(RegexpError) as caught:
            compile_regexp("a**")
        self.assertEqual(str(caught.exception), "error parsing regexp: invalid nested repetition operator: `**`")

    def test_valid_edge_cases(self) -> None:
        for pattern in [
            "",
            "()",
            "(|)",
            "(?)",
            "(?i)",
            "(?i-s:a)",
            "x{1000}",
            "(a{2}){500}",
            "(" * 999 + ")" * 999,
            "\\x{10FFFF}",
        ]:
            compile_regexp(pattern)

    def test_script_classes_unsupported(self) -> None:
        """Go accepts \\p{Greek}; Python has no script data, so it selects nothing."""
        self.assertRaises(RegexpError, compile_regexp, "\\p{Greek}")

    def test_invalid_utf8_subject(self) -> None:
        """Go reads each invalid byte as U+FFFD."""
        self.assertTrue(parse("name~=^\\x{FFFD}$").match(FieldsAdaptor({"name": "\udcff"})))
