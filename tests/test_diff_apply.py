"""Tests for :mod:`cdtwist.diff.apply`: containerd's ``archive.Apply``, native and overlay.

Run as root (device nodes, chown, trusted xattrs, overlay mounts).  Hostile
layers are ported from containerd's ``TestBreakouts`` and extended; each
checks that nothing outside the apply root changed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

from twisted.trial.unittest import SkipTest, TestCase

from cdtwist.diff import apply as applymod
from cdtwist.diff import tarstream
from cdtwist.diff.apply import ApplyPlan, InvalidArchive, apply_layer, plan_apply
from cdtwist.diff.tarstream import TarError
from cdtwist.errors import CdtwistError
from tests.test_diff_support import (
    CAPABILITY,
    MTIME,
    Chunked,
    entry,
    layer,
    mount,
    outside_state,
    pytar,
    tarinfo,
    umount,
)

NS = 1_000_000_000


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root")


class _Base(TestCase):
    def setUp(self) -> None:
        _require_root()
        self.top = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.top, "root")
        self.outside = os.path.join(self.top, "outside")
        os.makedirs(self.root)
        os.makedirs(os.path.join(self.outside, "etc"))
        with open(os.path.join(self.outside, "etc", "passwd"), "w") as f:
            f.write("outside")
        os.chmod(os.path.join(self.outside, "etc", "passwd"), 0o400)
        os.symlink(os.path.join(self.outside, "etc", "passwd"), os.path.join(self.outside, "passwdlink"))

    def apply(self, data: bytes, root: str | None = None, **kw: object) -> applymod.ApplyResult:
        return apply_layer(root or self.root, io.BytesIO(data), **kw)  # type: ignore[arg-type]

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def read(self, *parts: str) -> bytes:
        with open(self.path(*parts), "rb") as f:
            return f.read()


class NativeApplyTests(_Base):
    def test_types_and_metadata(self) -> None:
        """Every member type keeps its mode, owner, times, xattrs and links."""
        data = layer(
            [
                entry("etc", "dir", mode=0o750, uid=5, gid=6, mtime=MTIME - 100),
                entry("etc/passwd", data=b"root:x:0:0\n", mode=0o640, uid=7, gid=8),
                entry("bin", "dir"),
                entry("bin/su", data=b"#!su", mode=0o4755),
                entry("bin/sgid", data=b"g", mode=0o2711, gid=3),
                entry("tmp", "dir", mode=0o1777),
                entry("bin/su-link", "link", link="bin/su", mode=0o4755),
                entry("bin/rel", "symlink", link="su", uid=9, gid=9),
                entry("bin/abs", "symlink", link="/etc/passwd"),
                entry("dev", "dir"),
                entry("dev/null", "char", mode=0o666, dev=(1, 3)),
                entry("dev/loop0", "block", mode=0o660, dev=(7, 0), gid=6),
                entry("dev/pipe", "fifo", mode=0o600),
                entry(
                    "ping",
                    data=b"ping",
                    pax={
                        "SCHILY.xattr.user.comment": b"hello",
                        "SCHILY.xattr.security.capability": CAPABILITY,
                    },
                ),
                entry("atime", data=b"a", atime=MTIME + 50),
                entry("empty", data=b""),
            ]
        )
        res = self.apply(data + b"trailing bytes")
        self.assertEqual(res.digest, "sha256:" + hashlib.sha256(data + b"trailing bytes").hexdigest())
        self.assertEqual(res.size, len(data) + len(b"trailing bytes"))

        st = os.lstat(self.path("etc"))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o750, 5, 6))
        self.assertEqual(st.st_mtime_ns, (MTIME - 100) * NS)  # set after its children
        st = os.lstat(self.path("etc/passwd"))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o640, 7, 8))
        self.assertEqual(self.read("etc/passwd"), b"root:x:0:0\n")
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("bin/su")).st_mode), 0o4755)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("bin/sgid")).st_mode), 0o2711)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("tmp")).st_mode), 0o1777)
        self.assertTrue(os.path.samefile(self.path("bin/su"), self.path("bin/su-link")))
        self.assertEqual(os.lstat(self.path("bin/su")).st_nlink, 2)
        self.assertEqual(os.readlink(self.path("bin/rel")), "su")
        self.assertEqual(os.lstat(self.path("bin/rel")).st_uid, 9)
        self.assertEqual(os.readlink(self.path("bin/abs")), "/etc/passwd")
        st = os.lstat(self.path("dev/null"))
        self.assertTrue(stat.S_ISCHR(st.st_mode))
        self.assertEqual((os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode)), (1, 3, 0o666))
        st = os.lstat(self.path("dev/loop0"))
        self.assertTrue(stat.S_ISBLK(st.st_mode))
        self.assertEqual((os.major(st.st_rdev), st.st_gid), (7, 6))
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.path("dev/pipe")).st_mode))
        self.assertEqual(os.getxattr(self.path("ping"), "user.comment"), b"hello")
        self.assertEqual(os.getxattr(self.path("ping"), "security.capability"), CAPABILITY)
        st = os.lstat(self.path("atime"))
        self.assertEqual((st.st_atime_ns, st.st_mtime_ns), ((MTIME + 50) * NS, MTIME * NS))
        self.assertEqual(os.lstat(self.path("bin/rel")).st_mtime_ns, MTIME * NS)
        self.assertEqual(os.path.getsize(self.path("empty")), 0)

    def test_python_tarfile_dialects(self) -> None:
        """GNU long names/links, PAX, USTAR prefixes and v7 from another writer."""
        long_dir = "d" * 120 + "/" + "e" * 120
        for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
            root = os.path.join(self.top, f"fmt{fmt}")
            os.makedirs(root)
            members = [
                tarinfo("a" * 90 + "/" + "b" * 90, tarfile.DIRTYPE),
                tarinfo("a" * 90 + "/" + "b" * 90 + "/file", data=b"prefix"),
            ]
            if fmt != tarfile.USTAR_FORMAT:
                members += [
                    tarinfo(long_dir, tarfile.DIRTYPE),
                    tarinfo(long_dir + "/f" * 5, data=b"long"),
                    tarinfo("ln", tarfile.SYMTYPE, linkname="x" * 200),
                    tarinfo("uni-é", data=b"u"),
                ]
            apply_layer(root, io.BytesIO(pytar(members, fmt)))
            with open(os.path.join(root, "a" * 90, "b" * 90, "file"), "rb") as f:
                self.assertEqual(f.read(), b"prefix")
            if fmt != tarfile.USTAR_FORMAT:
                with open(os.path.join(root, long_dir + "/f" * 5), "rb") as f:
                    self.assertEqual(f.read(), b"long")
                self.assertEqual(os.readlink(os.path.join(root, "ln")), "x" * 200)
                self.assertTrue(os.path.exists(os.path.join(root, "uni-é")))

    def test_gnu_tar_sparse(self) -> None:
        """Sparse files from GNU tar (old GNU, PAX 0.1 and 1.0) read back with their holes."""
        src = os.path.join(self.top, "sparse-src")
        os.makedirs(src)
        with open(os.path.join(src, "sparse"), "wb") as f:
            f.seek(1 << 20)
            f.write(b"middle")
            f.seek(3 << 20)
            f.write(b"end")
        with open(os.path.join(src, "sparse"), "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
        for args in (["--format=gnu"], ["--format=posix", "--sparse-version=0.1"], ["--format=posix"]):
            out = subprocess.run(["tar", "-S", "-C", src, "-cf", "-", *args, "sparse"], capture_output=True, check=True)
            root = os.path.join(self.top, "sparse-" + "-".join(a.strip("-") for a in args))
            os.makedirs(root)
            apply_layer(root, io.BytesIO(out.stdout))
            with open(os.path.join(root, "sparse"), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), want, args)
            st = os.stat(os.path.join(root, "sparse"))
            self.assertEqual(st.st_size, (3 << 20) + 3)
            self.assertLess(st.st_blocks * 512, 1 << 20, "holes were written out")

    def test_whiteouts_delete(self) -> None:
        self.apply(
            layer(
                [
                    entry("a", "dir"),
                    entry("a/keep", data=b"k"),
                    entry("a/gone", data=b"g"),
                    entry("tree", "dir"),
                    entry("tree/sub", "dir"),
                    entry("tree/sub/x", data=b"x"),
                    entry("link", "symlink", link="/a"),
                ]
            )
        )
        self.apply(layer([entry("a/.wh.gone"), entry(".wh.tree"), entry(".wh.link"), entry(".wh.never-was")]))
        self.assertEqual(sorted(os.listdir(self.root)), ["a"])
        self.assertEqual(os.listdir(self.path("a")), ["keep"])

    def test_opaque_clears_lower_content(self) -> None:
        """``.wh..wh..opq`` keeps only what this layer put there, wherever it appears."""
        self.apply(
            layer(
                [
                    entry("d", "dir"),
                    entry("d/old", data=b"o"),
                    entry("d/sub", "dir"),
                    entry("d/sub/old", data=b"o"),
                    entry("other", data=b"keep"),
                ]
            )
        )
        self.apply(
            layer(
                [
                    entry("d", "dir"),
                    entry("d/sub", "dir"),
                    entry("d/sub/new", data=b"n"),
                    entry("d/new", data=b"n"),
                    entry("d/.wh..wh..opq"),
                ]
            )
        )
        self.assertEqual(sorted(os.listdir(self.path("d"))), ["new", "sub"])
        self.assertEqual(os.listdir(self.path("d/sub")), ["new"])
        self.assertEqual(self.read("other"), b"keep")

    def test_replacements(self) -> None:
        """An existing entry is removed and replaced, except a directory merged with a directory."""
        self.apply(
            layer(
                [
                    entry("d", "dir", mode=0o700),
                    entry("d/child", data=b"c"),
                    entry("f", data=b"file"),
                    entry("s", "symlink", link="d"),
                    entry("todir", data=b"x"),
                ]
            )
        )
        self.apply(
            layer(
                [
                    entry("d", "dir", mode=0o755),
                    entry("f", "dir"),
                    entry("s", data=b"now a file"),
                    entry("todir", "dir"),
                    entry("todir/x", data=b"y"),
                ]
            )
        )
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("d")).st_mode), 0o755)
        self.assertEqual(self.read("d/child"), b"c")
        self.assertTrue(os.path.isdir(self.path("f")))
        self.assertEqual(self.read("s"), b"now a file")
        self.assertEqual(self.read("todir/x"), b"y")
        self.apply(layer([entry("d", data=b"dir replaced")]))
        self.assertEqual(self.read("d"), b"dir replaced")

    def test_duplicate_entries(self) -> None:
        """A later member wins; a hard link taken earlier keeps the old inode."""
        self.apply(
            layer(
                [
                    entry("f", data=b"first"),
                    entry("l", "link", link="f"),
                    entry("f", data=b"second", mode=0o600),
                    entry("f", data=b"third", mode=0o640),
                ]
            )
        )
        self.assertEqual(self.read("f"), b"third")
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("f")).st_mode), 0o640)
        self.assertEqual(self.read("l"), b"first")

    def test_missing_parents_created(self) -> None:
        self.apply(layer([entry("a/b/c/file", data=b"x"), entry("x/y/.wh.z")]))
        self.assertEqual(self.read("a/b/c/file"), b"x")
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("a/b")).st_mode), 0o755)
        self.assertTrue(os.path.isdir(self.path("x/y")))

    def test_parent_not_a_directory(self) -> None:
        self.apply(layer([entry("f", data=b"x")]))
        e = self.assertRaises(CdtwistError, self.apply, layer([entry("f/child", data=b"y")]))
        self.assertIn("not a directory", str(e))

    def test_global_header_and_filter(self) -> None:
        g = tarstream.Header(name=b"pax_global_header", typeflag=tarstream.TYPE_XGLOBAL, pax={"comment": b"x"})
        data = layer([(g, b""), entry("a", data=b"a"), entry("b", data=b"b")])
        self.apply(data, filter=lambda h: h.name != b"b")
        self.assertEqual(os.listdir(self.root), ["a"])

    def test_skip_devices(self) -> None:
        self.apply(layer([entry("null", "char", dev=(1, 3)), entry("f", data=b"f")]), skip_devices=True)
        self.assertEqual(os.listdir(self.root), ["f"])

    def test_trusted_xattrs_ignored(self) -> None:
        """``trusted.*`` from a layer is never set (it would steer overlayfs)."""
        self.apply(layer([entry("d", "dir", pax={"SCHILY.xattr.trusted.overlay.opaque": b"y"})]))
        self.assertRaises(OSError, os.getxattr, self.path("d"), "trusted.overlay.opaque")

    def test_user_xattr_on_symlink_ignored(self) -> None:
        self.apply(layer([entry("s", "symlink", link="x", pax={"SCHILY.xattr.user.a": b"b"})]))
        self.assertEqual(os.readlink(self.path("s")), "x")

    def test_times_bounded(self) -> None:
        """Times Go cannot represent fall back to the epoch."""
        self.apply(layer([entry("old", data=b"o", mtime=-5)]))
        self.assertEqual(os.lstat(self.path("old")).st_mtime_ns, 0)

    def test_chunked_input(self) -> None:
        data = layer([entry("big", data=os.urandom(300_000)), entry("small", data=b"s")])
        res = apply_layer(self.root, Chunked(data))
        self.assertEqual(res.digest, "sha256:" + hashlib.sha256(data).hexdigest())
        self.assertEqual(os.path.getsize(self.path("big")), 300_000)

    def test_empty_stream(self) -> None:
        res = self.apply(b"")
        self.assertEqual(res.size, 0)
        self.assertEqual(res.digest, "sha256:" + hashlib.sha256(b"").hexdigest())


class HostileLayerTests(_Base):
    """Nothing is written outside root, whatever the layer says."""

    def setUp(self) -> None:
        super().setUp()
        self.before = outside_state(self.top, self.root)

    def tearDown(self) -> None:
        self.assertEqual(outside_state(self.top, self.root), self.before)

    def assertApplyFails(self, data: bytes, exc: type[Exception] = CdtwistError, **kw: object) -> Exception:
        return self.assertRaises(exc, self.apply, data, **kw)

    def test_dotdot_names(self) -> None:
        self.apply(layer([entry("../../../../escape", data=b"x"), entry("a/../../b/../../escape2", data=b"y")]))
        self.assertEqual(self.read("escape"), b"x")
        self.assertEqual(self.read("escape2"), b"y")

    def test_absolute_names(self) -> None:
        target = os.path.join(self.outside, "etc", "passwd")
        self.apply(layer([entry(target, data=b"inside"), entry("/abs", "dir"), entry("/abs/f", data=b"f")]))
        self.assertEqual(self.read(target.lstrip("/")), b"inside")
        self.assertEqual(self.read("abs/f"), b"f")

    def test_symlink_escapes_are_rooted(self) -> None:
        """containerd's SymlinkAbsolute / UpAndOut / Multiple* cases, plus links to real outside paths."""
        self.apply(
            layer(
                [
                    entry("etc", "dir"),
                    entry("dummy", "dir"),
                    entry("localetc", "symlink", link="/etc"),
                    entry("localetc/unbroken", data=b"1"),
                    entry("up", "symlink", link="/dummy/../../../etc"),
                    entry("up/unbroken2", data=b"2"),
                    entry("dummy/etc", "symlink", link="/etc"),
                    entry("rel", "symlink", link="./dummy/etc"),
                    entry("rel/unbroken3", data=b"3"),
                    entry("out", "symlink", link=self.outside),
                    entry("out/etc/passwd", data=b"contained"),
                    entry("outrel", "symlink", link="../" * 20 + self.outside.lstrip("/")),
                    entry("outrel/new", data=b"contained2"),
                ]
            )
        )
        self.assertEqual(self.read("etc/unbroken"), b"1")
        self.assertEqual(self.read("etc/unbroken2"), b"2")
        self.assertEqual(self.read("etc/unbroken3"), b"3")
        self.assertEqual(self.read(self.outside.lstrip("/"), "etc", "passwd"), b"contained")
        self.assertEqual(self.read(self.outside.lstrip("/"), "new"), b"contained2")

    def test_symlinked_parent_from_lower_layer(self) -> None:
        """A parent that is a symlink already in the snapshot (e.g. from a lower layer)."""
        os.symlink(self.outside, self.path("evil"))
        os.symlink("../../../../../../..", self.path("up"))
        self.apply(layer([entry("evil/etc/passwd", data=b"x"), entry("up/escape", data=b"y")]))
        self.assertEqual(self.read(self.outside.lstrip("/"), "etc", "passwd"), b"x")
        self.assertEqual(self.read("escape"), b"y")
        self.assertEqual(os.readlink(self.path("evil")), self.outside)

    def test_hardlink_escapes(self) -> None:
        """Hard links resolve their target inside root: Go's Hardlink* breakout cases."""
        self.apply(
            layer(
                [
                    entry("etc", "dir", mode=0o770),
                    entry("etc/passwd", data=b"inside"),
                    entry("breakouts", "dir"),
                    entry("breakouts/d1", "symlink", link="../../etc"),
                    entry("breakouts/mypasswd", "link", link="/breakouts/d1/passwd"),
                    entry("localetc", "symlink", link="/etc"),
                    entry("l1", "link", link="/localetc/passwd"),
                    entry("l2", "link", link="../../../../../etc/passwd"),
                    entry("l3", "link", link="/etc/passwd"),
                    entry("sub", "dir"),
                    entry("sub/up", "symlink", link="upandout/../../../etc"),
                    entry("l4", "link", link="sub/up/passwd"),
                ]
            )
        )
        for name in ("breakouts/mypasswd", "l1", "l2", "l3", "l4"):
            self.assertTrue(os.path.samefile(self.path(name), self.path("etc/passwd")), name)
        self.assertEqual(os.lstat(self.path("etc/passwd")).st_nlink, 6)

    def test_hardlink_to_outside_path_fails_inside(self) -> None:
        target = os.path.join(self.outside, "etc", "passwd")
        self.assertApplyFails(layer([entry("l", "link", link=target)]))
        self.assertApplyFails(layer([entry("l", "link", link="../../outside/etc/passwd")]))
        self.assertFalse(os.path.lexists(self.path("l")))

    def test_hardlink_to_symlink_links_the_symlink(self) -> None:
        """Go's HardlinkSymlinkChmod: linking a symlink to outside never chmods its target."""
        outside_file = os.path.join(self.outside, "etc", "passwd")
        self.apply(
            layer(
                [
                    entry(self.outside + "/passwdlink", "symlink", link=outside_file),
                    entry("sketchylink", "link", link=self.outside + "/passwdlink", mode=0o777, uid=1234),
                ]
            )
        )
        self.assertTrue(os.path.islink(self.path("sketchylink")))
        self.assertEqual(os.readlink(self.path("sketchylink")), outside_file)
        self.assertEqual(os.lstat(outside_file).st_nlink, 1)

    def test_directory_link_rejected(self) -> None:
        self.apply(layer([entry("d", "dir")]))
        self.assertApplyFails(layer([entry("l", "link", link="d")]))
        self.assertApplyFails(layer([entry("l", "link", link="..")]))
        self.assertApplyFails(layer([entry("l", "link", link="d/..")]))

    def test_whiteout_names_rejected(self) -> None:
        for name in (".wh..", ".wh...", "etc/.wh..", "etc/.wh...", ".wh."):
            self.assertApplyFails(layer([entry(name)]), InvalidArchive)

    def test_whiteouts_through_symlinks_stay_inside(self) -> None:
        os.symlink(self.outside, self.path("evil"))
        os.makedirs(self.path(self.outside.lstrip("/"), "etc"))
        with open(self.path(self.outside.lstrip("/"), "etc", "passwd"), "w") as f:
            f.write("inside copy")
        self.apply(layer([entry("evil/etc/.wh.passwd"), entry("evil/.wh.passwdlink")]))
        self.assertFalse(os.path.exists(self.path(self.outside.lstrip("/"), "etc", "passwd")))
        self.apply(layer([entry("evil/.wh..wh..opq")]))
        self.assertEqual(os.listdir(self.path(self.outside.lstrip("/"))), [])
        # whiteout of the symlink itself removes the link, not its target
        self.apply(layer([entry(".wh.evil")]))
        self.assertFalse(os.path.lexists(self.path("evil")))

    def test_overlay_whiteouts_through_symlinks_stay_inside(self) -> None:
        os.symlink(self.outside, self.path("evil"))
        self.apply(layer([entry("evil/etc/.wh.passwd"), entry("evil/.wh..wh..opq")]), overlay=True)
        made = self.path(self.outside.lstrip("/"), "etc", "passwd")
        self.assertTrue(stat.S_ISCHR(os.lstat(made).st_mode))
        self.assertEqual(os.getxattr(self.path(self.outside.lstrip("/")), "trusted.overlay.opaque"), b"y")

    def test_symlink_loop(self) -> None:
        e = self.assertApplyFails(
            layer([entry("a", "symlink", link="b"), entry("b", "symlink", link="a"), entry("a/x", data=b"x")])
        )
        self.assertIn("too many links", str(e))

    def test_replace_symlink_with_directory(self) -> None:
        """Go's DirectoryOverrideSymlink: the link is replaced, not followed."""
        os.makedirs(self.path("etc"))
        os.symlink(self.outside + "/etc", self.path("localetc"))
        self.apply(layer([entry("localetc", "dir"), entry("localetc/x", data=b"x")]))
        self.assertTrue(os.path.isdir(self.path("localetc")) and not os.path.islink(self.path("localetc")))

    def test_huge_size_truncated(self) -> None:
        """A member claiming 1 TiB with a few bytes behind it: bounded reads, a clean error."""
        hdr, _ = entry("big", data=b"", size=1 << 40)
        out = io.BytesIO()
        tarstream.TarWriter(out.write)._write_ustar(hdr, tarstream.TYPE_REG, hdr.mtime_ns)
        raw = out.getvalue() + b"only this"
        e = self.assertApplyFails(raw, TarError)
        self.assertEqual(str(e), "unexpected EOF")

    def test_huge_pax_header(self) -> None:
        pax = tarstream.Header(name=b"PaxHeaders.0/x", typeflag=tarstream.TYPE_XHEADER, size=1 << 31)
        raw = io.BytesIO()
        tw = tarstream.TarWriter(raw.write)
        tw._write_ustar(pax, tarstream.TYPE_XHEADER, 0)
        e = self.assertApplyFails(raw.getvalue() + b"9 a=b\n" * 100, TarError)
        self.assertEqual(str(e), "archive/tar: header field too long")

    def test_huge_gnu_longname(self) -> None:
        hdr = tarstream.Header(name=b"././@LongLink", typeflag=tarstream.TYPE_GNU_LONGNAME, size=1 << 30)
        raw = io.BytesIO()
        tarstream.TarWriter(raw.write)._write_ustar(hdr, tarstream.TYPE_GNU_LONGNAME, 0)
        self.assertApplyFails(raw.getvalue() + b"x" * 4096, TarError)

    def test_truncated_streams(self) -> None:
        data = layer([entry("a", data=b"x" * 2000), entry("b", data=b"y" * 10)])
        # A cut exactly between members reads as the end of the archive, as in Go.
        for cut in (100, 512, 1000, 2600, len(data) - 1024 - 10):
            root = os.path.join(self.root, f"cut{cut}")
            os.makedirs(root)
            self.assertRaises(TarError, apply_layer, root, io.BytesIO(data[:cut]))

    def test_corrupt_header(self) -> None:
        data = bytearray(layer([entry("a", data=b"x")]))
        data[0] ^= 0xFF
        self.assertApplyFails(bytes(data), TarError)
        zero_then_data = bytes(512) + layer([entry("a", data=b"x")])
        self.assertApplyFails(zero_then_data, TarError)

    def test_unknown_type(self) -> None:
        hdr, _ = entry("x")
        hdr.typeflag = ord("Z")
        e = self.assertApplyFails(layer([(hdr, b"")]))
        self.assertIn("unhandled tar header type 90", str(e))


