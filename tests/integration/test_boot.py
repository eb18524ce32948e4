"""What the daemon does before serving: leftover temp mounts, OOM score, directories."""

from __future__ import annotations

import os
import subprocess

from twisted.trial import unittest

from tests.integration.harness import CdtwistDaemon, manage, require_root


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class BootTests(unittest.TestCase):
    def test_leftover_temp_mounts_unmounted_and_oom_score_applied(self) -> None:
        require_root()
        daemon = CdtwistDaemon(None, "oom_score = 321\n")
        leftover = os.path.join(daemon.root, "tmpmounts", "containerd-mount123")
        nested = os.path.join(leftover, "inner")
        os.makedirs(leftover)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", leftover], check=True)
        os.makedirs(nested)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", nested], check=True)
        self.addCleanup(
            lambda: [subprocess.run(["umount", "-l", p], capture_output=True) for p in (nested, leftover) if mounted(p)]
        )
        manage(self, daemon)
        self.assertFalse(mounted(nested))
        self.assertFalse(mounted(leftover))
        log = daemon.log()
        self.assertIn("unmounted leftover temp mount", log)
        with open(f"/proc/{daemon.pid}/oom_score_adj") as f:
            self.assertEqual(f.read().strip(), "321")

    def test_oom_score_that_cannot_be_applied_fails_boot_clearly(self) -> None:
        require_root()
        with open("/proc/self/oom_score_adj") as f:
            current = int(f.read())
        if current != 0:
            raise unittest.SkipTest("needs an oom_score_adj of 0 to probe the capability")
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-1")
        except PermissionError:
            pass
        else:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
            raise unittest.SkipTest("this machine grants CAP_SYS_RESOURCE; lowering the score works")
        daemon = manage(self, CdtwistDaemon(None, "oom_score = -999\n"), start=False)
        daemon.start(wait=False)
        self.assertEqual(daemon.wait_exit(), 1)
        self.assertIn("failed to apply oom_score -999: permission denied", daemon.log())
