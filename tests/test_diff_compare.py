"""Tests for :mod:`cdtwist.diff.compare`: the walking differ and its Go-identical tar output.

``GoCompatTests`` builds a small program around containerd's own
``archive.WriteDiff``/``archive.Apply`` (Debian's Go sources, GOPATH mode)
and checks that both write the same bytes and read each other's layers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess

from twisted.trial.unittest import SkipTest, TestCase

from cdtwist.diff import compression
from cdtwist.diff.apply import apply_layer
from cdtwist.diff.compare import ChangeKind, changes, compare, write_diff
from cdtwist.diff.compression import MEDIA_TYPE_IMAGE_LAYER, UNCOMPRESSED_LABEL, Compression
from cdtwist.diff.tarstream import TarReader
from cdtwist.errors import CdtwistError, NotImplemented_
from tests.go_build import GO, GOCODE, GoProgram
from tests.test_diff_support import CAPABILITY, MTIME, entry, layer, mount, snapshot, umount

NS = 1_000_000_000

RICH = [
    entry("bin", "dir"),
    entry("bin/ping", data=b"ping", mode=0o4755, pax={"SCHILY.xattr.security.capability": CAPABILITY}),
    entry("bin/ping6", "link", link="bin/ping", mode=0o4755, pax={"SCHILY.xattr.security.capability": CAPABILITY}),
    entry("bin/sh", "symlink", link="busybox"),
    entry("bin/busybox", data=b"\x7fELF" * 1000, mode=0o755),
    entry("dev", "dir"),
    entry("dev/null", "char", mode=0o666, dev=(1, 3)),
    entry("dev/sda", "block", mode=0o660, dev=(8, 0), gid=6),
    entry("dev/fifo", "fifo", mode=0o600),
    entry("etc", "dir", mode=0o750, uid=1, gid=2, mtime=MTIME - 3600),
    entry("etc/passwd", data=b"root:x:0:0\n", uid=0),
    entry("etc/shadow", data=b"secret", mode=0o600, gid=42),
    entry("home", "dir", mode=0o755),
    entry("home/user", "dir", mode=0o700, uid=1000, gid=1000),
    entry("home/user/.profile", data=b"x", uid=1000, gid=1000, pax={"SCHILY.xattr.user.note": b"n"}),
    entry("tmp", "dir", mode=0o1777),
    entry("x" * 150, data=b"long name"),
    *[entry("deep/" * i, "dir") for i in range(1, 31)],
    entry("deep/" * 30 + "leaf", data=b"deep"),
    entry("uni-\u00e9\u00e8", data=b"utf8"),
    entry("big-ids", data=b"i", uid=3_000_000, gid=3_000_001),
    entry("empty", data=b""),
]


def _members(tar: bytes) -> list[tuple[str, int, bytes]]:
    r = TarReader(io.BytesIO(tar))
    out = []
    while (h := r.next()) is not None:
        out.append((os.fsdecode(h.name), h.typeflag, h.linkname))
    return out


class _Base(TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        self.top = os.path.abspath(self.mktemp())
        os.makedirs(self.top)

    def tree(self, name: str, *layers: bytes) -> str:
        root = os.path.join(self.top, name)
        os.makedirs(root)
        for data in layers:
            apply_layer(root, io.BytesIO(data))
        return root

    def diff(self, lower: str | None, upper: str, **kw: object) -> bytes:
        out = io.BytesIO()
        write_diff(out, lower, upper, whiteout_time_ns=MTIME * NS, **kw)  # type: ignore[arg-type]
        return out.getvalue()


class RoundTripTests(_Base):
    def test_apply_compare_apply(self) -> None:
        """A full tree survives apply → compare (tar+gzip) → apply with everything a layer carries."""
        r1 = self.tree("r1", layer(RICH))
        out = io.BytesIO()
        res = compare(None, r1, out, all_xattrs=True, whiteout_time_ns=0)
        self.assertEqual(res.media_type, compression.MEDIA_TYPE_IMAGE_LAYER_GZIP)
        blob = out.getvalue()
        self.assertEqual(res.digest, "sha256:" + hashlib.sha256(blob).hexdigest())
        self.assertEqual(res.size, len(blob))
        raw = gzip.decompress(blob)
        self.assertEqual(res.uncompressed_digest, "sha256:" + hashlib.sha256(raw).hexdigest())
        self.assertEqual(res.labels, {UNCOMPRESSED_LABEL: res.uncompressed_digest})

        r2 = os.path.join(self.top, "r2")
        os.makedirs(r2)
        applied = apply_layer(r2, compression.decompress_stream(io.BytesIO(blob)))
        self.assertEqual(applied.digest, res.uncompressed_digest)
        self.assertEqual(snapshot(r1), snapshot(r2))
        self.assertEqual(os.getxattr(os.path.join(r2, "bin/ping"), "security.capability"), CAPABILITY)
        self.assertEqual(os.getxattr(os.path.join(r2, "home/user/.profile"), "user.note"), b"n")

        # Deterministic: the same tree gives the same layer.
        again = io.BytesIO()
        self.assertEqual(compare(None, r2, again, all_xattrs=True, whiteout_time_ns=0).digest, res.digest)

    def test_default_exports_capabilities_only(self) -> None:
        """As containerd: of the xattrs only ``security.capability`` goes into a diff."""
        r1 = self.tree("r1", layer(RICH))
        r2 = self.tree("r2", self.diff(None, r1))
        self.assertEqual(os.getxattr(os.path.join(r2, "bin/ping"), "security.capability"), CAPABILITY)
        self.assertRaises(OSError, os.getxattr, os.path.join(r2, "home/user/.profile"), "user.note")

    def test_uncompressed_and_custom_media_types(self) -> None:
        r1 = self.tree("r1", layer(RICH[:5]))
        out = io.BytesIO()
        res = compare(None, r1, out, media_type=MEDIA_TYPE_IMAGE_LAYER, whiteout_time_ns=0)
        self.assertEqual((res.digest, res.labels), (res.uncompressed_digest, {}))
        self.assertEqual(out.getvalue(), self.diff(None, r1))
        self.assertRaises(NotImplemented_, compare, None, r1, io.BytesIO(), media_type="application/x-other")
        self.assertRaises(CdtwistError, compare, None, r1, io.BytesIO(), compressor=lambda d, m: d)
        zst = io.BytesIO()
        mt = compression.MEDIA_TYPE_IMAGE_LAYER_ZSTD
        try:
            res = compare(None, r1, zst, media_type=mt, compressor=lambda d, m: compression.compress_stream(d, 2))
        except NotImplemented_:
            raise SkipTest("zstd compression needs the zstandard module")
        self.assertEqual(res.media_type, mt)
        rc = compression.decompress_stream(io.BytesIO(zst.getvalue()))
        self.assertEqual(rc.compression, Compression.ZSTD)
        self.assertEqual("sha256:" + hashlib.sha256(rc.read()).hexdigest(), res.labels[UNCOMPRESSED_LABEL])


class DiffTests(_Base):
    def setUp(self) -> None:
        super().setUp()
        base = layer(RICH + [entry("gone", "dir"), entry("gone/a", data=b"a"), entry("todir", data=b"f")])
        self.base = base
        self.lower = self.tree("lower", base)
        self.upper = self.tree("upper", base)

    def settle(self, *paths: str) -> None:
        """Whole-second mtimes for what the test touched (a layer keeps seconds only)."""
        for p in paths:
            full = os.path.join(self.upper, p)
            os.utime(full, ns=(MTIME * NS, (MTIME + 7) * NS), follow_symlinks=False)

    def check(self, expected_members: list[str] | None = None) -> bytes:
        tar = self.diff(self.lower, self.upper)
        if expected_members is not None:
            self.assertEqual([m[0] for m in _members(tar)], expected_members)
        target = self.tree("target", self.base, tar)
        self.assertEqual(snapshot(target), snapshot(self.upper))
        return tar

    def test_no_changes(self) -> None:
        self.assertEqual(self.check([]), bytes(1024))

    def test_changes(self) -> None:
        u = self.upper
        with open(os.path.join(u, "etc/passwd"), "ab") as f:
            f.write(b"user:x:1000\n")
        os.chmod(os.path.join(u, "etc/shadow"), 0o640)
        os.remove(os.path.join(u, "bin/sh"))
        shutil.rmtree(os.path.join(u, "gone"))
        os.remove(os.path.join(u, "todir"))
        os.makedirs(os.path.join(u, "todir/sub"))
        with open(os.path.join(u, "todir/sub/new"), "wb") as f:
            f.write(b"new")
        os.makedirs(os.path.join(u, "added/a/b"))
        os.link(os.path.join(u, "etc/passwd"), os.path.join(u, "added/a/b/passwd-link"))
        self.settle(
            "etc/passwd", "etc", "bin", "todir/sub/new", "todir/sub", "todir", "added/a/b", "added/a", "added", "."
        )
        tar = self.check()
        names = [m[0] for m in _members(tar)]
        self.assertEqual(
            names,
            [
                "added/",
                "added/a/",
                "added/a/b/",
                "added/a/b/passwd-link",
                "bin/",
                "bin/.wh.sh",
                "etc/",
                "etc/passwd",
                "etc/shadow",
                ".wh.gone",
                "todir/",
                "todir/sub/",
                "todir/sub/new",
            ],
        )
        kinds = {m[0]: (m[1], m[2]) for m in _members(tar)}
        self.assertEqual(kinds["etc/passwd"], (ord("1"), b"added/a/b/passwd-link"))

    def test_new_link_to_unmodified_file(self) -> None:
        """An unmodified file gains a hard link: both go into the layer, linked (inodeRefs)."""
        os.link(os.path.join(self.upper, "etc/passwd"), os.path.join(self.upper, "passwd2"))
        self.settle(".")
        members = _members(self.check())
        self.assertIn(("etc/passwd", ord("1"), b"passwd2"), members)

    def test_whiteout_header(self) -> None:
        os.remove(os.path.join(self.upper, "empty"))
        self.settle(".")
        tar = self.diff(self.lower, self.upper)
        r = TarReader(io.BytesIO(tar))
        h = r.next()
        assert h is not None
        self.assertEqual((h.name, h.typeflag, h.mode, h.uid, h.gid, h.size), (b".wh.empty", ord("0"), 0, 0, 0, 0))
        self.assertEqual(h.mtime_ns, MTIME * NS)
        self.assertEqual(tar[257:265], b"ustar\x0000")

    def test_sockets_ignored(self) -> None:
        # mknod makes the same socket inode bind() would, without AF_UNIX's 108-byte path limit.
        os.mknod(os.path.join(self.upper, "sock"), 0o755 | stat.S_IFSOCK)
        self.assertEqual(_members(self.diff(self.lower, self.upper)), [])

    def test_changes_api(self) -> None:
        os.remove(os.path.join(self.upper, "empty"))
        got = [(c.kind, c.path) for c in changes(self.lower, self.upper)]
        # Unmodified hard-linked files are reported too, for the writer's link bookkeeping.
        self.assertEqual(
            got,
            [
                (ChangeKind.UNMODIFIED, b"/bin/ping"),
                (ChangeKind.UNMODIFIED, b"/bin/ping6"),
                (ChangeKind.DELETE, b"/empty"),
            ],
        )
        self.assertEqual(str(ChangeKind.DELETE), "delete")


class OverlayDiffTests(_Base):
    """The overlay fast path: only the upperdir is walked, whiteouts come from overlay markers."""

    def test_overlay_upper(self) -> None:
        lower = self.tree(
            "lower",
            layer(
                [
                    entry("etc", "dir"),
                    entry("etc/passwd", data=b"p"),
                    entry("etc/group", data=b"g"),
                    entry("opq", "dir"),
                    entry("opq/old", data=b"o"),
                    entry("gone", "dir"),
                    entry("gone/f", data=b"f"),
                    entry("keep", data=b"k"),
                ]
            ),
        )
        upper = os.path.join(self.top, "upper")
        os.makedirs(upper)
        change = layer(
            [
                entry("etc/.wh.passwd"),
                entry("etc/shadow", data=b"s"),
                entry(".wh.gone"),
                entry("opq", "dir", mode=0o700),
                entry("opq/.wh..wh..opq"),
                entry("opq/new", data=b"n"),
            ]
        )
        apply_layer(upper, io.BytesIO(change), overlay=True, parents=[lower])
        tar = self.diff(lower, upper, overlay_upper=True)
        names = [m[0] for m in _members(tar)]
        self.assertEqual(
            names, ["etc/", "etc/.wh.passwd", "etc/shadow", ".wh.gone", "opq/", "opq/.wh..wh..opq", "opq/new"]
        )

        merged = os.path.join(self.top, "merged")
        work = os.path.join(self.top, "work")
        os.makedirs(merged)
        os.makedirs(work)
        try:
            mount("overlay", merged, "overlay", f"lowerdir={lower},upperdir={upper},workdir={work}")
        except OSError as e:
            raise SkipTest(f"cannot mount overlay: {e}")
        self.addCleanup(umount, merged)
        target = self.tree("target", layer([]))
        shutil.copytree(lower, target, symlinks=True, dirs_exist_ok=True)
        apply_layer(target, io.BytesIO(tar))
        self.assertEqual(snapshot(target, times=False), snapshot(merged, times=False))
        # The double walk over the merged view finds the same changes.
        tar2 = self.diff(lower, merged)
        self.assertEqual(
            [m[0] for m in _members(tar2)],
            ["etc/", "etc/.wh.passwd", "etc/shadow", ".wh.gone", "opq/", "opq/new", "opq/.wh.old"],
        )


# -- containerd's own archive package, for comparison --

GO_SOURCE = """
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/archive"
)

