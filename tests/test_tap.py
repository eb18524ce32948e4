"""makeService, the cdtwist command, endpoints and mount table parsing."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from cdtwist import cli, config, tap
from cdtwist.daemon import Daemon
from cdtwist.endpoints import server_description, unix_mode, unix_path
from cdtwist.errors import InvalidArgument
from cdtwist.mount import cleanup_temp_mounts, mount_table


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


class MakeServiceTests(SynchronousTestCase):
    def options(self, *argv: str) -> tap.Options:
        opts = tap.Options()
        opts.parseOptions(list(argv))
        return opts

    def test_builds_the_tree_in_graph_order_without_starting_anything(self) -> None:
        d = self.mktemp()
        cfg = write(os.path.join(d, "c.toml"), f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n')
        service = tap.makeService(self.options("-c", cfg, "--address", f"{d}/x.sock"))
        self.assertIsInstance(service, Daemon)
        self.assertFalse(service.running)
        self.assertFalse(os.path.exists(f"{d}/root"), "makeService must not touch the disk")
        names = [s.name for s in service.tree]
        self.assertLess(
            names.index("io.containerd.event.v1.exchange"), names.index("io.containerd.service.v1.namespaces-service")
        )
        self.assertLess(names.index("io.containerd.metadata.v1.bolt"), names.index("io.containerd.grpc.v1.namespaces"))
        self.assertEqual(service.config.grpc.address, f"{d}/x.sock")
        self.assertEqual(service.config.ttrpc.address, f"{d}/x.sock.ttrpc")
        self.assertEqual(service.io_pool.started, False)

    def test_disabled_plugins_are_not_in_the_tree(self) -> None:
        d = self.mktemp()
        cfg = write(os.path.join(d, "c.toml"), 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.events"]\n')
        names = [s.name for s in tap.makeService(self.options("-c", cfg))]
        self.assertNotIn(
            "io.containerd.grpc.v1.events", [s.name for s in tap.makeService(self.options("-c", cfg)).tree]
        )
        self.assertIn("plugins", names)

    def test_bad_config_exits_1_naming_file_and_key(self) -> None:
        d = self.mktemp()
        cfg = write(os.path.join(d, "c.toml"), 'version = 2\n[grpc]\nuid = "abc"\n')
        err = io.StringIO()
        with redirect_stderr(err):
            exc = self.assertRaises(SystemExit, tap.makeService, self.options("-c", cfg))
        self.assertEqual(exc.code, 1)
        self.assertIn(cfg, err.getvalue())
        self.assertIn("grpc.uid", err.getvalue())

    def test_bad_log_level_is_a_usage_error(self) -> None:
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, self.options, "--log-level", "loud")


class CLITests(SynchronousTestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_config_default_is_complete_and_loads_back(self) -> None:
        rc, out, _ = self.run_cli("config", "default")
        self.assertEqual(rc, 0)
        self.assertIn('[plugins."io.containerd.metadata.v1.bolt"]', out)
        self.assertIn('content_sharing_policy = "shared"', out)
        path = write(os.path.join(self.mktemp(), "default.toml"), out)
        loaded = config.load(path)
        defaults = config.load(None)
        self.assertEqual(loaded.warnings, [])
        self.assertEqual(loaded.grpc, defaults.grpc)
        self.assertEqual(
            (loaded.root, loaded.state, loaded.timeouts), (defaults.root, defaults.state, defaults.timeouts)
        )
        from cdtwist.plugin import registry

        for reg in registry:
            self.assertEqual(loaded.plugin_config(reg), defaults.plugin_config(reg), reg.uri)

    def test_config_dump_applies_file_and_flags(self) -> None:
        d = self.mktemp()
        cfg = write(os.path.join(d, "c.toml"), 'version = 2\nroot = "/from/file"\n[grpc]\naddress = "/f.sock"\n')
        rc, out, _ = self.run_cli("config", "dump", "-c", cfg, "--address", "/flag.sock")
        self.assertEqual(rc, 0)
        self.assertIn('root = "/from/file"', out)
        self.assertIn('address = "/flag.sock"', out)

    def test_config_dump_bad_file(self) -> None:
        d = self.mktemp()
        cfg = write(os.path.join(d, "c.toml"), "version = [\n")
        rc, _, err = self.run_cli("config", "dump", "-c", cfg)
        self.assertEqual(rc, 1)
        self.assertIn(cfg, err)


class EndpointTests(SynchronousTestCase):
    def test_containerd_style_addresses(self) -> None:
        self.assertEqual(server_description("/run/x.sock"), "unix:/run/x.sock:mode=660")
        self.assertEqual(server_description("127.0.0.1:1338"), "tcp:1338:interface=127.0.0.1")
        self.assertEqual(server_description(":1338"), "tcp:1338")
        self.assertEqual(server_description("[::1]:1338"), "tcp:1338:interface=\\:\\:1")

    def test_endpoint_strings_pass_through(self) -> None:
        for s in ["unix:/run/x.sock:mode=660", "tcp:1338:interface=127.0.0.1", "ssl:443:privateKey=k.pem"]:
            self.assertEqual(server_description(s), s)

    def test_garbage_rejected(self) -> None:
        self.assertRaises(InvalidArgument, server_description, "")
        self.assertRaises(InvalidArgument, server_description, "1.2.3.4:http")
        self.assertEqual(server_description("relative/api.sock"), "unix:relative/api.sock:mode=660")

    def test_unix_mode(self) -> None:
        self.assertEqual(unix_mode("unix:/a/b.sock:mode=600:lockfile=0"), 0o600)
        self.assertEqual(unix_mode("unix:/a/b.sock"), 0o660)
        self.assertEqual(unix_mode("/a/b.sock", 0o640), 0o640)

    def test_unix_path(self) -> None:
        self.assertEqual(unix_path("/a/b.sock"), "/a/b.sock")
        self.assertEqual(unix_path("unix:/a/b\\:c.sock:mode=660"), "/a/b:c.sock")
        self.assertIsNone(unix_path("tcp:1"))


class MountTableTests(SynchronousTestCase):
    def test_parse_and_pick_temp_mounts_deepest_first(self) -> None:
        info = write(
            os.path.join(self.mktemp(), "mountinfo"),
            "".join(
                f"{i} 1 0:1 / {mp} rw - tmpfs tmpfs rw\n"
                for i, mp in enumerate(
                    [
                        "/",
                        "/var/lib/x/tmpmounts/a",
                        "/var/lib/x/tmpmounts/a/b",
                        "/var/lib/x/tmpmountsZ",
                        "/with\\040space",
                    ]
                )
            ),
        )
        self.assertIn("/with space", [m.mountpoint for m in mount_table(info)])
        unmounted: list[str] = []
        import cdtwist.mount as mounts

        self.patch(mounts, "_umount2", lambda target, flags=0: unmounted.append(target))
        found = cleanup_temp_mounts("/var/lib/x/tmpmounts", info)
        self.assertEqual(found, ["/var/lib/x/tmpmounts/a/b", "/var/lib/x/tmpmounts/a"])
        self.assertEqual(unmounted, found)
