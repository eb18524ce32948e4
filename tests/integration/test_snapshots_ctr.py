"""Issue 5 acceptance: ``ctr snapshots ...`` on cdtwist and on containerd, side by side.

One scenario runs on both daemons, for ``overlayfs`` and for ``native``:
prepare, mount what the snapshotter hands out and write files (regular,
executable, symlink, hard link, nested dirs), commit, prepare a child and
change, delete and replace things in it, then every ``ctr snapshots``
subcommand: ``ls``, ``tree``, ``info``, ``usage``, ``mounts``, ``label``,
``view``, ``diff`` (against the parent and between two snapshots, ``tar``
and ``tar+gzip``, ``--keep``/``--ref``/``--label``), ``commit``, ``rm``, and
their failures.  Outputs must be the same modulo ids, paths and times; the
layers ``diff`` writes must hold the same entries (names, types, modes,
owners, sizes, link targets, contents, whiteouts).  The events the
scenario publishes must match too, and nothing may stay mounted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from twisted.trial import unittest

from cdtwist.api.services.content.v1 import content_pb2 as capi
from cdtwist.api.services.content.v1 import content_pb2_grpc as capi_grpc
from cdtwist.api.services.diff.v1 import diff_pb2 as dapi
from cdtwist.api.services.diff.v1 import diff_pb2_grpc as dapi_grpc
from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as sapi
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as sapi_grpc
from cdtwist.api.types import descriptor_pb2
from cdtwist.mount import MNT_DETACH, Mount, mount_all, mounted_under, unmount, unmount_all
from tests.integration.harness import (
    BackgroundCtr,
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonProcess,
    SharedDaemon,
    ctr_args,
    module_suite,
    require_root,
    start_cdtwist,
    start_containerd,
)

#: The scenario creates snapshots ``ctr`` gives no lease and no ``gc.root`` (views): with
#: collections running, whether one is still there depends on when the last deletion's
#: collection ran.  With the first collection an hour away, deletions only count towards
#: it (containerd's scheduler policy, which cdtwist's follows), so the shared daemons
#: never collect; :class:`GarbageCollectionTests` has daemons that do.
LATE_GC = '[plugins."io.containerd.gc.v1.scheduler"]\n  startup_delay = "1h"\n'
CDTWIST: SharedDaemon[CdtwistDaemon] = SharedDaemon(
    lambda: CdtwistDaemon(None, LATE_GC), CdtwistDaemon.check_requirements
)
CONTAINERD_D: SharedDaemon[ContainerdDaemon] = SharedDaemon(
    lambda: ContainerdDaemon(None, LATE_GC), ContainerdDaemon.check_requirements
)


def test_suite() -> unittest.TestSuite:
    """trial's hook: this module's tests share :data:`CDTWIST` and :data:`CONTAINERD_D`."""
    return module_suite(__name__, CDTWIST, CONTAINERD_D)


_names = itertools.count(1)
TAR = "application/vnd.oci.image.layer.v1.tar"
GC_ROOT = {"containerd.io/gc.root": "2023-01-01T00:00:00Z"}
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def run_ctr(daemon: DaemonProcess, *args: str, namespace: str, timeout: float = 60) -> tuple[int, bytes, str]:
    """``ctr`` with binary-safe stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    proc = subprocess.run(
        ctr_args(daemon.address, *args, namespace=namespace),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")


def normalise(text: str, daemon: DaemonProcess) -> str:
    """Times, the daemon's temp dir and backend snapshot ids replaced; label lists sorted."""
    text = _TIME.sub("<TIME>", text)
    text = re.sub(r'time="[^"]*"', 'time="<TIME>"', text)
    text = text.replace(daemon.tmpdir, "<TMPDIR>")
    text = re.sub(r"/snapshots/\d+(/|\b)", r"/snapshots/<ID>\1", text)
    text = re.sub(r"containerd-mount\d+", "containerd-mount<N>", text)
    return text


def sorted_labels(text: str) -> str:
    """``ctr snapshots label`` prints a Go map: order varies."""
    return ",".join(sorted(text.strip().split(","))) + "\n" if text.strip() else text


def tar_entries(data: bytes) -> list[tuple[Any, ...]]:
    """A layer's entries without times: name, type, mode, owner, size, link, content digest, xattrs."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            content = ""
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                content = hashlib.sha256(f.read()).hexdigest()[:16]
            xattrs = sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr."))
            out.append((m.name, m.type, oct(m.mode), m.uid, m.gid, m.size, m.linkname, content, xattrs))
    return out


def parse_mounts(stdout: bytes) -> list[Mount]:
    """``--mounts`` JSON (Go's ``mount.Mount`` field names)."""
    raw = json.loads(stdout.decode())
    return [Mount(type=m["Type"], source=m["Source"], options=list(m.get("Options") or [])) for m in raw]


def expect_no_mounts(case: unittest.TestCase, *dirs: str) -> None:
    """When the test ends (before its daemons stop), nothing may be mounted under ``dirs``."""

    def check() -> None:
        left = [m for d in dirs for m in mounted_under(d)]
        for target in left:
            unmount(target, MNT_DETACH)
        case.assertEqual(left, [], "mounts left behind")

    case.addCleanup(check)


class Run:
    """One daemon's side of the scenario: commands and what they printed, normalised."""

    def __init__(self, case: unittest.TestCase, daemon: DaemonProcess, snapshotter: str) -> None:
        self.case = case
        self.daemon = daemon
        self.snapshotter = snapshotter
        self.namespace = unique("snap")
        self.work = tempfile.mkdtemp(prefix="cdtsn", dir="/tmp")
        case.addCleanup(shutil.rmtree, self.work, True)
        expect_no_mounts(case, self.work, daemon.tmpdir)
        self.transcript: list[tuple[str, int, str, str]] = []
        self.layers: dict[str, list[tuple[Any, ...]]] = {}

    def ctr(self, *args: str, record: bool = True, labels: bool = False) -> tuple[int, bytes, str]:
        rc, out, err = run_ctr(
            self.daemon, "snapshots", "--snapshotter", self.snapshotter, *args, namespace=self.namespace
        )
        if record:
            text = self.norm(out.decode("utf-8", "replace"))
            if labels and rc == 0:
                text = sorted_labels(text)
            self.transcript.append((self.words(args), rc, text, self.norm(err)))
        return rc, out, err

    def norm(self, text: str) -> str:
        return normalise(text, self.daemon).replace(self.namespace, "<NS>")

    def words(self, args: tuple[str, ...] | list[str]) -> str:
        return " ".join(args).replace(self.namespace, "<NS>")

    def mounted(self, key: str, mounts: list[Mount], change: Any) -> None:
        target = os.path.join(self.work, key)
        os.makedirs(target, exist_ok=True)
        mount_all(mounts, target)
        try:
            change(target)
        finally:
            unmount_all(target)

    # -- the scenario ---------------------------------------------------------

    def scenario(self) -> None:
        rc, out, _ = self.ctr("prepare", "--mounts", "base-a", record=False)
        self.case.assertEqual(rc, 0)
        self.mounted("base-a", parse_mounts(out), write_base)
        self.ctr("commit", "base", "base-a")
        rc, out, _ = self.ctr("prepare", "--mounts", "layer-a", "base", record=False)
        self.case.assertEqual(rc, 0)
        self.mounted("layer-a", parse_mounts(out), change_layer)
        for args in (["ls"], ["tree"], ["info", "layer-a"], ["info", "base"], ["usage", "-b"], ["usage", "base"]):
            self.ctr(*args)
        self.ctr("mounts", "/target", "layer-a")
        self.layers["active-vs-parent"] = self.diff("--media-type", TAR, "layer-a")
        # Kept first: an unkept identical layer may or may not be collected yet when the next one commits.
        self.layers["kept"] = self.diff("--keep", "--ref", "kept-" + self.namespace, "--label", "a=b", "layer-a")
        self.layers["active-vs-parent-gzip"] = self.diff("layer-a")
        self.content_ls()
        self.ctr("commit", "layer", "layer-a")
        self.layers["committed-vs-parent"] = self.diff("--media-type", TAR, "layer")
        self.layers["between"] = self.diff("--media-type", TAR, "layer", "base")
        self.layers["reverse"] = self.diff("--media-type", TAR, "base", "layer")
        rc, out, _ = self.ctr("view", "--mounts", "view", "layer", record=False)
        self.case.assertEqual(rc, 0)
        self.mounted("view", parse_mounts(out), check_view)
        for args in (
            ["mounts", "/target", "view"],
            ["ls"],
            ["tree"],
            ["usage", "-b"],
            ["rm", "view"],
            ["view", "single", "base"],
            ["mounts", "/target", "single"],
            ["rm", "single"],
        ):
            self.ctr(*args)
        self.ctr("label", "layer", "x=1", "y=2", labels=True)
        self.ctr("label", "layer", "x=", labels=True)
        self.ctr("info", "layer")
        # failures
        for args in (
            ["commit", "layer", "nothing"],
            ["commit", "other", "nothing"],
            ["prepare", "p", "nothing"],
            ["prepare", "base-x", "base"],
            ["prepare", "base"],
            ["view", "layer"],
            ["mounts", "/target", "layer"],
            ["mounts", "/target", "nothing"],
            ["usage", "nothing"],
            ["info", "nothing"],
            ["label", "nothing", "a=b"],
            ["rm", "base"],
            ["rm", "nothing"],
            ["diff", "nothing"],
            ["diff", "--media-type", "application/x-nope", "layer"],
        ):
            self.ctr(*args)
        self.ctr("rm", "base-x", "layer")
        self.ctr("rm", "base")
        self.ctr("ls")
        rc, out, err = run_ctr(self.daemon, "namespaces", "rm", self.namespace, namespace=self.namespace)
        self.transcript.append(("namespaces rm", rc, self.norm(out.decode()), self.norm(err)))

    def diff(self, *args: str) -> list[tuple[Any, ...]]:
        rc, out, err = self.ctr("diff", *args, record=False)
        self.transcript.append(("diff " + self.words(args), rc, "", self.norm(err)))
        if rc != 0:
            return []
        if out[:2] == b"\x1f\x8b":
            out = gzip.decompress(out)
        return tar_entries(out)

    def content_ls(self) -> None:
        """The kept layer's blob: its labels (times aside) and media type are containerd's."""
        rc, out, err = run_ctr(self.daemon, "content", "ls", namespace=self.namespace)
        rows = [re.split(r"\t+", line.strip()) for line in out.decode().splitlines()[1:] if line.strip()]
        # Blobs no lease or root holds (ctr's temporary diff leases) go when
        # each daemon's GC next runs: timing, not behaviour. Compare the kept ones.
        rows = [row for row in rows if "containerd.io/gc.root=" in row[-1]]
        # digests differ with the files' times
        labels = sorted(re.sub(r"sha256:[0-9a-f]{64}", "<DIGEST>", sorted_labels(row[-1])).strip() for row in rows)
        labels = [self.norm(text) for text in labels]
        self.transcript.append(("content ls", rc, "\n".join(labels), err))


def event_text(line: str, namespace: str) -> str:
    """A ``ctr events`` line without its time, namespace and the random parts of ``CreateDiff``'s view keys."""
    line = re.sub(r"^\S+ \S+ \S+ \S+ ", "", line).replace(namespace, "<NS>")
    return re.sub(r"-view-\d+-[A-Za-z0-9_=-]{4}", "-view-<U>", line)


def write_base(root: str) -> None:
    os.makedirs(os.path.join(root, "etc"), 0o755)
    os.makedirs(os.path.join(root, "bin"), 0o755)
    os.makedirs(os.path.join(root, "dir/sub/deep"), 0o750)
    os.makedirs(os.path.join(root, "opaque/keep"), 0o755)
    _write(os.path.join(root, "etc/hello"), b"hello\n", 0o644)
    _write(os.path.join(root, "etc/gone"), b"to be deleted\n", 0o600)
    _write(os.path.join(root, "bin/tool"), b"#!/bin/sh\necho tool\n", 0o755)
    _write(os.path.join(root, "dir/sub/deep/file"), b"x" * 10000, 0o640)
    _write(os.path.join(root, "opaque/keep/old"), b"old\n", 0o644)
    os.symlink("../etc/hello", os.path.join(root, "bin/hello-link"))
    os.link(os.path.join(root, "bin/tool"), os.path.join(root, "bin/tool-hard"))
    os.chown(os.path.join(root, "etc/gone"), 1000, 1000)


def change_layer(root: str) -> None:
    os.unlink(os.path.join(root, "etc/gone"))
    shutil.rmtree(os.path.join(root, "dir/sub"))
    _write(os.path.join(root, "etc/hello"), b"hello again\n", 0o644)
    os.chmod(os.path.join(root, "bin/tool"), 0o700)
    _write(os.path.join(root, "new-file"), b"new\n", 0o644)
    os.symlink("/etc/hello", os.path.join(root, "abs-link"))
    # an opaque directory: everything under it replaced
    shutil.rmtree(os.path.join(root, "opaque"))
    os.makedirs(os.path.join(root, "opaque/fresh"), 0o755)
    _write(os.path.join(root, "opaque/fresh/new"), b"fresh\n", 0o644)


def check_view(root: str) -> None:
    names = sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)
    assert names == [
        "abs-link",
        "bin",
        "bin/hello-link",
        "bin/tool",
        "bin/tool-hard",
        "dir",
        "etc",
        "etc/hello",
        "new-file",
        "opaque",
        "opaque/fresh",
        "opaque/fresh/new",
    ], names
    with open(os.path.join(root, "etc/hello"), "rb") as f:
        assert f.read() == b"hello again\n"
    try:
        _write(os.path.join(root, "ro"), b"", 0o644)
    except OSError:
        pass
    else:
        raise AssertionError("a view must be read-only")


def _write(path: str, data: bytes, mode: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


class SnapshotsCtrTests(unittest.TestCase):
    """The scenario's transcript, layers and events: the same on both daemons."""

    def setUp(self) -> None:
        require_root()

    def compare(self, snapshotter: str) -> None:
        ours = Run(self, CDTWIST.get(self), snapshotter)
        theirs = Run(self, CONTAINERD_D.get(self), snapshotter)
        watchers = []
        for run in (ours, theirs):
            w = BackgroundCtr(run.daemon.address, "events", f"namespace=={run.namespace}", 'topic~="/snapshot/"')
            self.addCleanup(w.stop)
            watchers.append(w)
        time.sleep(0.5)  # let the subscriptions settle
        ours.scenario()
        theirs.scenario()
        for mine, other in zip(ours.transcript, theirs.transcript, strict=True):
            self.assertEqual(mine, other)
        self.assertEqual(ours.layers, theirs.layers)
        self.assertTrue(ours.layers["committed-vs-parent"], "the layer must not be empty")
        events = []
        for run, w in zip((ours, theirs), watchers, strict=True):
            w.wait_for(lambda lines: any("/snapshot/remove" in ln and '"key":"base"' in ln for ln in lines))
            lines = w.stop().stdout.splitlines()
            events.append([event_text(line, run.namespace) for line in lines])
        self.assertEqual(events[0], events[1])

    def test_overlayfs(self) -> None:
        self.compare("overlayfs")

    def test_native(self) -> None:
        self.compare("native")

    def test_unknown_snapshotter(self) -> None:
        for daemon in (CDTWIST.get(self), CONTAINERD_D.get(self)):
            rc, _, err = run_ctr(daemon, "snapshots", "--snapshotter", "nope", "ls", namespace="default")
            self.assertEqual((rc, err), (1, "ctr: snapshotter not loaded: nope: invalid argument\n"))


class GarbageCollectionTests(unittest.TestCase):
    """With the collector running: unreferenced snapshots go, from the namespace and from the engine's disk."""

    def setUp(self) -> None:
        require_root()

    def scenario(self, daemon: DaemonProcess, snapshotter: str) -> list[Any]:
        ns = unique("gc")
        expect_no_mounts(self, daemon.tmpdir)

        def ctr(*args: str) -> tuple[int, str]:
            rc, out, err = run_ctr(daemon, "snapshots", "--snapshotter", snapshotter, *args, namespace=ns)
            return rc, out.decode() + err

        def keys() -> list[str]:
            _, out = ctr("ls")
            return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

        def engine_dirs() -> int:
            root = os.path.join(daemon.root, f"io.containerd.snapshotter.v1.{snapshotter}", "snapshots")
            return len(os.listdir(root))

        before = engine_dirs()
        steps: list[Any] = []
        for args in (["prepare", "a"], ["commit", "c", "a"], ["view", "v", "c"], ["prepare", "t"], ["rm", "t"]):
            steps.append(ctr(*args))
        # the removal schedules a collection; the unlabelled view goes with it
        deadline = time.monotonic() + 15
        while "v" in keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        steps.append(keys())
        while engine_dirs() != before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        steps.append(engine_dirs() - before)
        # containerd keeps the collected view in its parent's children: the parent cannot be removed ...
        steps.append(ctr("rm", "c"))
        # ... only collected once nothing references it
        steps.append(ctr("label", "c", "containerd.io/gc.root="))
        steps.append(ctr("prepare", "t2"))
        steps.append(ctr("rm", "t2"))
        while (keys() or engine_dirs() != before) and time.monotonic() < deadline:
            time.sleep(0.1)
        steps.append(engine_dirs() - before)
        steps.append(keys())
        return steps

    def compare(self, snapshotter: str) -> None:
        ours = self.scenario(start_cdtwist(self), snapshotter)
        theirs = self.scenario(start_containerd(self), snapshotter)
        self.assertEqual(ours, theirs)
        self.assertEqual(
            ours[5:8],
            [["c"], 1, (1, 'ctr: failed to remove "c": cannot remove snapshot with child: failed precondition\n')],
        )
        self.assertEqual(ours[-2:], [0, []])

    def test_overlayfs(self) -> None:
        self.compare("overlayfs")

    def test_native(self) -> None:
        self.compare("native")


def outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A comparable summary of a call: its result, or (code name, details)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            result = [len(r.info) for r in result]
        return ("ok", result if isinstance(result, list) else type(result).__name__)
    except grpc.RpcError as e:
        return (e.code().name, e.details())


class GRPCParityTests(unittest.TestCase):
    """What ``ctr`` cannot ask, asked over gRPC of both daemons: the same codes and messages."""

    def calls(self, daemon: DaemonProcess) -> list[Any]:
        ns = unique("grpc")
        expect_no_mounts(self, daemon.tmpdir)
        md = [("containerd-namespace", ns)]
        channel = grpc.insecure_channel("unix:" + daemon.address)
        self.addCleanup(channel.close)
        sn = sapi_grpc.SnapshotsStub(channel)
        diff = dapi_grpc.DiffStub(channel)
        big = {"k" * 20: "v" * 4080}
        mask = field_mask_pb2.FieldMask(paths=["parent"])
        out = [
            outcome(sn.Cleanup, sapi.CleanupRequest(snapshotter="overlayfs"), metadata=md),
            outcome(sn.Cleanup, sapi.CleanupRequest(snapshotter="native"), metadata=md),
            outcome(sn.Cleanup, sapi.CleanupRequest(snapshotter=""), metadata=md),
            outcome(sn.List, sapi.ListSnapshotsRequest(snapshotter="native", filters=["name=="]), metadata=md),
            outcome(sn.List, sapi.ListSnapshotsRequest(snapshotter="native")),
            outcome(sn.Prepare, sapi.PrepareSnapshotRequest(snapshotter="native", key=""), metadata=md),
            outcome(sn.Prepare, sapi.PrepareSnapshotRequest(snapshotter="native", key="big", labels=big), metadata=md),
            outcome(
                sn.Prepare, sapi.PrepareSnapshotRequest(snapshotter="native", key="e", labels={"": "v"}), metadata=md
            ),
            outcome(
                sn.Prepare,
                sapi.PrepareSnapshotRequest(snapshotter="native", key="l"),
                metadata=md + [("containerd-lease", "nope")],
            ),
            outcome(sn.Prepare, sapi.PrepareSnapshotRequest(snapshotter="native", key="a"), metadata=md),
            outcome(sn.Commit, sapi.CommitSnapshotRequest(snapshotter="native", name="", key="a"), metadata=md),
            outcome(sn.Update, sapi.UpdateSnapshotRequest(snapshotter="native", info=sapi.Info(name="")), metadata=md),
            outcome(
                sn.Update,
                sapi.UpdateSnapshotRequest(snapshotter="native", info=sapi.Info(name="a"), update_mask=mask),
                metadata=md,
            ),
            outcome(
                sn.Stat,
                sapi.StatSnapshotRequest(snapshotter="native", key="a"),
                metadata=[("containerd-namespace", "-x")],
            ),
            outcome(sn.List, sapi.ListSnapshotsRequest(snapshotter="native"), metadata=md),
            outcome(sn.Remove, sapi.RemoveSnapshotRequest(snapshotter="native", key="a"), metadata=md),
            outcome(
                diff.Apply,
                dapi.ApplyRequest(diff=descriptor_pb2.Descriptor(media_type=TAR, digest="sha256:" + "a" * 64)),
                metadata=md,
            ),
            outcome(
                diff.Apply,
                dapi.ApplyRequest(diff=descriptor_pb2.Descriptor(media_type=TAR, digest="sha256:" + "a" * 64)),
            ),
            outcome(diff.Diff, dapi.DiffRequest(media_type="x/y"), metadata=md),
        ]
        return [
            re.sub(r"containerd-mount\d+", "containerd-mount<N>", str(o)).replace(daemon.tmpdir, "<T>") for o in out
        ]

    def test_same_answers(self) -> None:
        self.assertEqual(self.calls(CDTWIST.get(self)), self.calls(CONTAINERD_D.get(self)))


def upper_tree(root: str) -> list[tuple[Any, ...]]:
    """A directory as the applier left it: types, modes, owners, device numbers, overlay xattrs, contents."""
    out = []
    for d, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(d, name)
            st = os.lstat(path)
            try:
                opaque = os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False)
            except OSError:
                opaque = b""
            content = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()[:16]
            link = os.readlink(path) if os.path.islink(path) else ""
            out.append(
                (os.path.relpath(path, root), oct(st.st_mode), st.st_uid, st.st_gid, st.st_rdev, opaque, content, link)
            )
    return sorted(out)


class ApplyParityTests(unittest.TestCase):
    """``Diff.Apply`` onto snapshots of both daemons: the same descriptor, the same files, the same whiteouts."""

    def setUp(self) -> None:
        require_root()

    def scenario(self, daemon: DaemonProcess, snapshotter: str) -> list[Any]:
        from tests.test_diff_support import entry, layer

        ns = unique("apply")
        expect_no_mounts(self, daemon.tmpdir)
        md = [("containerd-namespace", ns)]
        channel = grpc.insecure_channel("unix:" + daemon.address)
        self.addCleanup(channel.close)
        sn = sapi_grpc.SnapshotsStub(channel)
        diff = dapi_grpc.DiffStub(channel)
        content = capi_grpc.ContentStub(channel)
        base = layer(
            [
                entry("etc", "dir"),
                entry("etc/hello", data=b"hello\n", uid=3, gid=4),
                entry("etc/gone", data=b"gone\n"),
                entry("etc/link", "link", link="etc/hello"),
                entry("etc/sym", "symlink", link="/etc/hello"),
                entry("opaque", "dir", mode=0o750),
                entry("opaque/old", data=b"old\n"),
                entry("dev", "dir"),
                entry("dev/null", "char", dev=(1, 3), mode=0o666),
            ]
        )
        change = layer(
            [
                entry("etc", "dir"),
                entry("etc/.wh.gone"),
                entry("etc/hello", data=b"hello again\n", mode=0o600),
                entry("opaque", "dir"),
                entry("opaque/.wh..wh..opq"),
                entry("opaque/new", data=b"new\n"),
                entry("new", "dir", mode=0o700),
            ]
        )
        steps: list[Any] = []
        parent = ""
        for i, data in enumerate((gzip.compress(base, mtime=0), change)):
            dgst = "sha256:" + hashlib.sha256(data).hexdigest()
            list(
                content.Write(
                    iter([capi.WriteContentRequest(action=capi.COMMIT, ref=f"l{i}", data=data, total=len(data))]),
                    metadata=md,
                )
            )
            key = f"layer-{i}"
            mounts = sn.Prepare(
                sapi.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=GC_ROOT),
                metadata=md,
            ).mounts
            media = TAR + "+gzip" if i == 0 else TAR
            applied = diff.Apply(
                dapi.ApplyRequest(
                    diff=descriptor_pb2.Descriptor(media_type=media, digest=dgst, size=len(data)), mounts=mounts
                ),
                metadata=md,
            ).applied
            steps.append((applied.media_type, applied.digest, applied.size))
            upper = [o.removeprefix("upperdir=") for m in mounts for o in m.options if o.startswith("upperdir=")]
            steps.append(upper_tree(upper[0] if upper else mounts[0].source))
            name = f"committed-{i}"
            sn.Commit(
                sapi.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=GC_ROOT), metadata=md
            )
            parent = name
        return steps

    def compare(self, snapshotter: str) -> None:
        self.assertEqual(
            self.scenario(CDTWIST.get(self), snapshotter), self.scenario(CONTAINERD_D.get(self), snapshotter)
        )

    def test_overlayfs(self) -> None:
        self.compare("overlayfs")

    def test_native(self) -> None:
        self.compare("native")
