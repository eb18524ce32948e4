"""Issue 5 acceptance: a registry round trip with the real ``ctr``, on cdtwist and containerd.

Each scenario starts its own Debian ``docker-registry`` (``docker-registry
serve``) on 127.0.0.1 and a free port, storage in a temp dir; the daemon
imports a test image, ``ctr images push --plain-http`` pushes it, the
image is removed locally (``rm --sync``: its blobs and snapshots go), and
``ctr images pull --plain-http`` brings it back, unpacked with overlayfs or
native and usable as a root filesystem (busybox runs in it under chroot).
Both daemons run the same commands against their own registry and the
outputs are compared (progress times, the registry's port and the
daemons' temp paths normalised).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial import unittest

from tests.integration import images_support as images
from tests.integration.harness import (
    DaemonProcess,
    Result,
    free_tcp_port,
    make_short_tmpdir,
    module_suite,
    shared_daemons,
)
from tests.integration.images_support import (
    BIG_NAMES,
    SMALL_NAMES,
    CtrCase,
    all_layout,
    chroot_report,
    normalise,
    run_ctr,
    small_layout,
    strip_dir_mtimes,
)

CDTWIST, CONTAINERD_D = shared_daemons()


def test_suite() -> unittest.TestSuite:
    """trial's hook: this module's tests share :data:`CDTWIST` and :data:`CONTAINERD_D`."""
    return module_suite(__name__, CDTWIST, CONTAINERD_D)


REGISTRY_BINARY = "docker-registry"
MANIFEST_TYPES = ", ".join(
    [
        images.OCI_MANIFEST,
        images.OCI_INDEX,
        images.DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: what ctr's progress poller logs when the transfer ends between two polls
_POLL_RACE = re.compile(
    r'(?m)^time="[^"]*" level=error msg="(failed to get content info|active check failed)" error="context canceled"\n'
)
#: direct connections only: the registry is on the loopback
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Registry:
    """Debian's ``docker-registry serve`` on 127.0.0.1:<free port>, storage under its own temp dir."""

    def __init__(self) -> None:
        self.tmpdir = make_short_tmpdir("cdtreg")
        self.port = free_tcp_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config = os.path.join(self.tmpdir, "config.yml")
        self.log_path = os.path.join(self.tmpdir, "registry.log")
        with open(self.config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {os.path.join(self.tmpdir, 'storage')}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n  secret: cdtwist-tests\n"
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Registry:
        """Spawn the registry; return once ``/v2/`` answers 200."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [shutil.which(REGISTRY_BINARY) or REGISTRY_BINARY, "serve", self.config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/v2/")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"docker-registry not serving on {self.host} after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def request(self, method: str, path: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one HTTP request to the registry."""
        req = urllib.request.Request(f"http://{self.host}{path}", method=method)
        if accept:
            req.add_header("Accept", accept)
        try:
            with _OPENER.open(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def manifest_digest(self, repo: str, reference: str) -> str | None:
        """The digest the registry serves for ``repo:reference`` (None if it has none)."""
        status, headers, _ = self.request("HEAD", f"/v2/{repo}/manifests/{reference}", MANIFEST_TYPES)
        return headers.get("Docker-Content-Digest") if status == 200 else None

    def blob(self, repo: str, digest: str) -> bytes | None:
        status, _, body = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        return body if status == 200 else None

    def holds(self, repo: str, image: images.Image) -> bool:
        """The registry serves ``image``'s manifest, config and layers byte for byte."""
        status, _, body = self.request("GET", f"/v2/{repo}/manifests/{image.manifest.digest}", MANIFEST_TYPES)
        if status != 200 or body != image.manifest.read():
            return False
        return all(self.blob(repo, b.digest) == b.read() for b in [image.config] + [x.blob for x in image.layers])

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), then remove the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def progress(result: Result, daemon: DaemonProcess, registry: Registry) -> tuple[int, list[str], str]:
    """A push/pull result: its last progress frame, sorted (transfers run in parallel), and what follows it.

    ``ctr`` redraws its progress table every 100 ms: how many frames it
    prints depends on timing, only the last one says how the transfer ended.
    Colours, padding and timings are dropped, the registry's address placeholdered.
    """
    frames: list[list[str]] = [[]]
    for line in _ANSI.sub("", result.stdout).replace(registry.host, "<REGISTRY>").splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if line.startswith("elapsed:"):
            frames.append([])
        elif line:
            frames[-1].append(re.sub(r"^done: \S+$", "done: <T>", line))
    last = sorted(frames[-2]) if len(frames) > 1 else []
    stderr = _POLL_RACE.sub("", result.stderr)
    return result.rc, last + frames[-1], normalise(stderr.replace(registry.host, "<REGISTRY>"), daemon)


class _RegistryCase(CtrCase):
    shared = (CDTWIST, CONTAINERD_D)

    def setUp(self) -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            raise unittest.SkipTest(f"{REGISTRY_BINARY} not found on PATH (Debian package docker-registry)")
        super().setUp()

    def registry(self) -> Registry:
        registry = Registry()
        self.addCleanup(registry.stop)
        return registry.start()


class OverlayfsRegistryTests(_RegistryCase):
    """Push, remove, pull back with ``--snapshotter overlayfs``; mounted with ``ctr images mount``."""

    snapshotter = "overlayfs"
    #: the 100 MiB image makes the trip too (once: overlayfs only)
    with_big = True

    def test_push_rm_pull_round_trip(self) -> None:
        small, big = images.small_image(), images.big_image()
        layout = all_layout() if self.with_big else small_layout()
        names = SMALL_NAMES + (BIG_NAMES if self.with_big else [])
        sn = self.snapshotter

        def scenario(d: DaemonProcess, ns: str) -> list[Any]:
            registry = self.registry()

            def c(*args: str) -> tuple[int, str, str]:
                rc, stdout, stderr = self.c(d, ns, *args)
                return rc, stdout.replace(registry.host, "<REGISTRY>"), stderr.replace(registry.host, "<REGISTRY>")

            remote = f"{registry.host}/cdtwist-tests/small:1"
            remote_big = f"{registry.host}/cdtwist-tests/big:1"
            self.ok(d, ns, "images", "import", "--no-unpack", layout)
            push = run_ctr(d, "images", "push", "--plain-http", remote, "small:2", namespace=ns)
            out: list[Any] = [progress(push, d, registry)]
            if self.with_big:
                push = run_ctr(d, "images", "push", "--plain-http", remote_big, BIG_NAMES[0], namespace=ns)
                out.append(progress(push, d, registry))
            # the registry holds exactly the image's manifest and blobs
            out.append(registry.manifest_digest("cdtwist-tests/small", "1"))
            out.append(registry.holds("cdtwist-tests/small", small))
            if self.with_big:
                out.append(registry.manifest_digest("cdtwist-tests/big", "1"))
            out.append(c("images", "rm", "--sync", *names))
            out.append(c("content", "ls", "-q"))
            out.append(c("snapshots", "--snapshotter", sn, "ls"))
            pull = run_ctr(d, "images", "pull", "--plain-http", "--snapshotter", sn, remote, namespace=ns)
            out.append(progress(pull, d, registry))
            if self.with_big:
                pull = run_ctr(d, "images", "pull", "--plain-http", "--snapshotter", sn, remote_big, namespace=ns)
                out.append(progress(pull, d, registry))
            out += [
                c("images", "ls"),
                c("images", "check", "--snapshotter", sn),
                c("snapshots", "--snapshotter", sn, "ls"),
                progress(run_ctr(d, "images", "pull", "--plain-http", remote + "-missing", namespace=ns), d, registry),
            ]
            for image, ref in [(small, remote)] + ([(big, remote_big)] if self.with_big else []):
                out.append(self.rootfs(d, ns, image, ref))
            return out

        out = self.compare(scenario)
        i = 2 if self.with_big else 1
        self.assertEqual(out[0][0], 0, out[0])
        self.assertEqual(out[i], small.manifest.digest)
        self.assertTrue(out[i + 1], "the registry does not serve the image as pushed")
        if self.with_big:
            self.assertEqual(out[i + 2], big.manifest.digest)
        busybox = out[-2 if self.with_big else -1][1]
        self.assertEqual(busybox[0], 0, busybox)
        self.assertIn("deleted-is-gone", busybox[1])

    def rootfs(self, d: DaemonProcess, ns: str, image: images.Image, ref: str) -> Any:
        """The pulled image mounted: exactly the layers' files, and busybox runs in it."""
        target = self.target(d, f"{ns}-{image.chain_id[7:19]}")
        result = self.c(d, ns, "images", "mount", ref, target)
        try:
            got = images.scan_tree(target)
            self.assert_tree(d, got, image.expected_tree())
            return result, chroot_report(target), self.c(d, ns, "images", "unmount", "--rm", target)
        finally:
            images.unmount_all(target)


class NativeRegistryTests(OverlayfsRegistryTests):
    """The same trip pulled with ``--snapshotter native``; viewed through the snapshots API and bind-mounted.

    (``ctr images mount`` of ctr 1.6 reads ``--snapshotter`` as a global
    flag that does not exist, so it always unpacks and mounts with overlayfs.)
    """

    snapshotter = "native"
    with_big = False

    def rootfs(self, d: DaemonProcess, ns: str, image: images.Image, ref: str) -> Any:
        target = self.target(d, f"{ns}-{image.chain_id[7:19]}")
        mounts = self.view(d, ns, "native", "rootfs", image.chain_id)
        images.mount_all(mounts, target)
        try:
            got = strip_dir_mtimes(images.scan_tree(target))
            self.assert_tree(d, got, strip_dir_mtimes(image.expected_tree()))
            return normalise(repr(mounts), d), chroot_report(target)
        finally:
            images.unmount_all(target)
            self.ok(d, ns, "snapshots", "--snapshotter", "native", "rm", "rootfs")
