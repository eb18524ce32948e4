"""Tests for :mod:`cdtwist.mount` (ports of containerd's ``mount`` tests, plus real mounts)."""

from __future__ import annotations

import errno
import os
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cdtwist import mount as m
from cdtwist.errors import CdtwistError, NotFound
from cdtwist.mount import (
    MS_BIND,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    Mount,
    compact_lowerdir_option,
    lookup,
    mount_all,
    mounted_under,
    parse_mount_options,
    readonly_mounts,
    unmount,
    unmount_all,
    with_readonly_temp_mount,
    with_temp_mount,
)


class OptionTests(SynchronousTestCase):
    def test_longest_common_prefix(self) -> None:
        for given, expected in [
            ([], ""),
            (["foo"], "foo"),
            (["foo", "bar"], ""),
            (["foo", "foo"], "foo"),
            (["foo", "foobar"], "foo"),
            (["foo", "", "foobar"], ""),
        ]:
            self.assertEqual(m._longest_common_prefix(given), expected, given)

    def test_compact_lowerdir_option(self) -> None:
        for opts, common, new in [
            (["workdir=a"], "", ["workdir=a"]),
            (["workdir=a", "lowerdir=b"], "", ["workdir=a", "lowerdir=b"]),
            (["lowerdir=/snapshots/1/fs:/snapshots/10/fs"], "/snapshots/", ["lowerdir=1/fs:10/fs"]),
            (
                ["lowerdir=/snapshots/1/fs:/snapshots/10/fs:/snapshots/2/fs"],
                "/snapshots/",
                ["lowerdir=1/fs:10/fs:2/fs"],
            ),
            (
                ["lowerdir=/snapshots/1/fs:/other_snapshots/1/fs"],
                "",
                ["lowerdir=/snapshots/1/fs:/other_snapshots/1/fs"],
            ),
            # lowerdir moves last, as in Go.
            (
                ["index=off", "lowerdir=/r/s/1/fs:/r/s/2/fs", "upperdir=/r/s/3/fs"],
                "/r/s/",
                ["index=off", "upperdir=/r/s/3/fs", "lowerdir=1/fs:2/fs"],
            ),
        ]:
            self.assertEqual(compact_lowerdir_option(opts), (common, new), opts)

    def test_parse_mount_options(self) -> None:
        self.assertEqual(parse_mount_options(["rbind", "ro"]), (MS_BIND | MS_REC | MS_RDONLY, "", False))
        self.assertEqual(parse_mount_options(["ro", "rw", "nosuid"]), (MS_NOSUID, "", False))
        self.assertEqual(parse_mount_options(["lowerdir=/a", "index=off"]), (0, "lowerdir=/a,index=off", False))
        # Go's table maps "defaults" to no flag, so it falls through to the data, as there.
        self.assertEqual(parse_mount_options(["defaults"]), (0, "defaults", False))
        self.assertEqual(parse_mount_options(["loop"]), (0, "", True))

    def test_readonly_mounts(self) -> None:
        """mount_test.go's TestReadonlyMounts."""
        self.assertEqual(readonly_mounts([]), [])
        self.assertEqual(
            readonly_mounts(
                [
                    Mount(
                        "overlay",
                        "overlay",
                        [
                            "index=off",
                            "workdir=/path/to/snapshots/4/work",
                            "upperdir=/path/to/snapshots/4/fs",
                            "lowerdir=/path/to/snapshots/1/fs",
                        ],
                    ),
                    Mount("overlay", "overlay", ["index=on", "lowerdir=/another/path/to/snapshots/2/fs"]),
                ]
            ),
            [
                Mount("overlay", "overlay", ["index=off", "lowerdir=/path/to/snapshots/4/fs:/path/to/snapshots/1/fs"]),
                Mount("overlay", "overlay", ["index=on", "lowerdir=/another/path/to/snapshots/2/fs"]),
            ],
        )
        given = [
            Mount("mount-without-rw", "", ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l"]),
            Mount("mount-with-rw", "", ["an-option=a-value", "another_opt=/another/value", "rw"]),
            Mount("mount-with-ro", "", ["an-option=a-value", "another_opt=/another/value", "ro"]),
        ]
        self.assertEqual(
            readonly_mounts(given),
            [
                Mount("mount-without-rw", "", ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l", "ro"]),
                Mount("mount-with-rw", "", ["an-option=a-value", "another_opt=/another/value", "ro"]),
                Mount("mount-with-ro", "", ["an-option=a-value", "another_opt=/another/value", "ro"]),
            ],
        )
        self.assertEqual(given[1].options[-1], "rw", "the input is left alone")


class RealMountTests(SynchronousTestCase):
    """mount(2) for real: binds, read-only remounts, overlays with very long lowerdir lists."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("requires root")
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.addCleanup(self._no_mounts_left)

    def _no_mounts_left(self) -> None:
        left = mounted_under(self.tmp)
        for target in left:
            unmount(target, m.MNT_DETACH)
        self.assertEqual(left, [])

    def _dir(self, *parts: str) -> str:
        path = os.path.join(self.tmp, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def test_bind_rw_and_ro(self) -> None:
        src = self._dir("src")
        with open(os.path.join(src, "hi"), "w") as f:
            f.write("hello")
        rw, ro = self._dir("rw"), self._dir("ro")
        mount_all([Mount("bind", src, ["rbind", "rw"])], rw)
        mount_all([Mount("bind", src, ["ro", "rbind"])], ro)
        try:
            with open(os.path.join(rw, "new"), "w") as f:
                f.write("x")
            with open(os.path.join(ro, "hi")) as f:
                self.assertEqual(f.read(), "hello")
            e = self.assertRaises(OSError, open, os.path.join(ro, "other"), "w")
            self.assertEqual(e.errno, errno.EROFS)
            self.assertTrue(os.path.exists(os.path.join(src, "new")))
        finally:
            unmount_all(rw)
            unmount_all(ro)

    def test_unmount_all_stacked(self) -> None:
        a, b, target = self._dir("a"), self._dir("b"), self._dir("t")
        mount_all([Mount("bind", a, ["rbind"]), Mount("bind", b, ["rbind"])], target)
        self.assertEqual(len(mounted_under(target)), 2)
        unmount_all(target)
        self.assertEqual(mounted_under(target), [])
        unmount_all(target)  # not a mount point: fine
        unmount_all(os.path.join(self.tmp, "missing"))  # missing: fine
        unmount_all("")
        unmount(target)  # EINVAL ignored

    def test_mount_error(self) -> None:
        target = self._dir("t")
        e = self.assertRaises(OSError, Mount("bind", os.path.join(self.tmp, "nope"), ["rbind"]).mount, target)
        self.assertEqual(e.errno, errno.ENOENT)

    def test_loop_refused(self) -> None:
        e = self.assertRaises(CdtwistError, Mount("ext4", "/x.img", ["loop"]).mount, self._dir("t"))
        self.assertIn("loop", str(e))

    def test_long_lowerdir_overlay(self) -> None:
        """Lower dirs too long for one page are mounted relative to their parent, cwd untouched."""
        base = self._dir("a-rather-long-directory-name-to-make-the-mount-options-long", "snapshots")
        lowers = []
        for i in range(1, 81):
            fs = os.path.join(base, str(i), "fs")
            os.makedirs(fs)
            with open(os.path.join(fs, f"file-{i}"), "w") as f:
                f.write(str(i))
            with open(os.path.join(fs, "top"), "w") as f:
                f.write(str(i))
            lowers.append(fs)
        lowers.reverse()  # top first
        options = ["index=off", "lowerdir=" + ":".join(lowers)]
        self.assertGreater(len(options[1]), os.sysconf("SC_PAGESIZE"))
        target = self._dir("merged")
        cwd = os.getcwd()
        Mount("overlay", "overlay", options).mount(target)
        try:
            self.assertEqual(os.getcwd(), cwd)
            self.assertEqual(len(os.listdir(target)), 81)
            with open(os.path.join(target, "top")) as f:
                self.assertEqual(f.read(), "80")
        finally:
            unmount_all(target)

    def test_mount_at_other_threads_keep_cwd(self) -> None:
        """The chdir of a compacted overlay mount happens in a thread of its own."""
        seen: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(os.getcwd())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            self.test_long_lowerdir_overlay()
        finally:
            stop.set()
            watcher.join()
        self.assertEqual(set(seen), {os.getcwd()})

    def test_mount_at_not_a_dir(self) -> None:
        path = os.path.join(self.tmp, "file")
        open(path, "w").close()
        e = self.assertRaises(CdtwistError, m._mount_at, path, "overlay", self._dir("t"), "overlay", 0, "")
        self.assertIn("is not dir", str(e))

    def test_with_temp_mount(self) -> None:
        src = self._dir("src")
        with open(os.path.join(src, "f"), "w") as f:
            f.write("content")
        tmpmounts = self._dir("tmpmounts")
        seen = []

        def fn(root: str) -> str:
            seen.append(root)
            self.assertTrue(os.path.basename(root).startswith("containerd-mount"))
            self.assertEqual(os.path.dirname(root), tmpmounts)
            with open(os.path.join(root, "f")) as f:
                return f.read()

        self.assertEqual(with_temp_mount([Mount("bind", src, ["rbind", "rw"])], fn, tmpmounts), "content")
        self.assertEqual(os.listdir(tmpmounts), [])

        def write(root: str) -> None:
            open(os.path.join(root, "g"), "w").close()

        e = self.assertRaises(
            OSError, with_readonly_temp_mount, [Mount("bind", src, ["rbind", "rw"])], write, tmpmounts
        )
        self.assertEqual(e.errno, errno.EROFS)
        self.assertEqual(os.listdir(tmpmounts), [])

    def test_with_temp_mount_errors(self) -> None:
        tmpmounts = self._dir("tmpmounts")
        src = self._dir("src")
        e = self.assertRaises(
            CdtwistError, with_temp_mount, [Mount("bind", os.path.join(self.tmp, "nope"), ["rbind"])], len, tmpmounts
        )
        self.assertRegex(str(e), r"^failed to mount .*/tmpmounts/containerd-mount\w+: no such file or directory$")

        def fail(root: str) -> None:
            raise NotFound("thing")

        e = self.assertRaises(NotFound, with_temp_mount, [Mount("bind", src, ["rbind"])], fail, tmpmounts)
        self.assertRegex(str(e), r"^mount callback failed on .*/containerd-mount\w+: thing: not found$")
        self.assertEqual(os.listdir(tmpmounts), [])

    def test_default_temp_location(self) -> None:
        old = m.temp_mount_location()
        self.addCleanup(setattr, m, "_temp_mount_location", old)
        where = os.path.join(self.tmp, "root", "tmpmounts")
        m.set_temp_mount_location(where)
        self.assertEqual(m.temp_mount_location(), where)
        self.assertEqual(with_temp_mount([], os.path.dirname), where)

    def test_lookup(self) -> None:
        info = lookup(self.tmp)
        self.assertTrue(self.tmp.startswith(info.mountpoint))
        src = self._dir("src")
        target = self._dir("t")
        mount_all([Mount("tmpfs", "tmpfs", ["size=1m"])], target)
        try:
            self.assertEqual(lookup(os.path.join(target, "not-there")).fstype, "tmpfs")
            self.assertEqual(lookup(target).mountpoint, target)
            self.assertNotEqual(lookup(src).fstype, "tmpfs")
        finally:
            unmount_all(target)
