"""Tests for :mod:`cdtwist.diff.compression`: detection, streaming (de)compression, media types."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, TestCase

from cdtwist.diff import compression
from cdtwist.diff.compression import (
    MEDIA_TYPE_DOCKER_SCHEMA2_LAYER,
    MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP,
    MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_GZIP_ENCRYPTED,
    MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP,
    MEDIA_TYPE_IMAGE_LAYER_ZSTD,
    Compression,
    compress_stream,
    decompress_stream,
    detect_compression,
    diff_compression,
)
from cdtwist.errors import CdtwistError, NotImplemented_
from tests.test_diff_support import Chunked

DATA = os.urandom(200_000) + b"\x00" * 300_000 + b"text " * 50_000


def _zstd_cli(data: bytes) -> bytes:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise SkipTest("zstd command not installed")
    return subprocess.run([zstd, "-q", "-c"], input=data, capture_output=True, check=True).stdout


class DetectTests(TestCase):
    def test_magic(self) -> None:
        self.assertEqual(detect_compression(gzip.compress(b"x")), Compression.GZIP)
        self.assertEqual(detect_compression(b"\x28\xb5\x2f\xfd\x00\x00"), Compression.ZSTD)
        self.assertEqual(detect_compression(b"\x50\x2a\x4d\x18\x04\x00\x00\x00"), Compression.ZSTD)  # skippable
        self.assertEqual(detect_compression(b"\x50\x2a\x4d\x18"), Compression.UNCOMPRESSED)
        self.assertEqual(detect_compression(b"ustar"), Compression.UNCOMPRESSED)
        self.assertEqual(detect_compression(b""), Compression.UNCOMPRESSED)
        self.assertEqual((Compression.GZIP.extension, Compression.ZSTD.extension), ("gz", "zst"))


class DecompressTests(TestCase):
    def roundtrip(self, blob: bytes, want: Compression, **kw: object) -> None:
        rc = decompress_stream(Chunked(blob, step=4099), **kw)  # type: ignore[arg-type]
        self.assertEqual(rc.compression, want)
        out = b"".join(iter(lambda: rc.read(65536), b""))
        rc.close()
        self.assertEqual(out, DATA)

    def test_uncompressed(self) -> None:
        self.roundtrip(DATA, Compression.UNCOMPRESSED)
        self.assertEqual(decompress_stream(io.BytesIO(b"")).read(), b"")

    def test_gzip_zlib(self) -> None:
        self.roundtrip(gzip.compress(DATA), Compression.GZIP, use_pigz=False)

    def test_gzip_multistream(self) -> None:
        third = len(DATA) // 3
        blob = gzip.compress(DATA[:third]) + gzip.compress(DATA[third:])
        self.roundtrip(blob, Compression.GZIP, use_pigz=False)

    def test_gzip_errors(self) -> None:
        blob = gzip.compress(DATA)
        for bad in (blob[:-4], blob[: len(blob) // 2], blob + b"garbage", blob[:-8] + b"\0\0\0\0" + blob[-4:]):
            rc = decompress_stream(io.BytesIO(bad), use_pigz=False)
            self.assertRaises(CdtwistError, lambda rc=rc: b"".join(iter(lambda: rc.read(65536), b"")))

    def test_unpigz(self) -> None:
        if shutil.which("unpigz") is None:
            raise SkipTest("unpigz not installed")
        self.roundtrip(gzip.compress(DATA), Compression.GZIP, use_pigz=True)
        rc = decompress_stream(io.BytesIO(gzip.compress(DATA)[:-10]), use_pigz=True)
        self.assertRaises(CdtwistError, lambda: b"".join(iter(lambda: rc.read(65536), b"")))
        rc.close()

    def test_pigz_env(self) -> None:
        self.patch(compression, "_pigz_path", False)
        self.patch(compression.shutil, "which", lambda name: "/usr/bin/unpigz")
        os.environ[compression.DISABLE_PIGZ_ENV] = "true"
        self.addCleanup(os.environ.pop, compression.DISABLE_PIGZ_ENV, None)
        self.assertIsNone(compression.unpigz_path())
        self.patch(compression, "_pigz_path", False)
        os.environ[compression.DISABLE_PIGZ_ENV] = "not-a-bool"
        self.assertEqual(compression.unpigz_path(), "/usr/bin/unpigz")

    def test_zstd_module(self) -> None:
        if compression._zstd is None:
            raise SkipTest("zstandard module not installed")
        self.roundtrip(compression._zstd.ZstdCompressor().compress(DATA), Compression.ZSTD)
        # several frames, as concatenated zstd streams are
        half = len(DATA) // 2
        c = compression._zstd.ZstdCompressor()
        self.roundtrip(c.compress(DATA[:half]) + c.compress(DATA[half:]), Compression.ZSTD)

    def test_zstd_command_fallback(self) -> None:
        blob = _zstd_cli(DATA)
        self.patch(compression, "_zstd", None)
        self.roundtrip(blob, Compression.ZSTD)
        rc = decompress_stream(io.BytesIO(blob[:-100]))
        self.assertRaises(CdtwistError, lambda: b"".join(iter(lambda: rc.read(65536), b"")))
        rc.close()

    def test_zstd_truncated_module(self) -> None:
        if compression._zstd is None:
            raise SkipTest("zstandard module not installed")
        blob = _zstd_cli(DATA)
        rc = decompress_stream(io.BytesIO(blob[:-100]))
        self.assertRaises(CdtwistError, lambda: b"".join(iter(lambda: rc.read(65536), b"")))


class CompressTests(TestCase):
    def test_gzip(self) -> None:
        out = io.BytesIO()
        w = compress_stream(out, Compression.GZIP)
        for i in range(0, len(DATA), 10_000):
            w.write(DATA[i : i + 10_000])
        w.close()
        self.assertEqual(gzip.decompress(out.getvalue()), DATA)

    def test_zstd(self) -> None:
        if compression._zstd is None:
            raise SkipTest("zstandard module not installed")
        out = io.BytesIO()
        w = compress_stream(out, Compression.ZSTD)
        w.write(DATA)
        w.close()
        self.assertEqual(decompress_stream(io.BytesIO(out.getvalue())).read(), DATA)

    def test_uncompressed(self) -> None:
        out = io.BytesIO()
        w = compress_stream(out, Compression.UNCOMPRESSED)
        w.write(b"abc")
        w.close()
        self.assertEqual(out.getvalue(), b"abc")


class MediaTypeTests(TestCase):
    def test_diff_compression(self) -> None:
        """images.DiffCompression's table."""
        cases = {
            MEDIA_TYPE_DOCKER_SCHEMA2_LAYER: "unknown",
            MEDIA_TYPE_DOCKER_SCHEMA2_LAYER + "+encrypted": "",
            MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP: "gzip",
            MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP: "gzip",
            MEDIA_TYPE_IMAGE_LAYER: "",
            MEDIA_TYPE_IMAGE_LAYER_GZIP: "gzip",
            MEDIA_TYPE_IMAGE_LAYER_ZSTD: "zstd",
            MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP: "gzip",
            MEDIA_TYPE_IMAGE_LAYER_GZIP_ENCRYPTED: "gzip",  # sorted extensions: the last is "gzip"
        }
        for mt, want in cases.items():
            self.assertEqual(diff_compression(mt), want, mt)
        e = self.assertRaises(NotImplemented_, diff_compression, "application/json")
        self.assertEqual(str(e), "unrecognised mediatype application/json: not implemented")

    def test_predicates(self) -> None:
        self.assertTrue(compression.is_layer_type(MEDIA_TYPE_IMAGE_LAYER_ZSTD))
        self.assertTrue(compression.is_layer_type(MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_GZIP))
        self.assertFalse(compression.is_layer_type("application/vnd.oci.image.manifest.v1+json"))
        self.assertTrue(compression.is_non_distributable(MEDIA_TYPE_IMAGE_LAYER_NON_DISTRIBUTABLE_GZIP))
        self.assertTrue(compression.is_non_distributable(MEDIA_TYPE_DOCKER_SCHEMA2_LAYER_FOREIGN_GZIP))
        self.assertFalse(compression.is_non_distributable(MEDIA_TYPE_IMAGE_LAYER_GZIP))
        self.assertTrue(compression.is_docker_type(MEDIA_TYPE_DOCKER_SCHEMA2_LAYER))
        self.assertEqual(compression.parse_media_type("a+zstd+encrypted"), ("a", ["encrypted", "zstd"]))
        self.assertEqual(compression.UNCOMPRESSED_LABEL, "containerd.io/uncompressed")
