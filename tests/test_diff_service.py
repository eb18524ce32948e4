"""The walking differ and ``containerd.services.diff.v1.Diff``: apply and compare through the content store.

Layers are applied onto real snapshots (native: through a temporary mount;
overlay: straight onto the upper directory with overlay whiteouts) and
diffs are written to the namespaced content store, as containerd's
``fsApplier`` and ``walkingDiff`` do, with their errors.  Root is needed
(mounts, device nodes, trusted xattrs).  No mount may outlive a test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
from google.protobuf import any_pb2
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cdtwist.api.services.diff.v1 import diff_pb2 as api
from cdtwist.api.services.diff.v1 import diff_pb2_grpc as api_grpc
from cdtwist.api.types import descriptor_pb2, mount_pb2
from cdtwist.config import StreamProcessor
from cdtwist.content.local import LocalStore
from cdtwist.diff import service as dsvc
from cdtwist.diff.compression import MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_GZIP, UNCOMPRESSED_LABEL
from cdtwist.diff.walking import Descriptor, WalkingDiffer, processor_registry, unique_ref
from cdtwist.errors import CdtwistError, FailedPrecondition, InvalidArgument, NotFound, NotImplemented_
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.metadata import leases as leasing
from cdtwist.metadata.content import NamespacedContentStore
from cdtwist.metadata.db import DB
from cdtwist.metadata.gc import Collector
from cdtwist.mount import Mount, mount_table, temp_mount_location
from cdtwist.plugin import DIFFER, Registration, SkipPlugin
from cdtwist.plugin.context import Meta, Plugin, PluginSet
from cdtwist.snapshots.native import NativeSnapshotter
from cdtwist.snapshots.overlay import OverlaySnapshotter
from tests.test_diff_support import entry, layer

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None

Code = grpc.StatusCode
NS = "default"

BASE = layer(
    [
        entry("etc", "dir"),
        entry("etc/hello", data=b"hello\n"),
        entry("etc/gone", data=b"gone\n"),
        entry("opaque", "dir"),
        entry("opaque/old", data=b"old\n"),
        entry("bin", "dir"),
        entry("bin/tool", data=b"#!tool", mode=0o755),
        entry("bin/link", "symlink", link="tool"),
    ]
)
CHANGE = layer(
    [
        entry("etc", "dir"),
        entry("etc/.wh.gone"),
        entry("etc/hello", data=b"hello again\n"),
        entry("opaque", "dir"),
        entry("opaque/.wh..wh..opq"),
        entry("opaque/new", data=b"new\n"),
    ]
)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stray_mounts() -> set[str]:
    return {m.mountpoint for m in mount_table() if "containerd-mount" in m.mountpoint}


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root (mounts)")
        self.tmp = tempfile.mkdtemp(prefix="cdtds", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        before = stray_mounts()
        self.addCleanup(lambda: self.assertEqual(stray_mounts() - before, set(), "temp mounts left behind"))
        self.db = DB(os.path.join(self.tmp, "meta.sqlite"))
        self.db.open()
        self.addCleanup(self.db.close)
        self.collector = Collector(self.db)
        self.store = NamespacedContentStore(
            self.db, LocalStore(os.path.join(self.tmp, "content")), collector=self.collector
        )
        self.differ = WalkingDiffer(self.store)
        self.native = NativeSnapshotter(os.path.join(self.tmp, "native"))
        self.addCleanup(self.native.close)
        self.overlay = OverlaySnapshotter(os.path.join(self.tmp, "overlay"))
        self.addCleanup(self.overlay.close)

    def blob(self, data: bytes, labels: dict[str, str] | None = None, namespace: str = NS) -> str:
        w = self.store.writer(namespace, unique_ref())
        w.write(data)
        w.commit(labels=labels)
        return digest(data)

    def layer_desc(self, data: bytes, media_type: str = MEDIA_TYPE_IMAGE_LAYER) -> Descriptor:
        return Descriptor(media_type=media_type, digest=self.blob(data), size=len(data))

    def apply(self, mounts: list[Mount], data: bytes, media_type: str = MEDIA_TYPE_IMAGE_LAYER) -> Descriptor:
        return self.differ.apply(NS, self.layer_desc(data, media_type), mounts)

    def view(self, sn: object, key: str, parent: str) -> dict[str, bytes | str]:
        """What a read-only view of ``parent`` holds: file contents, link targets, dirs."""
        from cdtwist.mount import with_readonly_temp_mount

        mounts = sn.view(key, parent)  # type: ignore[attr-defined]
        try:
            return with_readonly_temp_mount(mounts, tree)
        finally:
            sn.remove(key)  # type: ignore[attr-defined]


def tree(root: str) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


EXPECTED = {
    "bin": "dir",
    "bin/link": "-> tool",
    "bin/tool": b"#!tool",
    "etc": "dir",
    "etc/hello": b"hello again\n",
    "opaque": "dir",
    "opaque/new": b"new\n",
}


class ApplyTests(_Case):
    def two_layers(self, sn: object, base: bytes, change: bytes, media_type: str = MEDIA_TYPE_IMAGE_LAYER) -> None:
        applied = self.apply(sn.prepare("l1", ""), base, media_type)  # type: ignore[attr-defined]
        sn.commit("c1", "l1")  # type: ignore[attr-defined]
        self.mounts = sn.prepare("l2", "c1")  # type: ignore[attr-defined]
        self.last = self.apply(self.mounts, change, media_type)
        sn.commit("c2", "l2")  # type: ignore[attr-defined]
        self.assertEqual(applied, Descriptor(MEDIA_TYPE_IMAGE_LAYER, digest(BASE), len(BASE)))

    def test_native_through_a_temporary_mount(self) -> None:
        self.two_layers(self.native, BASE, CHANGE)
        self.assertEqual(self.last, Descriptor(MEDIA_TYPE_IMAGE_LAYER, digest(CHANGE), len(CHANGE)))
        self.assertEqual(self.view(self.native, "v", "c2"), EXPECTED)

    def test_overlay_onto_the_upper_dir(self) -> None:
        self.two_layers(self.overlay, BASE, CHANGE)
        self.assertEqual(self.view(self.overlay, "v", "c2"), EXPECTED)
        # the second layer went straight to its upper dir: whiteouts are 0/0 devices, opaque dirs marked
        (upper,) = [o.removeprefix("upperdir=") for o in self.mounts[0].options if o.startswith("upperdir=")]
        st = os.lstat(os.path.join(upper, "etc", "gone"))
        self.assertTrue(stat.S_ISCHR(st.st_mode))
        self.assertEqual(st.st_rdev, 0)
        self.assertEqual(os.getxattr(os.path.join(upper, "opaque"), "trusted.overlay.opaque"), b"y")

    def test_compressed_layers(self) -> None:
        self.two_layers(self.native, gzip.compress(BASE), gzip.compress(CHANGE), MEDIA_TYPE_IMAGE_LAYER_GZIP)
        # the descriptor is the uncompressed tar's: the diff id
        self.assertEqual(self.last, Descriptor(MEDIA_TYPE_IMAGE_LAYER, digest(CHANGE), len(CHANGE)))
        self.assertEqual(self.view(self.native, "v", "c2"), EXPECTED)

    def test_zstd_layer(self) -> None:
        if zstandard is None:
            raise SkipTest("zstandard not installed")
        data = zstandard.ZstdCompressor().compress(BASE)
        out = self.apply(self.native.prepare("l", ""), data, MEDIA_TYPE_IMAGE_LAYER + "+zstd")
        self.assertEqual(out.digest, digest(BASE))

    def test_trailing_data_counts(self) -> None:
        """Everything after the archive's end is read and hashed, as containerd's applier does."""
        data = BASE + b"\0" * 4096
        out = self.apply(self.native.prepare("l", ""), data)
        self.assertEqual(out, Descriptor(MEDIA_TYPE_IMAGE_LAYER, digest(data), len(data)))

    def test_expected_diff_id(self) -> None:
        mounts = self.native.prepare("l", "")
        desc = self.layer_desc(BASE)
        self.differ.apply(NS, desc, mounts, expected_diff_id=digest(BASE))
        e = self.assertRaises(CdtwistError, self.differ.apply, NS, desc, mounts, expected_diff_id="sha256:" + "0" * 64)
        self.assertEqual(str(e), f'wrong diff id calculated on extraction "sha256:{"0" * 64}"')

    def test_errors(self) -> None:
        mounts = self.native.prepare("l", "")
        missing = Descriptor(MEDIA_TYPE_IMAGE_LAYER, "sha256:" + "1" * 64, 1)
        e = self.assertRaises(NotFound, self.differ.apply, NS, missing, mounts)
        self.assertEqual(str(e), f"failed to get reader from content store: content digest {missing.digest}: not found")
        e2 = self.assertRaises(FailedPrecondition, self.differ.apply, "", missing, mounts)
        self.assertEqual(str(e2), "failed to get reader from content store: namespace is required: failed precondition")
        self.assertRaises(InvalidArgument, self.differ.apply, "-bad", missing, mounts)
        odd = self.layer_desc(b"whatever", "application/x-nope")
        e3 = self.assertRaises(CdtwistError, self.differ.apply, NS, odd, mounts)
        self.assertEqual(str(e3), "failed to get stream processor for application/x-nope: no processor for media-type")
        broken = self.layer_desc(gzip.compress(BASE)[:-20], MEDIA_TYPE_IMAGE_LAYER_GZIP)
        self.assertRaises(CdtwistError, self.differ.apply, NS, broken, mounts)
        bad_mount = [Mount("bind", os.path.join(self.tmp, "nope"), ["rbind"])]
        e4 = self.assertRaises(CdtwistError, self.differ.apply, NS, self.layer_desc(BASE), bad_mount)
        self.assertIn("failed to mount", str(e4))

    def test_temporary_mount_location(self) -> None:
        """Native targets are mounted under the daemon's temp mount dir (``<root>/tmpmounts``), then removed."""
        from cdtwist import mount as mountmod
        from cdtwist.diff import walking

        location = os.path.join(self.tmp, "tmpmounts")
        old = temp_mount_location()
        mountmod.set_temp_mount_location(location)
        self.addCleanup(setattr, mountmod, "_temp_mount_location", old)
        roots: list[str] = []
        real = walking.apply_layer
        self.patch(walking, "apply_layer", lambda root, *a, **k: (roots.append(root), real(root, *a, **k))[1])
        self.apply(self.native.prepare("l", ""), BASE)
        self.assertEqual(len(roots), 1)
        self.assertEqual(os.path.dirname(roots[0]), location)
        self.assertEqual(os.listdir(location), [])

    def test_configured_stream_processor_with_payload(self) -> None:
        """A ``[stream_processors]`` binary turns its media type into a tar; the request's payload is on fd 3."""
        script = os.path.join(self.tmp, "proc.sh")
        seen = os.path.join(self.tmp, "payload")
        with open(script, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""\
                    #!/bin/sh
                    cat <&3 > {seen}
                    echo "$STREAM_PROCESSOR_MEDIATYPE" >> {seen}
                    base64 -d
                    """
                )
            )
        os.chmod(script, 0o755)
        processors = {
            "test.b64": StreamProcessor(
                accepts=["application/x-b64-tar"], returns=MEDIA_TYPE_IMAGE_LAYER, path=script, args=[], env=[]
            )
        }
        differ = WalkingDiffer(self.store, processor_registry(processors))
        import base64

        desc = self.layer_desc(base64.b64encode(BASE), "application/x-b64-tar")
        payload = any_pb2.Any(type_url="x/y", value=b"secret")
        out = differ.apply(NS, desc, self.native.prepare("l", ""), {"test.b64": payload})
        self.assertEqual(out.digest, digest(BASE))
        with open(seen, "rb") as f:
            self.assertEqual(f.read(), payload.SerializeToString() + b"application/x-b64-tar\n")


class CompareTests(_Case):
    def setUp(self) -> None:
        super().setUp()
        self.differ.apply(NS, self.layer_desc(BASE), self.native.prepare("l1", ""))
        self.native.commit("c1", "l1")
        self.upper = self.native.prepare("l2", "c1")
        self.differ.apply(NS, self.layer_desc(CHANGE), self.upper)
        self.lower = self.native.view("v1", "c1")

    def members(self, desc: Descriptor) -> list[str]:
        data = self.store.reader(NS, desc.digest).read_all()
        if desc.media_type == MEDIA_TYPE_IMAGE_LAYER_GZIP:
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            return [m.name for m in tf]

    def test_gzip_layer_in_the_content_store(self) -> None:
        desc = self.differ.compare(NS, self.lower, self.upper, labels={"a": "b"})
        self.assertEqual(desc.media_type, MEDIA_TYPE_IMAGE_LAYER_GZIP)
        info = self.store.info(NS, desc.digest)
        self.assertEqual(info.size, desc.size)
        raw = gzip.decompress(self.store.reader(NS, desc.digest).read_all())
        self.assertEqual(info.labels, {"a": "b", UNCOMPRESSED_LABEL: digest(raw)})
        self.assertEqual(
            self.members(desc),
            ["etc", "etc/.wh.gone", "etc/hello", "opaque", "opaque/new", "opaque/.wh.old"],
        )
        # nothing left of the upload
        self.assertEqual(self.store.list_statuses(NS), [])

    def test_tar_layer_and_ref(self) -> None:
        desc = self.differ.compare(NS, self.lower, self.upper, media_type=MEDIA_TYPE_IMAGE_LAYER, ref="my-ref")
        self.assertEqual(desc.media_type, MEDIA_TYPE_IMAGE_LAYER)
        self.assertEqual(self.store.info(NS, desc.digest).labels, {})
        # a ref left over from an earlier upload is truncated and reused
        w = self.store.writer(NS, "again")
        w.write(b"junk")
        w.close()
        again = self.differ.compare(NS, self.lower, self.upper, media_type=MEDIA_TYPE_IMAGE_LAYER, ref="again")
        self.assertEqual(again.digest, desc.digest)

    def test_existing_blob_gets_the_uncompressed_label(self) -> None:
        first = self.differ.compare(NS, self.lower, self.upper)
        self.store.update(NS, SimpleNamespace(digest=first.digest, labels={}), "labels")  # type: ignore[arg-type]
        second = self.differ.compare(NS, self.lower, self.upper)
        self.assertEqual(second, first)
        self.assertIn(UNCOMPRESSED_LABEL, self.store.info(NS, first.digest).labels)

    def test_lease_holds_the_layer(self) -> None:
        self.db.update(lambda tx: leasing.create(tx, NS, "l"))
        desc = self.differ.compare(NS, self.lower, self.upper, lease="l")
        held = self.db.view(lambda tx: leasing.list_resources(tx, NS, "l"))
        self.assertEqual([(r.type, r.id) for r in held], [("content", desc.digest)])

    def test_errors(self) -> None:
        e = self.assertRaises(NotImplemented_, self.differ.compare, NS, self.lower, self.upper, media_type="x/y")
        self.assertEqual(str(e), "unsupported diff media type: x/y: not implemented")
        e2 = self.assertRaises(FailedPrecondition, self.differ.compare, "", self.lower, self.upper)
        self.assertIn("failed to open writer: namespace is required: failed precondition", str(e2))
        self.assertTrue(str(e2).startswith("mount callback failed on "), str(e2))

    def test_against_nothing(self) -> None:
        """No lower mounts: an empty directory (``ctr snapshots diff`` of a base layer)."""
        desc = self.differ.compare(NS, [], self.native.view("v2", "c1"), media_type=MEDIA_TYPE_IMAGE_LAYER)
        self.assertEqual(
            self.members(desc),
            ["bin", "bin/link", "bin/tool", "etc", "etc/gone", "etc/hello", "opaque", "opaque/old"],
        )


class _NotImplementedDiffer:
    def __init__(self) -> None:
        self.calls = 0

    def apply(self, *args: object, **kw: object) -> Descriptor:
        self.calls += 1
        raise NotImplemented_("nope")

    def compare(self, *args: object, **kw: object) -> Descriptor:
        self.calls += 1
        raise NotImplemented_("nope")


class ServiceTests(SynchronousTestCase):
    def test_first_implementing_differ_answers(self) -> None:
        skip = _NotImplementedDiffer()
        other = SimpleNamespace(
            apply=lambda *a, **k: Descriptor("m", "d", 1), compare=lambda *a, **k: Descriptor("c", "d", 2)
        )
        service = dsvc.DiffService([skip, other])  # type: ignore[list-item]
        self.assertEqual(service.apply(NS, Descriptor(), []), Descriptor("m", "d", 1))
        self.assertEqual(service.compare(NS, [], []), Descriptor("c", "d", 2))
        self.assertEqual(skip.calls, 2)
        e = self.assertRaises(NotImplemented_, dsvc.DiffService([skip]).apply, NS, Descriptor(), [])
        self.assertEqual(str(e), "nope: not implemented")
        # no differ configured: containerd answers an empty descriptor
        self.assertEqual(dsvc.DiffService([]).compare(NS, [], []), Descriptor())

    def test_plugin_config_and_init(self) -> None:
        self.assertEqual(dsvc.DiffServiceConfig().order, ["walking"])
        plugins = PluginSet()

        def init(order: list[str]) -> dsvc.DiffService:
            reg = Registration(type="io.containerd.service.v1", id="diff-service", init=lambda ic: None)
            ic = SimpleNamespace(config=dsvc.DiffServiceConfig(order=order), plugins=plugins, registration=reg)
            return dsvc._init_service(ic)  # type: ignore[arg-type]

        e = self.assertRaises(CdtwistError, init, ["walking"])
        self.assertEqual(str(e), "needed differ not loaded: walking")
        walking = WalkingDiffer.__new__(WalkingDiffer)
        plugins.add(Plugin(Registration(type=DIFFER, id="walking", init=lambda ic: None), Meta(), instance=walking))
        plugins.add(
            Plugin(Registration(type=DIFFER, id="broken", init=lambda ic: None), Meta(), error=SkipPlugin("not here"))
        )
        plugins.add(Plugin(Registration(type=DIFFER, id="odd", init=lambda ic: None), Meta(), instance=object()))
        self.assertEqual(init(["walking"]).differs, [walking])
        self.assertEqual(init([]).differs, [])
        e = self.assertRaises(CdtwistError, init, ["broken"])
        self.assertEqual(str(e), "could not load required differ due plugin init error: broken: not here: skip plugin")
        e = self.assertRaises(CdtwistError, init, ["odd"])
        self.assertEqual(str(e), "differ does not implement Comparer and Applier interface: odd")


class GRPCTests(_Case):
    def setUp(self) -> None:
        super().setUp()
        self.server = grpc.server(ThreadPoolExecutor(4), interceptors=[ErrorAndMetricsInterceptor()])
        dsvc.DiffGRPC(dsvc.DiffService([self.differ])).register_grpc(self.server)
        address = os.path.join(self.tmp, "d.sock")
        self.server.add_insecure_port("unix:" + address)
        self.server.start()
        self.addCleanup(lambda: self.server.stop(None).wait(5))
        channel = grpc.insecure_channel("unix:" + address)
        self.addCleanup(channel.close)
        self.stub = api_grpc.DiffStub(channel)

    @staticmethod
    def pb_mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
        return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]

    def test_apply_and_diff(self) -> None:
        md = [("containerd-namespace", NS)]
        d = self.blob(gzip.compress(BASE))
        req = api.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP, digest=d),
            mounts=self.pb_mounts(self.native.prepare("l1", "")),
        )
        out = self.stub.Apply(req, metadata=md).applied
        self.assertEqual((out.media_type, out.digest, out.size), (MEDIA_TYPE_IMAGE_LAYER, digest(BASE), len(BASE)))
        self.native.commit("c1", "l1")
        upper = self.native.prepare("l2", "c1")
        lower = self.native.view("v", "c1")
        diff = self.stub.Diff(
            api.DiffRequest(
                left=self.pb_mounts(lower),
                right=self.pb_mounts(upper),
                media_type=MEDIA_TYPE_IMAGE_LAYER,
                ref="r",
                labels={"x": "y"},
            ),
            metadata=md,
        ).diff
        self.assertEqual(diff.media_type, MEDIA_TYPE_IMAGE_LAYER)
        self.assertEqual(self.store.info(NS, diff.digest).labels, {"x": "y"})

    def test_errors(self) -> None:
        req = api.ApplyRequest(diff=descriptor_pb2.Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER, digest=digest(b"x")))
        err = self.assertRaises(grpc.RpcError, self.stub.Apply, req)
        self.assertEqual(
            (err.code(), err.details()),
            (
                Code.FAILED_PRECONDITION,
                "failed to get reader from content store: namespace is required: failed precondition",
            ),
        )
        err = self.assertRaises(
            grpc.RpcError, self.stub.Diff, api.DiffRequest(media_type="x/y"), metadata=[("containerd-namespace", NS)]
        )
        self.assertEqual(
            (err.code(), err.details()), (Code.UNIMPLEMENTED, "unsupported diff media type: x/y: not implemented")
        )
