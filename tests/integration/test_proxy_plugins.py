"""Issue 7: ``[proxy_plugins]`` and ``cdtwist serve-plugin``, driven with the real ``ctr``.

A ``cdtwist serve-plugin`` process serves a snapshotter or the content
store; cdtwist (and, as a control of the wire contract, the real
containerd) uses it through ``[proxy_plugins]``: images unpack into it,
containers run from it, both sides restart without losing anything, an
unreachable peer shows as a plugin error and calls recover when it comes
back, and TLS dial-outs check the peer's name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import time

from twisted.trial import unittest

from cdtwist.tls import tls_client_description
from tests.integration import images_support as ims
from tests.integration.harness import (
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonProcess,
    PluginServerProcess,
    Result,
    _ctr_env,
    ctr_args,
    free_tcp_port,
    manage,
    require_binaries,
    toml_str,
)
from tests.integration.test_tasks_ctr import IMAGE, RUNC, SHIM, image_tar, unique
from tests.support_tls import make_pki, short_tempdir

PROXY = "psnap"


def proxy_config(name: str, kind: str, address: str) -> str:
    return f"[proxy_plugins.{name}]\n  type = {toml_str(kind)}\n  address = {toml_str(address)}\n"


def plugin_row(daemon: DaemonProcess, plugin_type: str, name: str) -> list[str]:
    """The ``ctr plugins ls`` row of one plugin, split into columns."""
    result = daemon.ctr("plugins", "ls", f"id=={name}")
    assert result.rc == 0, result
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    return next((row for row in rows if row[0] == plugin_type), [])


def wait_until(check: object, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.2)


def ctr_bytes(daemon: DaemonProcess, *args: str, namespace: str, data: bytes = b"") -> tuple[int, bytes, str]:
    """``ctr`` with binary stdin/stdout (content ingest and get)."""
    proc = subprocess.run(
        ctr_args(daemon.address, *args, namespace=namespace),
        input=data, capture_output=True, timeout=60, env=_ctr_env(),
    )
    return proc.returncode, proc.stdout, proc.stderr.decode(errors="replace")


def entries(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


class ProxySnapshotterTests(unittest.TestCase):
    """cdtwist with ``[proxy_plugins.psnap]`` pointing at ``cdtwist serve-plugin overlayfs``."""

    def setUp(self) -> None:
        require_binaries(SHIM, RUNC)
        if not os.path.exists(ims.BUSYBOX):
            raise unittest.SkipTest(f"{ims.BUSYBOX} (busybox-static) is needed to build the test image")
        self.server = manage(self, PluginServerProcess("overlayfs"))
        self.daemon = manage(self, CdtwistDaemon(None, proxy_config(PROXY, "snapshot", self.server.address)))
        self.ns = unique("proxy")

    def ctr(self, *args: str, namespace: str | None = None) -> Result:
        return self.daemon.ctr(*args, namespace=namespace or self.ns, timeout=60)

    def snapshots(self, namespace: str | None = None) -> list[str]:
        result = self.ctr("snapshots", "--snapshotter", PROXY, "ls", namespace=namespace)
        self.assertEqual(result.rc, 0, result)
        return sorted(line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip())

    def run_echo(self, text: str) -> None:
        result = self.ctr("run", "--rm", "--snapshotter", PROXY, IMAGE, unique("c"), "echo", text)
        self.assertEqual((result.rc, result.stdout), (0, text + "\n"), result)

    def test_import_run_restart_both_sides(self) -> None:
        row = plugin_row(self.daemon, "io.containerd.snapshotter.v1", PROXY)
        self.assertEqual((row[1], row[-1]), (PROXY, "ok"), row)
        detail = self.daemon.ctr("plugins", "ls", "-d", f"id=={PROXY}")
        self.assertRegex(detail.stdout, rf"address\s+{re.escape(self.server.address)}\n")

        result = self.ctr("images", "import", "--snapshotter", PROXY, image_tar())
        self.assertEqual(result.rc, 0, result)
        chain = self.snapshots()
        self.assertEqual(len(chain), 1, chain)
        # The layer lives in the serve-plugin's root, not in cdtwist's.
        self.assertNotEqual(entries(os.path.join(self.server.root, "snapshots")), [])
        self.assertEqual(entries(os.path.join(self.daemon.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")),
                         [])
        self.run_echo("from the proxy")
        # Namespaces stay cdtwist's business: another one sees nothing.
        self.assertEqual(self.snapshots(namespace=self.ns + "-other"), [])

        # Labels go through the metadata layer as on a built-in snapshotter.
        result = self.ctr("snapshots", "--snapshotter", PROXY, "label", chain[0], "team=proxy")
        self.assertEqual(result.rc, 0, result)
        info = self.ctr("snapshots", "--snapshotter", PROXY, "info", chain[0])
        self.assertIn('"team": "proxy"', info.stdout, info)

        # The serve-plugin restarts: cdtwist's calls work again, nothing lost.
        self.server.stop()
        self.server.start()
        wait_until(lambda: self.ctr("snapshots", "--snapshotter", PROXY, "ls").rc == 0, what="proxy back")
        self.assertEqual(self.snapshots(), chain)
        self.run_echo("after the plugin restarted")

        # cdtwist restarts: its metadata still maps the namespace's snapshots.
        self.daemon.stop()
        self.daemon.start()
        self.assertEqual(self.snapshots(), chain)
        info = self.ctr("snapshots", "--snapshotter", PROXY, "info", chain[0])
        self.assertIn('"team": "proxy"', info.stdout, info)
        self.run_echo("after cdtwist restarted")

    def test_gc_removes_from_the_proxy(self) -> None:
        self.assertEqual(self.ctr("images", "import", "--snapshotter", PROXY, image_tar()).rc, 0)
        self.assertEqual(len(self.snapshots()), 1)
        result = self.ctr("images", "rm", "--sync", IMAGE)
        self.assertEqual(result.rc, 0, result)
        self.assertEqual(self.snapshots(), [])
        # The garbage collector removed the snapshot in the peer and ran its Cleanup: no directory left.
        wait_until(lambda: entries(os.path.join(self.server.root, "snapshots")) == [], what="peer cleaned up")

    def test_unreachable_peer_is_an_error_until_it_returns(self) -> None:
        self.server.stop()
        row = plugin_row(self.daemon, "io.containerd.snapshotter.v1", PROXY)
        wait_until(lambda: plugin_row(self.daemon, "io.containerd.snapshotter.v1", PROXY)[-1] == "error",
                   what="plugin reported as error")
        detail = self.daemon.ctr("plugins", "ls", "-d", f"id=={PROXY}")
        self.assertIn("cannot reach", detail.stdout, detail)
        result = self.ctr("snapshots", "--snapshotter", PROXY, "prepare", "k1")
        self.assertNotEqual(result.rc, 0, result)
        self.assertIn("unavailable", result.stderr, result)
        # The failed prepare left no record behind.
        self.server.start()
        wait_until(lambda: plugin_row(self.daemon, "io.containerd.snapshotter.v1", PROXY)[-1] == "ok",
                   what="plugin ok again")
        self.assertEqual(self.snapshots(), [])
        result = self.ctr("snapshots", "--snapshotter", PROXY, "prepare", "k1")
        self.assertEqual(result.rc, 0, result)
        self.assertEqual(self.snapshots(), ["k1"])
        self.assertEqual(row[1], PROXY)


class UnreachableAtBootTests(unittest.TestCase):
    def test_boots_reports_error_and_recovers(self) -> None:
        tmp = short_tempdir("cdtpx")
        self.addCleanup(shutil.rmtree, tmp, True)
        server = PluginServerProcess("native", tmp)
        self.addCleanup(server.cleanup)
        daemon = manage(self, CdtwistDaemon(None, proxy_config("late", "snapshot", server.address)))
        self.assertEqual(plugin_row(daemon, "io.containerd.snapshotter.v1", "late")[-1], "error")
        self.assertIn("proxy plugin peer not reachable yet", daemon.log())
        result = daemon.ctr("snapshots", "--snapshotter", "late", "prepare", "k", namespace="late")
        self.assertNotEqual(result.rc, 0, result)
        self.assertIn("unavailable", result.stderr)
        server.start()
        wait_until(lambda: daemon.ctr("snapshots", "--snapshotter", "late", "prepare", "k", namespace="late").rc == 0,
                   what="calls recover")
        self.assertEqual(plugin_row(daemon, "io.containerd.snapshotter.v1", "late")[-1], "ok")
        listing = daemon.ctr("snapshots", "--snapshotter", "late", "ls", namespace="late")
        self.assertEqual(listing.stdout.split()[3:5], ["k", "Active"], listing)

    def test_unknown_type_warns_and_is_skipped(self) -> None:
        daemon = manage(self, CdtwistDaemon(None, proxy_config("odd", "stream", "/nowhere.sock")))
        self.assertIn('proxy_plugins.odd: unknown proxy plugin type \\"stream\\", skipped', daemon.log())
        result = daemon.ctr("plugins", "ls", "id==odd")
        self.assertEqual(result.stdout.splitlines()[1:], [], result)


class ContainerdUsesServePluginTests(unittest.TestCase):
    """The real containerd 1.6.20 with ``[proxy_plugins]`` on a cdtwist serve-plugin socket."""

    def test_import_and_run(self) -> None:
        require_binaries(SHIM, RUNC)
        if not os.path.exists(ims.BUSYBOX):
            raise unittest.SkipTest(f"{ims.BUSYBOX} (busybox-static) is needed to build the test image")
        server = manage(self, PluginServerProcess("overlayfs"))
        containerd = manage(self, ContainerdDaemon(None, proxy_config(PROXY, "snapshot", server.address)))
        ns = unique("ctrd-proxy")
        row = plugin_row(containerd, "io.containerd.snapshotter.v1", PROXY)
        self.assertEqual(row[-1], "ok", row)
        result = containerd.ctr("images", "import", "--snapshotter", PROXY, image_tar(), namespace=ns, timeout=60)
        self.assertEqual(result.rc, 0, result)
        self.assertNotEqual(entries(os.path.join(server.root, "snapshots")), [])
        result = containerd.ctr(
            "run", "--rm", "--snapshotter", PROXY, IMAGE, unique("c"), "echo", "containerd on cdtwist",
            namespace=ns, timeout=60,
        )
        self.assertEqual((result.rc, result.stdout), (0, "containerd on cdtwist\n"), result)
        result = containerd.ctr("images", "rm", "--sync", IMAGE, namespace=ns)
        self.assertEqual(result.rc, 0, result)
        listing = containerd.ctr("snapshots", "--snapshotter", PROXY, "ls", namespace=ns)
        self.assertEqual(listing.stdout.splitlines()[1:], [], listing)


class ProxyContentTests(unittest.TestCase):
    """cdtwist whose content store is ``cdtwist serve-plugin content``."""

    def setUp(self) -> None:
        self.server = manage(self, PluginServerProcess("content"))
        self.daemon = manage(self, CdtwistDaemon(None, proxy_config("pcontent", "content", self.server.address)))
        self.ns = unique("pcontent")

    def blobs(self, root: str) -> list[str]:
        return entries(os.path.join(root, "blobs", "sha256"))

    def test_ingest_get_remove(self) -> None:
        self.assertEqual(plugin_row(self.daemon, "io.containerd.content.v1", "pcontent")[-1], "ok")
        data = os.urandom(3 << 20) + b"tail"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        rc, _, err = ctr_bytes(
            self.daemon, "content", "ingest", "--expected-digest", digest, "--expected-size", str(len(data)), "ref1",
            namespace=self.ns, data=data,
        )
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.blobs(self.server.root), [digest.split(":")[1]])
        self.assertEqual(self.blobs(os.path.join(self.daemon.root, "io.containerd.content.v1.content")), [])
        listing = self.daemon.ctr("content", "ls", "-q", namespace=self.ns)
        self.assertEqual(listing.stdout.split(), [digest], listing)
        rc, got, err = ctr_bytes(self.daemon, "content", "get", digest, namespace=self.ns)
        self.assertEqual((rc, got == data), (0, True), err)
        # Another namespace does not see it (metadata stays cdtwist's).
        other = self.daemon.ctr("content", "get", digest, namespace=self.ns + "-other")
        self.assertNotEqual(other.rc, 0)
        result = self.daemon.ctr("content", "rm", digest, namespace=self.ns)
        self.assertEqual(result.rc, 0, result)
        # A synchronous GC (deleting a lease with --sync) sweeps the peer's blob too.
        lease = self.daemon.ctr("leases", "create", namespace=self.ns).stdout.strip()
        self.assertEqual(self.daemon.ctr("leases", "rm", "--sync", lease, namespace=self.ns).rc, 0)
        self.assertEqual(self.blobs(self.server.root), [])

    def test_image_import_and_export_through_proxy(self) -> None:
        result = self.daemon.ctr("images", "import", "--no-unpack", image_tar(), namespace=self.ns, timeout=60)
        self.assertEqual(result.rc, 0, result)
        self.assertGreaterEqual(len(self.blobs(self.server.root)), 3)
        out = os.path.join(self.daemon.tmpdir, "export.tar")
        result = self.daemon.ctr("images", "export", out, IMAGE, namespace=self.ns, timeout=60)
        self.assertEqual(result.rc, 0, result)
        with tarfile.open(out) as tar:
            exported = {m.name.rsplit("/", 1)[-1] for m in tar.getmembers() if m.name.startswith("blobs/sha256/")}
        # Every exported blob came from the peer (which may also hold one the GC has yet to sweep).
        self.assertGreaterEqual(len(exported), 3)
        self.assertLessEqual(exported, set(self.blobs(self.server.root)))


class ProxyTLSTests(unittest.TestCase):
    """A proxy plugin dialling a TLS endpoint: client certificate presented, the peer's name checked."""

    def test_tls_peer_name_checked(self) -> None:
        tmp = short_tempdir("cdtpt")
        self.addCleanup(shutil.rmtree, tmp, True)
        pki = make_pki(tmp)
        port = free_tcp_port()
        server = manage(self, PluginServerProcess("native", args=[
            "--tcp-address", f"127.0.0.1:{port}", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
            "--tls-ca", pki.ca,
        ]))
        inner = f"tcp:host=127.0.0.1:port={port}"
        good = tls_client_description(inner, hostname="localhost", ca=pki.ca, cert=pki.client_cert,
                                      key=pki.client_key)
        wrong_name = tls_client_description(inner, hostname="elsewhere.example", ca=pki.ca, cert=pki.client_cert,
                                            key=pki.client_key)
        no_cert = tls_client_description(inner, hostname="localhost", ca=pki.ca)
        daemon = manage(self, CdtwistDaemon(
            None,
            proxy_config("tlsgood", "snapshot", good)
            + proxy_config("tlsname", "snapshot", wrong_name)
            + proxy_config("tlsnocert", "snapshot", no_cert),
        ))
        self.assertEqual(plugin_row(daemon, "io.containerd.snapshotter.v1", "tlsgood")[-1], "ok")
        result = daemon.ctr("snapshots", "--snapshotter", "tlsgood", "prepare", "over-tls", namespace="tls")
        self.assertEqual(result.rc, 0, result)
        listing = daemon.ctr("snapshots", "--snapshotter", "tlsgood", "ls", namespace="tls")
        self.assertIn("over-tls", listing.stdout, listing)
        for name in ("tlsname", "tlsnocert"):
            self.assertEqual(plugin_row(daemon, "io.containerd.snapshotter.v1", name)[-1], "error", name)
            result = daemon.ctr("snapshots", "--snapshotter", name, "prepare", "refused", namespace="tls")
            self.assertNotEqual(result.rc, 0, result)
            self.assertIn("unavailable", result.stderr, result)
        self.assertEqual(server.returncode, None)
