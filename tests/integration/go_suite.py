"""Build containerd's Go test suites (content, snapshots) against Debian's Go sources.

GOPATH mode against /usr/share/gocode; the binary is cached per source
version under the temp dir, so only the first run pays for the build.
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


class GoSuite:
    """One ``go test -c`` binary from one source file, built at most once per process."""

    def __init__(self, source: Path, package: str) -> None:
        self.source = source
        self.package = package
        self._binary: str | None = None

    def build(self) -> str:
        if self._binary is not None:
            return self._binary
        if GO is None:
            raise unittest.SkipTest("go not found on PATH")
        source = self.source.read_bytes()
        base = Path(tempfile.gettempdir()) / f"cdtwist-{self.package}-suite-{os.geteuid()}"
        binary = base / hashlib.sha256(source).hexdigest()[:16] / f"{self.package}.test"
        if not binary.exists():
            src = base / "gopath" / "src" / self.package
            src.mkdir(parents=True, exist_ok=True)
            (src / self.source.name).write_bytes(source)
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f".build-{os.getpid()}")
            env = {
                **os.environ,
                "GO111MODULE": "off",
                "GOPATH": f"{base / 'gopath'}:{GOCODE}",
                "GOCACHE": str(base / "gocache"),
                "GOFLAGS": "",
            }
            proc = subprocess.run(
                [GO, "test", "-c", "-o", str(tmp), "."],
                cwd=src,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"go test -c failed:\n{proc.stdout}\n{proc.stderr}")
            os.replace(tmp, binary)
        self._binary = str(binary)
        return self._binary