func main() {
	ctx := context.Background()
	var err error
	switch os.Args[1] {
	case "diff":
		err = archive.WriteDiff(ctx, os.Stdout, os.Args[2], os.Args[3])
	case "apply":
		_, err = archive.Apply(ctx, os.Args[2], os.Stdin)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
"""
_TOOL = GoProgram(GO_SOURCE, "difftool")


def go_tool() -> str:
    if GO is None or not os.path.isdir(os.path.join(GOCODE, "src/github.com/containerd/containerd/archive")):
        raise SkipTest("go or containerd's Go sources not available")
    try:
        return _TOOL.build()
    except RuntimeError as e:
        raise SkipTest(f"cannot build the Go helper: {str(e)[-2000:]}") from None


class GoCompatTests(_Base):
    def test_write_diff_bytes_identical(self) -> None:
        """Our layer of a full tree is byte for byte containerd's."""
        tool = go_tool()
        r1 = self.tree("r1", layer(RICH))
        go = subprocess.run([tool, "diff", "", r1], capture_output=True, check=True).stdout
        self.assertEqual(self.diff(None, r1), go)

    def test_diff_with_deletions_matches(self) -> None:
        tool = go_tool()
        lower = self.tree("lower", layer(RICH))
        upper = self.tree("upper", layer(RICH))
        shutil.rmtree(os.path.join(upper, "home"))
        os.remove(os.path.join(upper, "bin/sh"))
        with open(os.path.join(upper, "etc/new"), "w") as f:
            f.write("new")
        os.utime(os.path.join(upper, "etc/new"), ns=(MTIME * NS, MTIME * NS))
        go = subprocess.run([tool, "diff", lower, upper], capture_output=True, check=True).stdout
        ours = self.diff(lower, upper)

        def headers(tar: bytes) -> list[tuple]:
            r = TarReader(io.BytesIO(tar))
            out = []
            while (h := r.next()) is not None:
                whiteout = b".wh." in h.name
                out.append((h.name, h.typeflag, h.mode, h.uid, h.gid, h.size, None if whiteout else h.mtime_ns))
            return out

        self.assertEqual(headers(ours), headers(go))  # whiteout times are Go's time.Now()

    def test_go_applies_ours_and_we_apply_gos(self) -> None:
        tool = go_tool()
        r1 = self.tree("r1", layer(RICH))
        os.removexattr(os.path.join(r1, "home/user/.profile"), "user.note")  # not exported by default
        ours = self.diff(None, r1)
        g = os.path.join(self.top, "go-applied")
        os.makedirs(g)
        subprocess.run([tool, "apply", g], input=ours, check=True, capture_output=True)
        self.assertEqual(snapshot(g), snapshot(r1))
        go = subprocess.run([tool, "diff", "", g], capture_output=True, check=True).stdout
        p = self.tree("py-applied", go)
        self.assertEqual(snapshot(p), snapshot(g))

    def test_go_and_we_contain_the_same_hostile_layer(self) -> None:
        tool = go_tool()
        hostile = layer(
            [
                entry("etc", "dir"),
                entry("etc/passwd", data=b"inside"),
                entry("localetc", "symlink", link="/etc"),
                entry("localetc/unbroken", data=b"1"),
                entry("up", "symlink", link="/dummy/../../../etc"),
                entry("up/unbroken2", data=b"2"),
                entry("../../escape", data=b"3"),
                entry("breakouts", "dir"),
                entry("breakouts/d1", "symlink", link="../../etc"),
                entry("breakouts/mypasswd", "link", link="/breakouts/d1/passwd"),
                entry("l2", "link", link="../../../../../etc/passwd"),
                entry("a", "dir"),
                entry("a/b", "symlink", link="../../x/y"),
                entry("a/b/c/d", data=b"4"),
            ]
        )
        g = os.path.join(self.top, "go")
        os.makedirs(g)
        subprocess.run([tool, "apply", g], input=hostile, check=True, capture_output=True)
        p = self.tree("py", hostile)
        self.assertEqual(snapshot(p, times=False), snapshot(g, times=False))
        self.assertTrue(stat.S_ISREG(os.lstat(os.path.join(p, "x/y/c/d")).st_mode))
