"""Tests for :mod:`cdtwist.diff.tarstream`: Go's header formats, read and written."""

from __future__ import annotations

import io
import tarfile

from twisted.trial.unittest import TestCase

from cdtwist.diff import tarstream
from cdtwist.diff.tarstream import Header, TarError, TarReader, TarWriter, format_pax_record, parse_pax_time


def write(*hdrs: Header, pax: bool = True) -> bytes:
    out = io.BytesIO()
    tw = TarWriter(out.write)
    for h in hdrs:
        tw.write_header(h, pax=pax)
        if h.typeflag == tarstream.TYPE_REG and h.size:
            tw.write(b"x" * h.size)
    tw.close()
    return out.getvalue()


def read_all(data: bytes) -> list[Header]:
    r = TarReader(io.BytesIO(data))
    out = []
    while (h := r.next()) is not None:
        out.append(h)
    return out


class WriterTests(TestCase):
    def test_ustar_when_possible(self) -> None:
        data = write(Header(name=b"a/b", size=3, mode=0o644, mtime_ns=5 * 10**9))
        self.assertEqual(len(data), 512 + 512 + 1024)
        self.assertEqual(data[257:265], b"ustar\x0000")
        self.assertEqual(data[124:136], b"00000000003\x00")
        self.assertEqual(data[148:156], data[148:154] + b"\x00 ")

    def test_prefix_split_and_pax_path(self) -> None:
        name = b"d" * 120 + b"/" + b"f" * 50
        data = write(Header(name=name))
        self.assertEqual(data[345:465], b"d" * 120)
        longer = b"x" * 200
        data = write(Header(name=longer))
        self.assertEqual(data[:12], b"PaxHeaders.0")
        self.assertEqual(data[156], ord("x"))
        self.assertEqual(read_all(data)[0].name, longer)

    def test_pax_for_xattrs_and_big_ids(self) -> None:
        h = Header(name=b"dir/f", uid=1 << 22, pax={"SCHILY.xattr.user.a": b"\x00\xff"})
        data = write(h)
        self.assertEqual(data[:17], b"dir/PaxHeaders.0/")
        got = read_all(data)[0]
        self.assertEqual((got.uid, got.xattrs), (1 << 22, {"user.a": b"\x00\xff"}))
        self.assertEqual(format_pax_record("a", b"b"), b"6 a=b\n")
        self.assertEqual(format_pax_record("k", b"v" * 95)[:4], b"102 ")  # the length counts itself

    def test_default_format_rounds_mtime(self) -> None:
        h = Header(name=b"w", mtime_ns=10 * 10**9 + 600_000_000, atime_ns=1, ctime_ns=2)
        self.assertEqual(read_all(write(h, pax=False))[0].mtime_ns, 11 * 10**9)
        # Format PAX keeps sub-second mtimes in a record
        self.assertEqual(read_all(write(h, pax=True))[0].mtime_ns, 10 * 10**9 + 600_000_000)

    def test_missed_bytes(self) -> None:
        tw = TarWriter(io.BytesIO().write)
        tw.write_header(Header(name=b"f", size=10))
        tw.write(b"12345")
        self.assertRaises(TarError, tw.close)
        self.assertRaises(TarError, tw.write, b"too long!")


class ReaderTests(TestCase):
    def test_base256_and_gnu_times(self) -> None:
        ti = tarfile.TarInfo("big")
        ti.uid = 1 << 40
        ti.mtime = -100
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as tf:
            tf.addfile(ti)
        h = read_all(data.getvalue())[0]
        self.assertEqual((h.uid, h.mtime_ns), (1 << 40, -100 * 10**9))

    def test_pax_time(self) -> None:
        self.assertEqual(parse_pax_time(b"1.5"), 1_500_000_000)
        self.assertEqual(parse_pax_time(b"-1.5"), -1_500_000_000)
        self.assertEqual(parse_pax_time(b"2.1234567891"), 2_123_456_789)
        for bad in (b"x", b"1.x", b"+1", b"1_0"):
            self.assertRaises(TarError, parse_pax_time, bad)

    def test_bad_pax_records(self) -> None:
        for bad in (b"5 a=b\n", b"6 ab\n", b"x a=b\n", b"7 a=b\nX"):
            self.assertRaises(TarError, tarstream.parse_pax, bad)

    def test_v7_and_rega(self) -> None:
        data = bytearray(write(Header(name=b"dir/", typeflag=tarstream.TYPE_DIR)))
        data[156] = 0  # legacy regular type with a trailing slash means a directory
        data[257:265] = bytes(8)
        data[148:156] = b"        "
        data[148:155] = b"%06o\x00" % sum(data[:512])
        self.assertEqual(read_all(bytes(data))[0].typeflag, tarstream.TYPE_DIR)

    def test_digest_covers_trailing_data(self) -> None:
        inp = tarstream.HashingInput(io.BytesIO(write(Header(name=b"a")) + b"junk"))
        r = TarReader(inp)
        while r.next() is not None:
            pass
        self.assertEqual(inp.drain(), 4)
        self.assertEqual(inp.count, 1536 + 4)
