"""Issue 5 acceptance: hostile layers are rejected or contained, and nothing appears outside the snapshot.

A sentinel world is built around the daemons: one short dir under /tmp
holds ``sentinel/`` and both daemons' dirs (so a climb of N levels from a
snapshot lands at the same place for both), each daemon's root and temp
dir get a ``sentinel/`` of their own, and a host dir
``/tmp/cdt-escape-<random>`` is what absolute names and symlinks aim at.
The layers (:func:`~tests.integration.images_support.hostile_images`) use
``..`` climbs, absolute names, symlinks (same layer and from a lower
layer), symlinked parent dirs, hard links out of the root, whiteouts and
opaque markers aimed outside, a header claiming 1 TiB, truncated gzip and
tar streams and a wrong diff id.

For every case, on both daemons and both snapshotters: ``ctr images
import`` may fail or succeed, but afterwards every sentinel tree is
unchanged (names, types, modes, owners, sizes, contents, mtimes, link
counts, xattrs), nothing named with the run's marker exists outside the
daemon's snapshot dirs (nor in /tmp or /), and no mount is left.  Then,
case by case: where containerd contains a layer, cdtwist must reject it
or contain it the same way (same rootfs); where both reject it, with the
same error; broken streams must fail on both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.trial import unittest

from tests.integration import images_support as images
from tests.integration.harness import (
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonProcess,
    SharedDaemon,
    make_short_tmpdir,
    module_suite,
)
from tests.integration.images_support import CtrCase, normalise, run_ctr

#: cases whose stream or digest is broken: both daemons must refuse them, with the same error
MUST_FAIL = ("huge-header", "truncated-gzip", "truncated-tar", "diff-id-mismatch")


class SentinelWorld:
    """The dirs around the daemons that hostile layers must not touch; a fixture like :class:`SharedDaemon`."""

    def __init__(self) -> None:
        self.parent = ""
        self.escape = ""
        self.marker = ""
        self._depth = 0

    def ensure(self) -> None:
        """Build the world (once): ``parent/sentinel``, daemon dirs' sentinels, the host escape dir."""
        if self.parent:
            return
        self.marker = "cdtmark" + secrets.token_hex(4)
        self.parent = make_short_tmpdir("cdth")
        self.escape = f"/tmp/cdt-escape-{secrets.token_hex(6)}"
        for root in [os.path.join(self.parent, "sentinel"), self.escape] + self.daemon_sentinels():
            os.makedirs(os.path.join(root, "dir"))
            for name, data in (("keep", "keep\n"), ("target", "host file\n"), ("dir/a", "a\n")):
                with open(os.path.join(root, name), "w") as f:
                    f.write(data)
            os.symlink("keep", os.path.join(root, "link"))
            os.chmod(os.path.join(root, "keep"), 0o640)

    def daemon_dir(self, name: str) -> str:
        return os.path.join(self.parent, name)

    def daemon_sentinels(self) -> list[str]:
        """A ``sentinel/`` in each daemon's root and temp dir (created before the daemon starts)."""
        return [
            os.path.join(self.parent, daemon, sub, "sentinel")
            for daemon in ("cdtwist", "containerd")
            for sub in ("root", "tmp")
        ]

    def remove(self) -> None:
        if self.parent:
            shutil.rmtree(self.parent, ignore_errors=True)
            shutil.rmtree(self.escape, ignore_errors=True)
        self.parent = self.escape = ""

    @contextmanager
    def scope(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.remove()

    def get(self, testcase: unittest.TestCase) -> SentinelWorld:
        self.ensure()
        if self._depth == 0:
            testcase.addCleanup(self.remove)
        return self

    # -- what must not change --------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """Every sentinel tree (and the escape dir), entry by entry."""
        out: dict[str, Any] = {}
        for root in [os.path.join(self.parent, "sentinel"), self.escape] + self.daemon_sentinels():
            out[root] = _stat(root)
            for dirpath, dirnames, filenames in os.walk(root):
                for name in sorted(dirnames + filenames):
                    path = os.path.join(dirpath, name)
                    out[path] = _stat(path)
        out["parent entries"] = sorted(os.listdir(self.parent))
        return out

    def escapes(self) -> list[str]:
        """Paths named with the marker outside the daemons' snapshot dirs: under the world, in /tmp, in /.

        Everything under a snapshotter's ``snapshots/`` dir counts as inside
        (a snapshot being removed is renamed there first).
        """
        inside = {
            os.path.join(self.parent, daemon, "root", snapshotter, "snapshots")
            for daemon in ("cdtwist", "containerd")
            for snapshotter in ("io.containerd.snapshotter.v1.overlayfs", "io.containerd.snapshotter.v1.native")
        }
        found = []
        for dirpath, dirnames, filenames in os.walk(self.parent):
            if dirpath in inside:
                dirnames[:] = []
                continue
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if self.marker in n]
        for top in ("/tmp", "/"):
            found += [os.path.join(top, n) for n in os.listdir(top) if self.marker in n]
        return sorted(found)


