"""Tests for :mod:`cdtwist.diff.stream`: the processor chain and ``[stream_processors]`` binaries."""

from __future__ import annotations

import gzip
import io
import os
import stat
import textwrap
import time

from twisted.trial.unittest import TestCase

from cdtwist.diff.compression import MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_GZIP
from cdtwist.diff.stream import MEDIA_TYPE_ENV_VAR, BinaryProcessor, NoProcessor, ProcessorChain, ProcessorRegistry
from cdtwist.errors import CdtwistError

ENCRYPTED = MEDIA_TYPE_IMAGE_LAYER_GZIP + "+encrypted"
DATA = os.urandom(300_000)


class Config:
    def __init__(
        self, accepts: list[str], returns: str, path: str, args: tuple[str, ...] = (), env: tuple[str, ...] = ()
    ) -> None:
        self.accepts, self.returns, self.path, self.args, self.env = accepts, returns, path, list(args), list(env)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class StreamTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def script(self, name: str, body: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + textwrap.dedent(body))
        os.chmod(path, 0o755)
        return path

    def test_builtin_handlers(self) -> None:
        reg = ProcessorRegistry()
        with reg.open(MEDIA_TYPE_IMAGE_LAYER_GZIP, io.BytesIO(gzip.compress(DATA))) as s:
            self.assertEqual(s.read(), DATA)
            s.check()
        with reg.open(MEDIA_TYPE_IMAGE_LAYER, io.BytesIO(DATA)) as s:
            self.assertEqual(s.read(), DATA)
        # Docker's plain type may be compressed anyway: sniffed
        with reg.open("application/vnd.docker.image.rootfs.diff.tar", io.BytesIO(gzip.compress(DATA))) as s:
            self.assertEqual(s.read(), DATA)
        e = self.assertRaises(CdtwistError, reg.open, "application/json", io.BytesIO(b""))
        self.assertEqual(str(e), "failed to get stream processor for application/json: no processor for media-type")
        self.assertRaises(NoProcessor, reg.get_processor, ProcessorChain("text/plain", io.BytesIO()))

    def test_binary_processor(self) -> None:
        """A configured binary runs for its media types with the type in its environment and payload on fd 3."""
        log = os.path.join(self.dir, "log")
        path = self.script(
            "decrypt",
            f"""\
            echo "$STREAM_PROCESSOR_MEDIATYPE $FOO $1" > {log}
            cat <&3 >> {log}
            exec cat
            """,
        )
        reg = ProcessorRegistry()
        reg.register_config({"dec": Config([ENCRYPTED], MEDIA_TYPE_IMAGE_LAYER_GZIP, path, ("arg1",), ("FOO=bar",))})
        with reg.open(ENCRYPTED, io.BytesIO(gzip.compress(DATA)), {"dec": b"secret-payload"}) as s:
            self.assertEqual([type(p).__name__ for p in s.chain][1], "BinaryProcessor")
            self.assertEqual(s.read(), DATA)
            s.check()
        with open(log) as f:
            self.assertEqual(f.read(), f"{ENCRYPTED} bar arg1\nsecret-payload")

    def test_chain_of_binaries_hands_over_fds(self) -> None:
        a = self.script("a", "exec tr a-z A-Z\n")
        b = self.script("b", "exec rev\n")
        reg = ProcessorRegistry()
        reg.register_config(
            {
                "one": Config(["x/one"], "x/two", a),
                "two": Config(["x/two"], MEDIA_TYPE_IMAGE_LAYER, b),
            }
        )
        with reg.open("x/one", io.BytesIO(b"hello\nworld\n")) as s:
            self.assertEqual(s.read(), b"OLLEH\nDLROW\n")
            s.check()
            pids = [p.pid for p in s.chain if isinstance(p, BinaryProcessor)]
        self.assertEqual(len(pids), 2)
        self.assertFalse(any(_alive(p) for p in pids))

    def test_failure_reports_stderr(self) -> None:
        path = self.script("bad", "cat > /dev/null; echo 'bad key' >&2; exit 3\n")
        reg = ProcessorRegistry()
        reg.register_config({"bad": Config([ENCRYPTED], MEDIA_TYPE_IMAGE_LAYER, path)})
        with reg.open(ENCRYPTED, io.BytesIO(DATA)) as s:
            self.assertEqual(s.read(), b"")
            e = self.assertRaises(CdtwistError, s.check)
        self.assertEqual(str(e), "bad key\n")

    def test_close_kills_and_reaps(self) -> None:
        """Closing a chain mid-stream kills a stuck binary and leaves no zombie."""
        path = self.script("stuck", "sleep 60\n")
        reg = ProcessorRegistry()
        reg.register_config({"s": Config([ENCRYPTED], MEDIA_TYPE_IMAGE_LAYER, path)})
        t = time.monotonic()
        s = reg.open(ENCRYPTED, io.BytesIO(DATA))
        proc = s.chain[-1]
        assert isinstance(proc, BinaryProcessor)
        s.close()
        self.assertLess(time.monotonic() - t, 10)
        self.assertFalse(_alive(proc.pid))
        self.assertRaises(ChildProcessError, os.waitpid, proc.pid, os.WNOHANG)

    def test_wait_is_bounded(self) -> None:
        """A binary that closes its output but never exits is killed after ``wait_timeout``."""
        path = self.script("lingers", "exec 1>&-; sleep 60\n")
        p = BinaryProcessor(ENCRYPTED, MEDIA_TYPE_IMAGE_LAYER, ProcessorChain(ENCRYPTED, io.BytesIO(b"")), path)
        p.wait_timeout = 0.5
        t = time.monotonic()
        self.assertEqual(p.read(100), b"")
        self.assertLess(time.monotonic() - t, 10)
        self.assertIsNotNone(p.err())
        p.close()

    def test_missing_binary(self) -> None:
        reg = ProcessorRegistry()
        reg.register_config({"x": Config([ENCRYPTED], MEDIA_TYPE_IMAGE_LAYER, "no-such-decoder-binary")})
        e = self.assertRaises(CdtwistError, reg.open, ENCRYPTED, io.BytesIO(DATA))
        self.assertIn('exec: "no-such-decoder-binary": executable file not found in $PATH', str(e))

    def test_later_registration_wins(self) -> None:
        """User processors are asked before the built-in decompressor, as in Go."""
        path = self.script("mine", "exec cat\n")
        reg = ProcessorRegistry()
        reg.register_config({"mine": Config([MEDIA_TYPE_IMAGE_LAYER], MEDIA_TYPE_IMAGE_LAYER, path)})
        with reg.open(MEDIA_TYPE_IMAGE_LAYER, io.BytesIO(b"x")) as s:
            self.assertIsInstance(s.chain[1], BinaryProcessor)
            self.assertEqual(s.read(), b"x")
        self.assertTrue(stat.S_ISREG(os.stat(path).st_mode))
        self.assertEqual(MEDIA_TYPE_ENV_VAR, "STREAM_PROCESSOR_MEDIATYPE")
