"""Tests for :mod:`cdtwist.snapshots.overlay` beyond the shared suite.

Ports ``snapshots/overlay/overlay_test.go`` (mount shapes and option order)
and pins the layout, usage, removal/cleanup, error texts and the support checks.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, NotFound
from cdtwist.mount import Mount, mount_all, unmount_all
from cdtwist.snapshots import Cleaner, Info, Kind, Usage, overlay
from cdtwist.snapshots import fs as sfs
from cdtwist.snapshots.overlay import UPPERDIR_KEY, OverlaySnapshotter
from cdtwist.snapshots.storage import DB_FILE
from tests.test_snapshots_suite import SnapshotterTestMixin


class OverlayTests(SnapshotterTestMixin, SynchronousTestCase):
    def make_snapshotter(self, root: str) -> OverlaySnapshotter:
        return OverlaySnapshotter(root)

    def setUp(self) -> None:
        super().setUp()
        os.umask(0o022)
        self.o: OverlaySnapshotter = self.sn  # type: ignore[assignment]

    def snapdir(self, *parts: str) -> str:
        return os.path.join(self.root, "snapshots", *parts)

    def test_options_detected(self) -> None:
        """On this host: index=off known, no user namespace, so no userxattr."""
        self.assertEqual(self.o.index_off, os.path.exists("/sys/module/overlay/parameters/index"))
        self.assertFalse(self.o.userxattr)
        self.assertFalse(overlay.running_in_user_ns())
        self.assertFalse(overlay.needs_userxattr(self.root))

    def test_mounts(self) -> None:
        mounts = self.o.prepare("/tmp/test", "")
        self.assertEqual(mounts, [Mount("bind", self.snapdir("1", "fs"), ["rw", "rbind"])])

    def test_commit(self) -> None:
        mounts = self.o.prepare("/tmp/test", "")
        with open(os.path.join(mounts[0].source, "foo"), "w") as f:
            f.write("hi")
        self.o.commit("base", "/tmp/test")

    def test_overlay_mount(self) -> None:
        self.o.prepare("/tmp/test", "")
        self.o.commit("base", "/tmp/test")
        mounts = self.o.prepare("/tmp/layer2", "base")
        expected = ["index=off"] if overlay.supports_index() else []
        expected += [
            "workdir=" + self.snapdir("2", "work"),
            "upperdir=" + self.snapdir("2", "fs"),
            "lowerdir=" + self.snapdir("1", "fs"),
        ]
        self.assertEqual(mounts, [Mount("overlay", "overlay", expected)])
        self.assertEqual(self.o.mounts("/tmp/layer2"), mounts)

    def test_overlay_read(self) -> None:
        mounts = self.o.prepare("/tmp/test", "")
        with open(os.path.join(mounts[0].source, "foo"), "w") as f:
            f.write("hi")
        self.o.commit("base", "/tmp/test")
        mounts = self.o.prepare("/tmp/layer2", "base")
        dest = self.mount(mounts, os.path.join(self.root, "dest"))
        with open(os.path.join(dest, "foo")) as f:
            self.assertEqual(f.read(), "hi")

    def test_view(self) -> None:
        """A one-layer view binds that layer read-only; deeper views list lowers top first."""
        mounts = self.o.prepare("/tmp/base", "")
        with open(os.path.join(mounts[0].source, "foo"), "w") as f:
            f.write("hi")
        self.o.commit("base", "/tmp/base")
        self.o.prepare("/tmp/top", "base")
        with open(self.snapdir("1", "fs", "foo"), "w") as f:
            f.write("hi, again")
        self.o.commit("top", "/tmp/top")

        self.assertEqual(self.o.view("/tmp/view1", "base"), [Mount("bind", self.snapdir("1", "fs"), ["ro", "rbind"])])
        mounts = self.o.view("/tmp/view2", "top")
        expected = ["index=off"] if overlay.supports_index() else []
        expected.append(f"lowerdir={self.snapdir('2', 'fs')}:{self.snapdir('1', 'fs')}")
        self.assertEqual(mounts, [Mount("overlay", "overlay", expected)])
        # A view without parent is an empty read-only bind of its own dir.
        self.assertEqual(self.o.view("/tmp/view3", ""), [Mount("bind", self.snapdir("5", "fs"), ["ro", "rbind"])])

    def test_layout(self) -> None:
        """snapshots/<id>/{fs,work} for active, fs only for views; the database beside them."""
        self.o.prepare("a", "")
        self.o.view("v", "")
        self.assertEqual(sorted(os.listdir(self.root)), [DB_FILE, DB_FILE + "-shm", DB_FILE + "-wal", "snapshots"])
        for name in (DB_FILE, DB_FILE + "-shm", DB_FILE + "-wal"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, name)).st_mode), 0o600, name)
        self.assertEqual(sorted(os.listdir(self.snapdir())), ["1", "2"])
        self.assertEqual(sorted(os.listdir(self.snapdir("1"))), ["fs", "work"])
        self.assertEqual(os.listdir(self.snapdir("2")), ["fs"])
        self.assertEqual(stat.S_IMODE(os.stat(self.snapdir("1", "fs")).st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(os.stat(self.snapdir("1", "work")).st_mode), 0o711)
        self.assertEqual(stat.S_IMODE(os.stat(self.snapdir()).st_mode), 0o700)

    def test_child_owned_like_parent(self) -> None:
        """The new upper dir takes the owner of the parent layer's root."""
        self.o.prepare("a", "")
        os.chown(self.snapdir("1", "fs"), 1234, 5678)
        self.o.commit("c", "a")
        self.o.prepare("b", "c")
        st = os.stat(self.snapdir("2", "fs"))
        self.assertEqual((st.st_uid, st.st_gid), (1234, 5678))

    def test_usage(self) -> None:
        """Active: walked now (blocks * 512, one count per inode); committed: what commit measured."""
        mounts = self.o.prepare("a", "")
        upper = mounts[0].source
        with open(os.path.join(upper, "data"), "wb") as f:
            f.write(b"x" * 10000)
        os.link(os.path.join(upper, "data"), os.path.join(upper, "data-link"))
        os.mkdir(os.path.join(upper, "d"))
        expected = Usage(
            inodes=3,
            size=sum(os.lstat(os.path.join(upper, p)).st_blocks * 512 for p in ("", "data", "d")),
        )
        self.assertEqual(self.o.usage("a"), expected)
        self.o.commit("c", "a")
        with open(os.path.join(upper, "later"), "wb") as f:
            f.write(b"y" * 5000)
        self.assertEqual(self.o.usage("c"), expected)
        self.o.view("v", "c")
        self.assertEqual(self.o.usage("v"), Usage())

    def test_usage_counts_whiteouts(self) -> None:
        self.check_snapshots(lambda root: open(os.path.join(root, "gone"), "w").close())
        [parent] = [i.name for i in self._walk() if i.kind == Kind.COMMITTED]
        mounts = self.o.prepare("child", parent)
        target = self.mount(mounts, os.path.join(self.work, "child"))
        os.unlink(os.path.join(target, "gone"))
        unmount_all(target)
        upper = self.snapdir(self.o._ms.view(lambda t: t.get_snapshot("child").id), "fs")  # type: ignore[arg-type]
        st = os.lstat(os.path.join(upper, "gone"))
        self.assertTrue(stat.S_ISCHR(st.st_mode))
        self.assertEqual(st.st_rdev, 0)
        self.assertEqual(self.o.usage("child").inodes, 2)

    def _walk(self, *filters: str) -> list[Info]:
        out: list[Info] = []
        self.o.walk(out.append, *filters)
        return out

    def test_upperdir_label(self) -> None:
        o = OverlaySnapshotter(os.path.join(self.tmp, "labelled"), upperdir_label=True)
        self.addCleanup(o.close)
        o.prepare("a", "", {"x": "1"})
        upper = os.path.join(self.tmp, "labelled", "snapshots", "1", "fs")
        self.assertEqual(o.stat("a").labels, {"x": "1", UPPERDIR_KEY: upper})
        updated = o.update(Info(name="a", labels={"y": "2"}))
        self.assertEqual(updated.labels, {"y": "2", UPPERDIR_KEY: upper})
        walked: list[Info] = []
        o.walk(walked.append)
        self.assertEqual(walked[0].labels, {"y": "2", UPPERDIR_KEY: upper})
        # The label is added after filtering, as in Go: it cannot be filtered on.
        walked.clear()
        o.walk(walked.append, f'labels."{UPPERDIR_KEY}"')
        self.assertEqual(walked, [])
        # Not stored.
        self.assertEqual(o._ms.view(lambda t: t.get_info("a")[1].labels), {"y": "2"})
        self.assertNotIn(UPPERDIR_KEY, self.o.prepare("plain", "", {"x": "1"}) and self.o.stat("plain").labels)

    def test_sync_remove(self) -> None:
        self.o.prepare("a", "")
        self.o.remove("a")
        self.assertEqual(os.listdir(self.snapdir()), [])

    def test_async_remove_and_cleanup(self) -> None:
        o = OverlaySnapshotter(os.path.join(self.tmp, "async"), async_remove=True)
        self.addCleanup(o.close)
        self.assertIsInstance(o, Cleaner)
        snapdir = os.path.join(self.tmp, "async", "snapshots")
        o.prepare("a", "")
        o.commit("c", "a")
        o.prepare("b", "c")
        o.remove("b")
        self.assertEqual(sorted(os.listdir(snapdir)), ["1", "2"])
        self.assertRaises(NotFound, o.stat, "b")
        os.makedirs(os.path.join(snapdir, "new-crashed", "fs"))  # a crash mid-prepare
        o.cleanup()
        self.assertEqual(os.listdir(snapdir), ["1"])
        o.prepare("b", "c")  # the key is free again, with a fresh id
        self.assertEqual(sorted(os.listdir(snapdir)), ["1", "3"])

    def test_cleanup_fresh_store(self) -> None:
        """As in Go, a store that never held a snapshot has no buckets: cleanup says so."""
        e = self.assertRaises(NotFound, self.o.cleanup)
        self.assertEqual(str(e), "bucket does not exist: not found")

    def test_errors(self) -> None:
        o = self.o
        o.prepare("a", "")
        o.view("v", "")
        e = self.assertRaises(AlreadyExists, o.prepare, "a", "")
        self.assertEqual(str(e), "failed to create snapshot: snapshot a: already exists")
        e = self.assertRaises(NotFound, o.prepare, "b", "missing")
        self.assertEqual(str(e), 'failed to create snapshot: missing parent "missing" bucket: not found')
        e = self.assertRaises(FailedPrecondition, o.commit, "c", "v")
        self.assertEqual(str(e), 'failed to commit snapshot: snapshot "v" is not active: failed precondition')
        e = self.assertRaises(NotFound, o.commit, "c", "missing")
        self.assertEqual(str(e), "snapshot does not exist: not found")
        e = self.assertRaises(NotFound, o.remove, "missing")
        self.assertEqual(str(e), "failed to remove: snapshot missing: not found")
        e = self.assertRaises(NotFound, o.mounts, "missing")
        self.assertEqual(str(e), "failed to get active mount: snapshot does not exist: not found")
        o.commit("c", "a")
        e = self.assertRaises(FailedPrecondition, o.mounts, "c")
        self.assertEqual(
            str(e), "failed to get active mount: requested snapshot c not active or view: failed precondition"
        )
        e = self.assertRaises(NotFound, o.stat, "missing")
        self.assertEqual(str(e), "snapshot does not exist: not found")
        # Failed prepares leave no temporary directory behind.
        self.assertEqual(sorted(os.listdir(self.snapdir())), ["1", "2"])

    def test_reopen(self) -> None:
        """A new engine on the same root sees the same snapshots and mounts."""
        self.o.prepare("a", "")
        self.o.commit("c", "a")
        self.o.prepare("b", "c", {"l": "v"})
        mounts = self.o.mounts("b")
        self.o.close()
        again = OverlaySnapshotter(self.root)
        self.addCleanup(again.close)
        self.assertEqual(again.mounts("b"), mounts)
        self.assertEqual(again.stat("b").labels, {"l": "v"})


