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


PLUGIN_DIR_MODULE = '''
from cdtwist.plugin import Registration, SkipPlugin, register

def _skip(ic):
    raise SkipPlugin("no frobnicator on this machine")

def _fail(ic):
    raise RuntimeError("frobnicator exploded")

register(Registration(type="io.example.v1", id="hello", init=lambda ic: object()))
register(Registration(type="io.example.v1", id="skipper", init=_skip))
register(Registration(type="io.example.v1", id="broken", init=_fail))
'''

ENTRY_POINT_MODULE = '''
from cdtwist.plugin import Registration, register

register(Registration(type="io.example.v1", id="from-entry-point", init=lambda ic: object()))
'''


class EntryPointDaemon(CdtwistDaemon):
    def __init__(self, site: str, extra_config: str) -> None:
        self.site = site
        super().__init__(None, extra_config)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + self.site
        return env


class ExtraPluginTests(unittest.TestCase):
    def test_plugin_dir_and_entry_points_show_in_introspection(self) -> None:
        site = self.mktemp()
        plugins = os.path.join(site, "plugins")
        os.makedirs(plugins)
        with open(os.path.join(plugins, "example.py"), "w") as f:
            f.write(PLUGIN_DIR_MODULE)
        with open(os.path.join(site, "cdtwist_example_ep.py"), "w") as f:
            f.write(ENTRY_POINT_MODULE)
        dist = os.path.join(site, "cdtwist_example_ep-1.0.dist-info")
        os.makedirs(dist)
        with open(os.path.join(dist, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: cdtwist-example-ep\nVersion: 1.0\n")
        with open(os.path.join(dist, "entry_points.txt"), "w") as f:
            f.write("[cdtwist.plugins]\nexample = cdtwist_example_ep\n")
        daemon = manage(self, EntryPointDaemon(os.path.abspath(site), f'plugin_dir = "{os.path.abspath(plugins)}"\n'))
        rows = {}
        for line in daemon.ctr("plugins", "ls").ok().stdout.splitlines()[1:]:
            fields = line.split()
            rows[(fields[0], fields[1])] = fields[-1]
        self.assertEqual(rows[("io.example.v1", "hello")], "ok")
        self.assertEqual(rows[("io.example.v1", "skipper")], "skip")
        self.assertEqual(rows[("io.example.v1", "broken")], "error")
        self.assertEqual(rows[("io.example.v1", "from-entry-point")], "ok")
        details = daemon.ctr("plugins", "ls", "-d", "id==broken").ok().stdout
        self.assertIn("frobnicator exploded", details)
        self.assertIn("Code:", details)
        skipped = daemon.ctr("plugins", "ls", "-d", "id==skipper").ok().stdout
        self.assertIn("no frobnicator on this machine: skip plugin", skipped)