def _stat(path: str) -> tuple[Any, ...]:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        content: Any = images.file_sha256(path)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    else:
        content = None
    try:
        xattrs = sorted(
            (n, os.getxattr(path, n, follow_symlinks=False)) for n in os.listxattr(path, follow_symlinks=False)
        )
    except OSError:
        xattrs = []
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, st.st_ino, content, xattrs)


WORLD = SentinelWorld()


def _daemon(cls: type[DaemonProcess], name: str) -> DaemonProcess:
    WORLD.ensure()
    return cls(WORLD.daemon_dir(name))


CDTWIST: SharedDaemon[Any] = SharedDaemon(lambda: _daemon(CdtwistDaemon, "cdtwist"), CdtwistDaemon.check_requirements)
CONTAINERD_D: SharedDaemon[Any] = SharedDaemon(
    lambda: _daemon(ContainerdDaemon, "containerd"), ContainerdDaemon.check_requirements
)


def test_suite() -> unittest.TestSuite:
    """trial's hook: the module's tests share the sentinel world and both daemons in it."""
    return module_suite(__name__, WORLD, CDTWIST, CONTAINERD_D)  # type: ignore[arg-type]


class OverlayfsHostileLayerTests(CtrCase):
    """Every hostile case imported with ``--snapshotter overlayfs`` (native: the subclass)."""

    shared = (CDTWIST, CONTAINERD_D)
    snapshotter = "overlayfs"

    def setUp(self) -> None:
        self.world = WORLD.get(self)
        super().setUp()

    def test_hostile_layers_are_rejected_or_contained(self) -> None:
        world = self.world
        blob_dir = self.tmpdir()
        cases = images.hostile_images(blob_dir, world.parent, world.escape, world.marker)
        layouts = {
            name: images.write_oci_layout(os.path.join(blob_dir, f"{name}.tar"), [(image, [f"hostile/{name}:1"])])
            for name, image in cases.items()
        }

        def scenario(d: DaemonProcess, ns: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, image in cases.items():
                out[name] = self.try_case(d, ns, name, image, layouts[name])
            out["snapshots left"] = self.c(d, ns, "snapshots", "--snapshotter", self.snapshotter, "ls")
            return out

        ns = images.unique("hostile")
        cdtwist, containerd = (scenario(d, ns) for d in self.daemons)
        # safety held on both (try_case asserted it); now how each daemon dealt with each case
        problems = []
        for name in cases:
            mine, theirs = cdtwist[name], containerd[name]
            if name in MUST_FAIL:
                self.assertNotEqual(theirs[0], 0, f"containerd accepted {name}")
                if mine[0] == 0:
                    problems.append(f"{name}: cdtwist accepted it")
            if mine[0] != 0 and theirs[0] != 0 and mine[1] != theirs[1]:
                problems.append(f"{name}: rejected with another error:\ncdtwist:    {mine[1]}containerd: {theirs[1]}")
            elif mine[0] == 0 and theirs[0] == 0 and mine[2] != theirs[2]:
                problems.append(f"{name}: contained differently:\n" + images.tree_diff(theirs[2], mine[2]))
        self.assertEqual(cdtwist["snapshots left"], containerd["snapshots left"])
        self.assertEqual(problems, [], "cdtwist dealt with hostile layers unlike containerd")

    def try_case(self, d: DaemonProcess, ns: str, name: str, image: images.Image, layout: str) -> tuple[Any, ...]:
        """Import one case; assert nothing changed outside; (rc, ctr's error, rootfs tree or None)."""
        world = self.world
        before = world.fingerprint()
        result = run_ctr(d, "images", "import", "--snapshotter", self.snapshotter, layout, namespace=ns)
        self.assertEqual(world.fingerprint(), before, f"{d.name}, {name}: a sentinel changed\n{result}")
        self.assertEqual(world.escapes(), [], f"{d.name}, {name}: files escaped\n{result}")
        self.assertEqual(images.mounts_under(d.tmpdir), [], f"{d.name}, {name}: mounts left")
        tree = None
        if result.rc == 0:
            target = self.target(d, f"{ns}-{name}")
            images.mount_all(self.view(d, ns, self.snapshotter, f"look-{name}", image.chain_id), target)
            try:
                tree = images.strip_dir_mtimes(images.scan_tree(target))  # parents made on the way: now
            finally:
                images.unmount_all(target)
            run_ctr(d, "snapshots", "--snapshotter", self.snapshotter, "rm", f"look-{name}", namespace=ns).ok()
            tree = {
                k.replace(world.marker, "<M>"): tuple(
                    v.replace(world.escape, "<E>").replace(world.parent, "<P>") if isinstance(v, str) else v
                    for v in node
                )
                for k, node in tree.items()
            }
        run_ctr(d, "images", "rm", "--sync", f"hostile/{name}:1", namespace=ns)
        error = "".join(line for line in result.stderr.splitlines(keepends=True) if line.startswith("ctr: "))
        return result.rc, normalise(error, d).replace(world.marker, "<M>"), tree


class NativeHostileLayerTests(OverlayfsHostileLayerTests):
    """The same cases with ``--snapshotter native``."""

    snapshotter = "native"