class SupportTests(SynchronousTestCase):
    def test_supported_here(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("requires root")
        root = os.path.abspath(self.mktemp())
        overlay.supported(root)
        self.assertEqual(os.listdir(root), [])
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700)
        self.assertTrue(sfs.supports_d_type(root))

    def test_unsupported_reasons(self) -> None:
        root = os.path.abspath(self.mktemp())
        self.patch(sfs, "supports_d_type", lambda d: False)
        e = self.assertRaises(overlay.OverlayUnsupported, overlay.supported, root)
        self.assertEqual(
            str(e),
            f"{root} does not support d_type. If the backing filesystem is xfs, "
            "please reformat with ftype=1 to enable d_type support",
        )
        e = self.assertRaises(CdtwistError, OverlaySnapshotter, root)
        self.assertIn("does not support d_type", str(e))

    def test_mount_failure_reason(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)

        def refuse(self: Mount, target: str) -> None:
            raise OSError(19, os.strerror(19), target)

        self.patch(Mount, "mount", refuse)
        e = self.assertRaises(overlay.OverlayUnsupported, overlay.supported, root)
        self.assertEqual(str(e), "failed to mount overlay: no such device")
        self.assertEqual(os.listdir(root), [])

    def test_user_namespace_detection(self) -> None:
        self.assertFalse(overlay.running_in_user_ns())
        self.assertTrue(overlay._kernel_at_least(5, 11))
        self.assertFalse(overlay._kernel_at_least(99, 0))

    def test_mount_all_roundtrip(self) -> None:
        """The mounts an engine returns are plain data: mount_all takes them as they are."""
        if os.geteuid() != 0:
            raise SkipTest("requires root")
        tmp = os.path.abspath(self.mktemp())
        o = OverlaySnapshotter(os.path.join(tmp, "root"))
        self.addCleanup(o.close)
        target = os.path.join(tmp, "t")
        os.makedirs(target)
        mount_all(o.prepare("a", ""), target)
        unmount_all(target)