class OverlayApplyTests(_Base):
    """Overlay mode onto an upperdir, checked through a real overlay mount."""

    def setUp(self) -> None:
        super().setUp()
        self.lower = os.path.join(self.top, "lower")
        self.upper = os.path.join(self.top, "upper")
        self.work = os.path.join(self.top, "work")
        self.merged = os.path.join(self.top, "merged")
        for d in (self.lower, self.upper, self.work, self.merged):
            os.makedirs(d)
        apply_layer(
            self.lower,
            io.BytesIO(
                layer(
                    [
                        entry("etc", "dir", mode=0o750, uid=3, gid=4, mtime=MTIME - 10),
                        entry("etc/passwd", data=b"p"),
                        entry("etc/group", data=b"g"),
                        entry("opq", "dir"),
                        entry("opq/old", data=b"o"),
                        entry("opq/olddir", "dir"),
                        entry("opq/olddir/f", data=b"o"),
                        entry("gone", "dir"),
                        entry("gone/f", data=b"f"),
                        entry("keep", data=b"k"),
                        entry("deep", "dir", pax={"SCHILY.xattr.user.k": b"v"}),
                        entry("deep/er", "dir", mode=0o700),
                    ]
                )
            ),
        )

    def mounted(self, *extra: str) -> None:
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        for e in extra:
            opts += "," + e
        try:
            mount("overlay", self.merged, "overlay", opts)
        except OSError as e:
            raise SkipTest(f"cannot mount overlay: {e}")
        self.addCleanup(umount, self.merged)

    def test_overlay_whiteouts_and_opaque(self) -> None:
        data = layer(
            [
                entry("etc/.wh.passwd"),
                entry(".wh.gone"),
                entry("opq", "dir"),
                entry("opq/.wh..wh..opq"),
                entry("opq/new", data=b"n"),
                entry("deep/er/file", data=b"f"),
            ]
        )
        res = apply_layer(self.upper, io.BytesIO(data), overlay=True, parents=[self.lower])
        self.assertEqual(res.digest, "sha256:" + hashlib.sha256(data).hexdigest())
        st = os.lstat(os.path.join(self.upper, "etc/passwd"))
        self.assertTrue(stat.S_ISCHR(st.st_mode) and st.st_rdev == 0)
        self.assertEqual(os.getxattr(os.path.join(self.upper, "opq"), "trusted.overlay.opaque"), b"y")
        # missing parents copy the lower's attributes (archive.WithParents)
        for d in ("etc", "deep", "deep/er"):
            up, low = os.lstat(os.path.join(self.upper, d)), os.lstat(os.path.join(self.lower, d))
            self.assertEqual((up.st_mode, up.st_uid, up.st_gid), (low.st_mode, low.st_uid, low.st_gid), d)
        self.assertEqual(os.getxattr(os.path.join(self.upper, "deep"), "user.k"), b"v")

        self.mounted()
        m = self.merged
        self.assertEqual(sorted(os.listdir(os.path.join(m, "etc"))), ["group"])
        self.assertFalse(os.path.lexists(os.path.join(m, "gone")))
        self.assertEqual(sorted(os.listdir(os.path.join(m, "opq"))), ["new"])
        self.assertEqual(sorted(os.listdir(m)), ["deep", "etc", "keep", "opq"])
        with open(os.path.join(m, "deep/er/file"), "rb") as f:
            self.assertEqual(f.read(), b"f")

    def test_userxattr_opaque(self) -> None:
        apply_layer(self.upper, io.BytesIO(layer([entry("opq/.wh..wh..opq")])), overlay=True, userxattr=True)
        self.assertEqual(os.getxattr(os.path.join(self.upper, "opq"), "user.overlay.opaque"), b"y")
        self.assertRaises(OSError, os.getxattr, os.path.join(self.upper, "opq"), "trusted.overlay.opaque")
        self.mounted("userxattr")
        self.assertEqual(os.listdir(os.path.join(self.merged, "opq")), [])

    def test_native_mode_on_merged_mount(self) -> None:
        """Native mode applied through the merged view deletes for real (as containerd's fallback)."""
        self.mounted()
        apply_layer(self.merged, io.BytesIO(layer([entry("etc/.wh.passwd"), entry("opq/.wh..wh..opq")])))
        self.assertEqual(os.listdir(os.path.join(self.merged, "etc")), ["group"])
        self.assertEqual(os.listdir(os.path.join(self.merged, "opq")), [])

    def test_overlay_duplicate_whiteout_fails(self) -> None:
        apply_layer(self.upper, io.BytesIO(layer([entry("etc/.wh.passwd")])), overlay=True)
        self.assertRaises(
            CdtwistError, apply_layer, self.upper, io.BytesIO(layer([entry("etc/.wh.passwd")])), overlay=True
        )


