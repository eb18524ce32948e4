"""containerd's own ``content/testsuite``, through ``content/proxy``, against the real cdtwist daemon.

``tests/content_go/content_test.go`` is compiled once per source version
with ``go test -c`` in GOPATH mode against Debian's containerd sources
(``/usr/share/gocode``) and cached under the temp dir.  It runs the suite
with every test context in a fresh namespace holding a lease, as
containerd's client tests do: ``ContentSuite`` and the shared cross
namespace suite on a daemon with the default ``shared`` policy, the
isolated one on a daemon configured ``isolated``.  The same binary is run
against the real containerd as a control.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.go_build import GoSuite
from tests.integration.harness import start_cdtwist, start_containerd

SOURCE = Path(__file__).resolve().parent.parent / "content_go" / "content_test.go"
RUN_TIMEOUT = 300

SHARED_TESTS = [
    "Writer",
    "UpdateStatus",
    "CommitExists",
    "Resume",
    "ResumeTruncate",
    "ResumeDiscard",
    "ResumeCopy",
    "ResumeCopySeeker",
    "ResumeCopyReaderAt",
    "SmallBlob",
    "Labels",
    "CommitErrorState",
    "CrossNamespaceAppend",
    "CrossNamespaceShare",
]
ISOLATED_TESTS = ["CrossNamespaceIsolate"]
ISOLATED_CONFIG = '[plugins."io.containerd.metadata.v1.bolt"]\n  content_sharing_policy = "isolated"\n'

SUITE = GoSuite(SOURCE, "contentgo")
build_suite = SUITE.build


def run_suite(address: str, policy: str, prefix: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "CONTENT_ADDRESS": address,
        "CONTENT_POLICY": policy,
        "CONTENT_PREFIX": prefix,
        "TMPDIR": tempfile.gettempdir(),
    }
    proc = subprocess.run(
        [build_suite(), "-test.v", "-test.count=1", "-test.timeout=240s"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    return proc.returncode, proc.stdout + proc.stderr


def results(output: str) -> dict[str, str]:
    """``{subtest: PASS|FAIL|SKIP}`` from ``go test -v`` output."""
    return dict(
        (name, verdict) for verdict, name in re.findall(r"^\s*--- (PASS|FAIL|SKIP): TestContent/(\S+)", output, re.M)
    )


class ContentTestSuiteTests(unittest.TestCase):
    """The Go suite must pass, every subtest, on each policy."""

    def check(self, address: str, policy: str, expected: list[str]) -> None:
        rc, output = run_suite(address, policy, f"suite{os.getpid()}{policy[:3]}")
        verdicts = results(output)
        self.assertEqual(
            (rc, verdicts), (0, {name: "PASS" for name in expected}), f"content testsuite ({policy}):\n{output}"
        )

    def test_shared_policy(self) -> None:
        build_suite()
        daemon = start_cdtwist(self)
        self.check(daemon.address, "shared", SHARED_TESTS)

    def test_isolated_policy(self) -> None:
        build_suite()
        daemon = start_cdtwist(self, ISOLATED_CONFIG)
        self.check(daemon.address, "isolated", ISOLATED_TESTS)

    def test_containerd_control(self) -> None:
        """The same binary against containerd: the harness, not cdtwist, would be at fault if this fails."""
        build_suite()
        daemon = start_containerd(self)
        self.check(daemon.address, "shared", SHARED_TESTS)
