"""Bundles on disk, laid out and removed as containerd's runtime/v2/bundle.go does."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import CdtwistError, InvalidArgument
from cdtwist.runtime.bundle import (
    Bundle,
    load_bundle,
    new_bundle,
    read_address,
    remapped_gid,
    socket_path,
)
from tests.test_runtime_shim import short_tmpdir

SPEC = json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh"]}}).encode()


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class NewBundleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = short_tmpdir(self)
        self.root = os.path.join(self.dir, "root", "io.containerd.runtime.v2.task")
        self.state = os.path.join(self.dir, "state", "io.containerd.runtime.v2.task")

    def test_layout(self) -> None:
        old = os.umask(0o022)
        try:
            b = new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        finally:
            os.umask(old)
        self.assertEqual(b, Bundle(id="c1", path=os.path.join(self.state, "ns1", "c1"), namespace="ns1"))
        work = os.path.join(self.root, "ns1", "c1")
        self.assertEqual(_mode(b.path), 0o700)
        self.assertEqual(_mode(os.path.dirname(b.path)), 0o711)
        self.assertEqual(_mode(b.rootfs), 0o711)
        self.assertEqual(_mode(work), 0o711)
        self.assertEqual(_mode(os.path.dirname(work)), 0o711)
        self.assertEqual(os.readlink(os.path.join(b.path, "work")), work)
        with open(b.file("config.json"), "rb") as f:
            self.assertEqual(f.read(), SPEC)
        self.assertEqual(_mode(b.file("config.json")), 0o644)  # 0666 under the umask
        self.assertEqual(sorted(os.listdir(b.path)), ["config.json", "rootfs", "work"])

    def test_existing_bundle_is_an_error(self) -> None:
        b = new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        with self.assertRaises(CdtwistError) as e:
            new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        self.assertEqual(str(e.exception), f"mkdir {b.path}: file exists")
        # the live bundle is untouched
        self.assertTrue(os.path.exists(b.file("config.json")))

    def test_stale_work_dir_is_replaced(self) -> None:
        work = os.path.join(self.root, "ns1", "c1")
        os.makedirs(work)
        with open(os.path.join(work, "old"), "w") as f:
            f.write("x")
        new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        self.assertEqual(os.listdir(work), [])

    def test_invalid_id(self) -> None:
        with self.assertRaises(InvalidArgument) as e:
            new_bundle(self.root, self.state, "ns1", "bad/id", SPEC)
        self.assertEqual(
            str(e.exception),
            'invalid task id bad/id: identifier "bad/id" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: '
            "invalid argument",
        )
        self.assertFalse(os.path.exists(self.state))

    def test_user_namespace_gid(self) -> None:
        spec = {"linux": {"gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]}}
        self.assertEqual(remapped_gid(json.dumps(spec).encode()), 100000)
        self.assertEqual(remapped_gid(SPEC), 0)
        self.assertEqual(remapped_gid(json.dumps({"linux": {}}).encode()), 0)
        if os.geteuid() != 0:
            return
        b = new_bundle(self.root, self.state, "ns1", "c2", json.dumps(spec).encode())
        st = os.stat(b.path)
        self.assertEqual((st.st_gid, stat.S_IMODE(st.st_mode)), (100000, 0o710))

    def test_bad_spec_leaves_nothing(self) -> None:
        with self.assertRaises(CdtwistError):
            new_bundle(self.root, self.state, "ns1", "c1", b"{not json")
        self.assertEqual(os.listdir(os.path.join(self.state, "ns1")), [])


class DeleteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = short_tmpdir(self)
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")

    def test_delete_removes_bundle_and_work(self) -> None:
        b = new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        with open(b.file("address"), "w") as f:
            f.write("unix:///run/x")
        b.delete()
        self.assertEqual(os.listdir(os.path.join(self.state, "ns1")), [])
        self.assertEqual(os.listdir(os.path.join(self.root, "ns1")), [])
        b.delete()  # twice is fine

    def test_delete_unmounts_rootfs(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("mounting needs root")
        b = new_bundle(self.root, self.state, "ns1", "c1", SPEC)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", b.rootfs], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", b.rootfs], check=True)  # stacked twice
        self.addCleanup(subprocess.run, ["umount", "-R", b.rootfs], capture_output=True)
        with open(os.path.join(b.rootfs, "file"), "w") as f:
            f.write("in the mount")
        b.delete()
        self.assertFalse(os.path.exists(b.path))
        with open("/proc/self/mountinfo") as f:
            self.assertNotIn(b.rootfs, f.read())

    def test_load_bundle(self) -> None:
        b = load_bundle(self.state, "ns1", "c1")
        self.assertEqual(b.path, os.path.join(self.state, "ns1", "c1"))
        self.assertEqual(b.namespace, "ns1")


class AddressTests(SynchronousTestCase):
    def test_read_address(self) -> None:
        d = short_tmpdir(self)
        b = Bundle(id="c1", path=d, namespace="ns1")
        with open(b.file("address"), "w") as f:
            f.write("unix:///run/containerd/s/abc")
        self.assertEqual(read_address(b), "unix:///run/containerd/s/abc")
        with open(b.file("address"), "w"):
            pass
        with self.assertRaises(CdtwistError) as e:
            read_address(b)
        self.assertEqual(str(e.exception), "no shim address")

    def test_socket_path(self) -> None:
        self.assertEqual(socket_path("unix:///run/containerd/s/abc"), "/run/containerd/s/abc")
        self.assertEqual(socket_path("/containerd-shim/abc.sock"), "\0/containerd-shim/abc.sock")