class PlanTests(TestCase):
    class M:
        def __init__(self, type: str, options: list[str]) -> None:
            self.type, self.options = type, options

    def test_overlay_upper(self) -> None:
        self.patch(applymod, "running_in_userns", lambda: False)
        plan = plan_apply([self.M("overlay", ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])])
        self.assertEqual(plan, ApplyPlan(root="/u", overlay=True, parents=("/l1", "/l2")))
        plan = plan_apply([self.M("overlay", ["upperdir=/u", "lowerdir=/l", "userxattr"])])
        self.assertTrue(plan.userxattr)

    def test_others_need_a_mount(self) -> None:
        self.patch(applymod, "running_in_userns", lambda: False)
        self.assertIsNone(plan_apply([self.M("overlay", ["lowerdir=/a:/b"])]).root)
        self.assertIsNone(plan_apply([self.M("bind", ["rbind", "rw"])]).root)
        self.assertIsNone(plan_apply([]).root)
        self.patch(applymod, "running_in_userns", lambda: True)
        self.assertIsNone(plan_apply([self.M("overlay", ["upperdir=/u"])]).root)


_BIG_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from cdtwist.diff.apply import apply_layer
    from cdtwist.diff import tarstream

    def hwm():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    root, path = sys.argv[1], sys.argv[2]
    base = hwm()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:  # 90 files of 1 MiB, then 2560 of 4 KiB: > 100 MiB
        tw = tarstream.TarWriter(f.write)
        for i in range(90):
            tw.write_header(tarstream.Header(name=b"big/%d" % i, size=1 << 20, mode=0o644))
            tw.write(block)
        for i in range(2560):
            tw.write_header(tarstream.Header(name=b"small/%d/%d" % (i % 64, i), size=4096, mode=0o644))
            tw.write(block[:4096])
        tw.close()
    del block
    t = time.perf_counter()
    with open(path, "rb") as f:
        res = apply_layer(root, f)
    elapsed = time.perf_counter() - t
    print(json.dumps({"base": base, "peak": hwm(), "size": res.size, "elapsed": elapsed}))
    """
)


class BigLayerTests(TestCase):
    def test_100mib_bounded_memory(self) -> None:
        """A 100 MiB layer applies in a fresh process without its peak RSS growing with the layer."""
        _require_root()
        import json

        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": top + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t = time.monotonic()
        blob = os.path.abspath(self.mktemp())
        out = subprocess.run(
            [sys.executable, "-c", _BIG_SCRIPT, root, blob], capture_output=True, text=True, env=env, timeout=300
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        r = json.loads(out.stdout)
        self.assertGreater(r["size"], 100 << 20)
        growth = r["peak"] - r["base"]
        self.assertLess(growth, 48 << 20, r)
        mib_s = r["size"] / (1 << 20) / r["elapsed"]
        sys.stderr.write(f"\n[100 MiB layer: {mib_s:.0f} MiB/s, peak RSS growth {growth >> 20} MiB] ")
        self.assertEqual(len(os.listdir(os.path.join(root, "big"))), 90)
        self.assertLess(time.monotonic() - t, 120)
