"""Build Go test programs against Debian's Go sources (containerd, ttrpc, grpc-go).

GOPATH mode against /usr/share/gocode; each binary is cached per source
version under the temp dir, so only the first run pays for the build.
Used for containerd's own test suites (``go test -c``) and for small Go
peers and reference tools (``go build``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial import unittest

GO = shutil.which("go")
GOCODE = "/usr/share/gocode"
BUILD_TIMEOUT = 900


class GoProgram:
    """One Go program from one source file (a path, or the text itself), built at most once per process.

    :param package: the GOPATH package (and binary) name.
    :param test: build the file's tests (``go test -c``) instead of a ``main`` package.
    """

    def __init__(self, source: Path | str, package: str, *, test: bool = False) -> None:
        self.source = source
        self.package = package
        self.test = test
        self._binary: str | None = None

    def _source(self) -> tuple[str, bytes]:
        if isinstance(self.source, Path):
            return self.source.name, self.source.read_bytes()
        return ("main_test.go" if self.test else "main.go"), self.source.encode()

    def build(self) -> str:
        """The binary's path; SkipTest without go, RuntimeError (with go's output) if the build fails."""
        if self._binary is not None:
            return self._binary
        if GO is None:
            raise unittest.SkipTest("go not found on PATH")
        name, source = self._source()
        base = Path(tempfile.gettempdir()) / f"cdtwist-go-{self.package}-{os.geteuid()}"
        binary_name = f"{self.package}.test" if self.test else self.package
        binary = base / hashlib.sha256(source).hexdigest()[:16] / binary_name
        if not binary.exists():
            src = base / "gopath" / "src" / self.package
            src.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(source)
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f".build-{os.getpid()}")
            env = {
                **os.environ,
                "GO111MODULE": "off",
                "GOPATH": f"{base / 'gopath'}:{GOCODE}",
                "GOCACHE": str(base / "gocache"),
                "GOFLAGS": "",
            }
            command = [GO, "test", "-c"] if self.test else [GO, "build"]
            proc = subprocess.run(
                [*command, "-o", str(tmp), "."],
                cwd=src,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command[1:])} failed:\n{proc.stdout}\n{proc.stderr}")
            os.replace(tmp, binary)
        self._binary = str(binary)
        return self._binary


class GoSuite(GoProgram):
    """A Go test file built with ``go test -c`` (containerd's content and snapshots suites)."""

    def __init__(self, source: Path, package: str) -> None:
        super().__init__(source, package, test=True)
