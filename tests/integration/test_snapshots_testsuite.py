"""containerd's own ``snapshots/testsuite``, through ``snapshots/proxy``, against the real cdtwist daemon.

``tests/snapshots_go/snapshots_test.go`` is compiled once per source version
with ``go test -c`` in GOPATH mode against Debian's containerd sources
(``/usr/share/gocode``) and cached under the temp dir.  It runs the whole
suite on one snapshotter of a daemon, every test in a fresh namespace
holding a lease (see the Go file).  It is run for ``overlayfs`` and
``native`` on cdtwist, against ``cdtwist serve-plugin`` (an external
snapshotter: each test starts its own server on its own root, see
``TestServePlugin``), and against the real containerd as a control.  The
tests mount what the daemon hands out: afterwards nothing may stay mounted
under the suite's temp dir or the daemon's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from cdtwist.mount import MNT_DETACH, mounted_under, unmount
from tests.go_build import GoSuite
from tests.integration.harness import (
    DaemonProcess,
    checkout_python_env,
    processes_referencing,
    require_root,
    start_cdtwist,
    start_containerd,
)

SOURCE = Path(__file__).resolve().parent.parent / "snapshots_go" / "snapshots_test.go"
RUN_TIMEOUT = 400

TESTS = [
    "Basic",
    "StatActive",
    "StatComitted",
    "TransitivityTest",
    "PreareViewFailingtest",
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
]
#: skipped by containerd's suite itself, on every snapshotter.
SKIPPED = ["Rename"]

SUITE = GoSuite(SOURCE, "snapshotsgo")
build_suite = SUITE.build


def results(output: str, test: str = "TestSnapshotter") -> dict[str, str]:
    """``{subtest: PASS|FAIL|SKIP}`` of Go test ``test`` from ``go test -v`` output."""
    return dict(
        (name, verdict)
        for verdict, name in re.findall(rf"^\s*--- (PASS|FAIL|SKIP): {test}/(\S+)", output, re.M)
    )


class SnapshotsTestSuiteTests(unittest.TestCase):
    """The Go suite must pass, every subtest, on each snapshotter."""

    def setUp(self) -> None:
        require_root()  # the suite mounts
        build_suite()

    def run_go(self, test: str, label: str, env: dict[str, str]) -> None:
        """Run Go test ``test`` of the suite binary; every subtest must pass (Rename: skip)."""
        proc = subprocess.run(
            [build_suite(), "-test.v", "-test.count=1", "-test.run", f"^{test}$", "-test.timeout=300s"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        output = proc.stdout + proc.stderr
        expected = {name: "PASS" for name in TESTS} | {name: "SKIP" for name in SKIPPED}
        self.assertEqual(
            (proc.returncode, results(output, test)), (0, expected), f"snapshots testsuite ({label}):\n{output}"
        )

    def workdir(self, prefix: str, *also_mounted_under: str) -> str:
        work = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.addCleanup(shutil.rmtree, work, True)
        # Registered after the daemon's cleanup, so it runs first: mounts must be gone while it still runs.
        self.addCleanup(self.check_no_mounts, work, *also_mounted_under)
        return work

    def run_suite(self, daemon: DaemonProcess, snapshotter: str) -> None:
        work = self.workdir("cdtss", daemon.tmpdir)
        env = {
            "SNAPSHOTS_ADDRESS": daemon.address,
            "SNAPSHOTS_SNAPSHOTTER": snapshotter,
            "SNAPSHOTS_PREFIX": f"suite{os.getpid()}{snapshotter[:3]}",
            "TMPDIR": work,
        }
        self.run_go("TestSnapshotter", snapshotter, env)

    def run_serve_plugin_suite(self, kind: str) -> None:
        """Every test of the suite starts its own ``cdtwist serve-plugin <kind>`` on the test's root."""
        work = self.workdir("cdtsp")
        env = checkout_python_env(
            {"SNAPSHOTS_SERVE_PLUGIN": f"{sys.executable} -m cdtwist.cli serve-plugin {kind}", "TMPDIR": work}
        )
        self.run_go("TestServePlugin", f"serve-plugin {kind}", env)
        # Every server was stopped by its test: none may be left running.
        self.assertEqual(processes_referencing(work), [])

    def check_no_mounts(self, *dirs: str) -> None:
        left = [m for d in dirs for m in mounted_under(d)]
        for target in left:
            unmount(target, MNT_DETACH)
        self.assertEqual(left, [], "mounts left behind")

    def test_overlayfs(self) -> None:
        self.run_suite(start_cdtwist(self), "overlayfs")

    def test_native(self) -> None:
        self.run_suite(start_cdtwist(self), "native")

    def test_serve_plugin_overlayfs(self) -> None:
        """Issue 7: ``cdtwist serve-plugin overlayfs`` is a snapshotter containerd's suite accepts."""
        self.run_serve_plugin_suite("overlayfs")

    def test_serve_plugin_native(self) -> None:
        self.run_serve_plugin_suite("native")

    def test_containerd_control(self) -> None:
        """The same binary against containerd: the harness, not cdtwist, would be at fault if this fails."""
        self.run_suite(start_containerd(self), "overlayfs")
