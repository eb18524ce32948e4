"""Tests for :mod:`cdtwist.snapshots.native` and the copy it relies on (:mod:`cdtwist.snapshots.fs`)."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, NotFound
from cdtwist.mount import Mount
from cdtwist.snapshots import Cleaner, Kind, Usage
from cdtwist.snapshots import fs as sfs
from cdtwist.snapshots.native import NativeSnapshotter
from tests.test_snapshots_suite import (
    apply_all,
    check_directory_equal,
    chown,
    chtimes,
    create_dir,
    create_file,
    link,
    mknod,
    set_xattr,
    symlink,
)

T1 = 1_600_000_000_123_456_789
T2 = 1_500_000_000_987_654_321

#: A layer with every kind of entry the copy must keep.
EVERYTHING = apply_all(
    create_dir("/etc", 0o755),
    create_file("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
    create_file("/etc/shadow", b"secret", 0o600),
    chown("/etc/shadow", 0, 42),
    create_dir("/bin", 0o755),
    create_file("/bin/su", b"\x7fELF", 0o4755),
    create_file("/bin/sgid", b"\x7fELF", 0o2711),
    create_dir("/tmp", 0o1777),
    create_dir("/home/user/empty", 0o700),
    chown("/home/user", 1000, 1000),
    chown("/home/user/empty", 1000, 100),
    create_file("/home/user/a", b"linked", 0o640),
    link("/home/user/a", "/home/user/b"),
    link("/home/user/a", "/etc/c"),
    symlink("../etc/passwd", "/bin/rel-link"),
    symlink("/does/not/exist", "/bin/dangling"),
    chown("/bin/dangling", 7, 8),
    create_dir("/dev", 0o755),
    mknod("/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
    mknod("/dev/loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9)),
    mknod("/dev/fifo", stat.S_IFIFO | 0o620),
    set_xattr("/etc/passwd", "user.note", b"hello"),
    set_xattr("/bin", "trusted.overlay.opaque", b"y"),
    set_xattr("/bin/dangling", "trusted.link", b"l"),
    chtimes("/etc/passwd", T2, T1),
    chtimes("/bin/dangling", T2, T1),
    chtimes("/home/user/empty", T2, T1),
    chtimes("/etc", T2, T1),
)


def _xattrs(path: str) -> dict[str, bytes]:
    return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}


class CopyDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.tmp, "src")
        self.dst = os.path.join(self.tmp, "dst")
        os.makedirs(self.src)
        os.chmod(self.src, 0o751)
        old = os.umask(0o077)  # the copy must not depend on the umask
        self.addCleanup(os.umask, old)

    def test_everything_kept(self) -> None:
        EVERYTHING(self.src)
        os.mknod(os.path.join(self.src, "sock"), stat.S_IFSOCK | 0o755)
        sfs.copy_dir(self.dst, self.src)
        # Times first: reading the tree below moves atimes (relatime).
        for rel in ("etc/passwd", "bin/dangling", "home/user/empty", "etc"):
            st = os.lstat(os.path.join(self.dst, rel))
            self.assertEqual((st.st_mtime_ns, st.st_atime_ns), (T1, T2), rel)
        check_directory_equal(self.src, self.dst)
        self.assertEqual(stat.S_IMODE(os.stat(self.dst).st_mode), 0o751)
        self.assertTrue(stat.S_ISSOCK(os.lstat(os.path.join(self.dst, "sock")).st_mode))
        for rel in ("etc/passwd", "bin", "bin/dangling"):
            self.assertEqual(_xattrs(os.path.join(self.dst, rel)), _xattrs(os.path.join(self.src, rel)), rel)
        a = os.stat(os.path.join(self.dst, "home/user/a"))
        self.assertEqual(a.st_nlink, 3)
        self.assertEqual(a.st_ino, os.stat(os.path.join(self.dst, "etc/c")).st_ino)
        self.assertNotEqual(a.st_ino, os.stat(os.path.join(self.src, "home/user/a")).st_ino)
        self.assertEqual(os.readlink(os.path.join(self.dst, "bin/rel-link")), "../etc/passwd")

    def test_into_existing_dir(self) -> None:
        os.makedirs(self.dst)
        os.chmod(self.src, 0o700)
        sfs.copy_dir(self.dst, self.src)
        self.assertEqual(stat.S_IMODE(os.stat(self.dst).st_mode), 0o700)

    def test_errors(self) -> None:
        path = os.path.join(self.tmp, "file")
        open(path, "w").close()
        e = self.assertRaises(CdtwistError, sfs.copy_dir, self.dst, path)
        self.assertEqual(str(e), f"source {path} is not directory")
        e = self.assertRaises(CdtwistError, sfs.copy_dir, path, self.src)
        self.assertEqual(str(e), f"cannot copy to non-directory: {path}")

    def test_xattr_errors_handler(self) -> None:
        create_file("/f", b"", 0o644)(self.src)
        set_xattr("/f", "user.x", b"1")(self.src)
        calls = []

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError(95, "Operation not supported")

        self.patch(os, "setxattr", refuse)
        e = self.assertRaises(CdtwistError, sfs.copy_dir, os.path.join(self.tmp, "d1"), self.src)
        self.assertIn('failed to set xattr "user.x"', str(e))
        sfs.copy_dir(os.path.join(self.tmp, "d2"), self.src, lambda d, s, k, err: calls.append(k))
        self.assertEqual(calls, ["user.x"])

    def test_disk_usage(self) -> None:
        create_file("/big", b"z" * 100_000, 0o644)(self.src)
        link("/big", "/big2")(self.src)
        symlink("big", "/sym")(self.src)
        usage = sfs.disk_usage(self.src)
        self.assertEqual(usage.inodes, 3)
        self.assertEqual(
            usage.size, sum(os.lstat(os.path.join(self.src, p)).st_blocks * 512 for p in ("", "big", "sym"))
        )
        e = self.assertRaises(CdtwistError, sfs.disk_usage, os.path.join(self.tmp, "nope"))
        self.assertEqual(str(e), f"lstat {os.path.join(self.tmp, 'nope')}: no such file or directory")


class NativeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.n = NativeSnapshotter(self.root)
        self.addCleanup(self.n.close)

    def snapdir(self, *parts: str) -> str:
        return os.path.join(self.root, "snapshots", *parts)

    def test_not_a_cleaner(self) -> None:
        """As in containerd, native frees space in remove itself."""
        self.assertNotIsInstance(self.n, Cleaner)

    def test_mounts(self) -> None:
        n = self.n
        self.assertEqual(n.prepare("a", ""), [Mount("bind", self.snapdir("1"), ["rbind", "rw"])])
        self.assertEqual(n.view("v0", ""), [Mount("bind", self.snapdir("2"), ["rbind", "ro"])])
        n.commit("c", "a")
        self.assertEqual(n.prepare("b", "c"), [Mount("bind", self.snapdir("3"), ["rbind", "rw"])])
        # A view of a committed snapshot binds the parent: no directory of its own.
        self.assertEqual(n.view("v", "c"), [Mount("bind", self.snapdir("1"), ["rbind", "ro"])])
        self.assertEqual(sorted(os.listdir(self.snapdir())), ["1", "2", "3"])
        self.assertEqual(n.mounts("v"), [Mount("bind", self.snapdir("1"), ["rbind", "ro"])])
        self.assertEqual(stat.S_IMODE(os.stat(self.snapdir("1")).st_mode), 0o755)

    def test_child_is_a_full_copy(self) -> None:
        """Everything of the parent layer, hard links within the child included; the parent stays untouched."""
        self.n.prepare("a", "")
        EVERYTHING(self.snapdir("1"))
        self.n.commit("c", "a")
        self.n.prepare("b", "c")
        check_directory_equal(self.snapdir("1"), self.snapdir("2"))
        with open(self.snapdir("2", "home/user/b"), "ab") as f:
            f.write(b" changed")
        with open(self.snapdir("2", "etc/c"), "rb") as f:
            self.assertEqual(f.read(), b"linked changed")
        with open(self.snapdir("1", "home/user/a"), "rb") as f:
            self.assertEqual(f.read(), b"linked")
        st = os.lstat(self.snapdir("2", "bin/dangling"))
        self.assertEqual((st.st_uid, st.st_gid, st.st_mtime_ns), (7, 8, T1))

    def test_usage(self) -> None:
        self.n.prepare("a", "")
        create_file("/f", b"q" * 8192, 0o644)(self.snapdir("1"))
        expected = sfs.disk_usage(self.snapdir("1"))
        self.assertEqual(self.n.usage("a"), expected)
        self.n.commit("c", "a")
        self.assertEqual(self.n.usage("c"), expected)
        # An active child holds a full copy, and is measured so.
        self.n.prepare("b", "c")
        self.assertEqual(self.n.usage("b").inodes, 2)
        self.n.view("v", "c")
        self.assertEqual(self.n.usage("v"), Usage())

    def test_remove(self) -> None:
        self.n.prepare("a", "")
        self.n.commit("c", "a")
        self.n.view("v", "c")
        self.n.prepare("b", "c")
        self.assertRaises(FailedPrecondition, self.n.remove, "c")
        self.n.remove("v")  # no directory of its own
        self.n.remove("b")
        self.assertEqual(os.listdir(self.snapdir()), ["1"])
        self.n.remove("c")
        self.assertEqual(os.listdir(self.snapdir()), [])

    def test_remove_failed_commit_restores(self) -> None:
        """The directory is renamed inside the transaction and put back when the commit fails."""
        self.n.prepare("a", "")
        from cdtwist.snapshots import storage

        def fail(self: storage.Transaction) -> None:
            self.rollback()
            raise CdtwistError("disk full")

        self.patch(storage.Transaction, "commit", fail)
        e = self.assertRaises(CdtwistError, self.n.remove, "a")
        self.assertEqual(str(e), "failed to commit: disk full")
        self.assertEqual(os.listdir(self.snapdir()), ["1"])

    def test_errors(self) -> None:
        n = self.n
        n.prepare("a", "")
        e = self.assertRaises(AlreadyExists, n.view, "a", "")
        self.assertEqual(str(e), "failed to create snapshot: snapshot a: already exists")
        e = self.assertRaises(NotFound, n.mounts, "x")
        self.assertEqual(str(e), "failed to get snapshot mount: snapshot does not exist: not found")
        n.commit("c", "a")
        n.view("v", "c")
        # Go measures the view's (missing) directory before refusing the commit.
        e = self.assertRaises(CdtwistError, n.commit, "c2", "v")
        self.assertEqual(type(e), CdtwistError)
        self.assertEqual(str(e), f"lstat {self.snapdir('2')}: no such file or directory")
        n.view("v2", "")
        e = self.assertRaises(FailedPrecondition, n.commit, "c2", "v2")
        self.assertEqual(str(e), 'failed to commit snapshot: snapshot "v2" is not active: failed precondition')
        self.assertEqual(sorted(os.listdir(self.snapdir())), ["1", "3"])
        self.assertEqual(n.stat("v").kind, Kind.VIEW)
