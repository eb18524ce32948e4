"""Images: the metadata image store, its GC roots and ``containerd.services.images.v1.Images``.

``StoreTests`` ports containerd's ``metadata/images_test.go``
(TestImagesList, TestImagesCreateUpdateDelete) and adds the exact error
texts; ``ServiceTests`` run the servicer behind cdtwist's error interceptor
on a real grpcio server beside the content service, so GC through images
is checked with real blobs.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import typeurl
from cdtwist.api.services.content.v1 import content_pb2 as capi
from cdtwist.api.services.images.v1 import images_pb2 as api
from cdtwist.api.services.images.v1 import images_pb2_grpc as api_grpc
from cdtwist.api.services.namespaces.v1 import namespace_pb2 as napi
from cdtwist.api.types import descriptor_pb2
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotFound
from cdtwist.gc import Node
from cdtwist.grpc.interceptors import ErrorAndMetricsInterceptor
from cdtwist.images import service as images_service
from cdtwist.images.service import ImagesGRPC, ImagesService
from cdtwist.metadata import gc as mgc
from cdtwist.metadata import images as store
from cdtwist.metadata import namespaces
from cdtwist.metadata.db import DB
from cdtwist.metadata.images import Descriptor, Image, ImageStore
from cdtwist.plugin import GC, GRPC, METADATA, SERVICE, loader, registry
from tests.test_content_service import Fixture, digest_of

Code = grpc.StatusCode
MEDIA = "application/vnd.oci.image.manifest.v1+json"
BLAB = "application/vnd.oci.blab"
D = Descriptor


def from_string(s: str) -> str:
    """``digest.FromString``."""
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def image_base(name: str = "") -> Image:
    return Image(
        name,
        {"foo": "bar", "baz": "boo"},
        Descriptor("application/vnd.oci.blab", from_string(name), 10, {"foo": "bar", "baz": "boo"}),
    )


class _StoreCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = DB(os.path.join(self.mktemp(), "meta.sqlite"))
        self.addCleanup(self.db.close)
        self.db.open()
        self.collector = mgc.Collector(self.db)
        self.store = ImageStore(self.db, self.collector)


class StoreTests(_StoreCase):
    def test_images_list(self) -> None:
        """TestImagesList: create four, list with filters (OR of filters), delete twice."""
        created = {}
        for i in range(4):
            name = f"image-{i}"
            image = Image(
                name,
                {"namelabel": name, "even": str(i % 2 == 0).lower(), "odd": str(i % 2 != 0).lower()},
                Descriptor("application/vnd.containerd.test", from_string(name), 10, {"foo": "bar"}),
            )
            before = time.time_ns()
            result = self.store.create("ns", image)
            self.assertEqual(result.created_at, result.updated_at)
            self.assertGreaterEqual(result.created_at, before)
            self.assertEqual(replace(result, created_at=0, updated_at=0), image)
            created[name] = result
        cases = {
            (): list(created),
            ("labels.even==true", "labels.odd==true"): list(created),
            ("labels.even==true",): ["image-0", "image-2"],
            ("labels.odd==true",): ["image-1", "image-3"],
            ("name==image-0",): ["image-0"],
            ("labels.namelabel==image-0,labels.even==true",): ["image-0"],
            ("target.mediatype~=application/vnd.*",): list(created),
            (f"target.digest=={from_string('image-3')}",): ["image-3"],
            ("annotations.foo==bar",): list(created),
            ("annotations.foo!=bar",): [],
            ("target",): [],
            ("target.size==10",): [],
            ("name",): list(created),
        }
        for filters, names in cases.items():
            results = self.store.list("ns", *filters)
            self.assertEqual([r.name for r in results], names, filters)
            for result in results:
                self.assertEqual(result, created[result.name])
        self.assertEqual(self.store.list("other"), [])
        for name in created:
            self.store.delete("ns", name)
            err = self.assertRaises(NotFound, self.store.delete, "ns", name)
            self.assertEqual(str(err), f'image "{name}": not found')
        self.assertEqual(self.store.list("ns"), [])

    def test_create_update_delete(self) -> None:
        """TestImagesCreateUpdateDelete, case for case."""
        base = image_base()
        cases: list[dict[str, Any]] = [
            dict(
                name="Touch",
                input=Image("", {"foo": "bar", "baz": "boo"}, D(BLAB, "", 10, {"foo": "bar"})),
                expected=Image("", {"foo": "bar", "baz": "boo"}, D(BLAB, "", 10, {"foo": "bar"})),
            ),
            dict(name="NoTarget", original=Image("", {"foo": "bar"}, Descriptor()), createerr=InvalidArgument),
            dict(
                name="ReplaceLabels",
                input=Image("", {"for": "bar", "boo": "boo"}, D(BLAB, "", 10, {"foo": "bar"})),
                expected=Image("", {"for": "bar", "boo": "boo"}, D(BLAB, "", 10, {"foo": "bar"})),
            ),
            dict(
                name="ReplaceLabelsFieldPath",
                input=Image("", {"for": "bar", "boo": "boo"}, D("x+ignored", "", 20, {"not": "bar", "new": "boo"})),
                fieldpaths=["labels"],
                expected=Image("", {"for": "bar", "boo": "boo"}, base.target),
            ),
            dict(
                name="ReplaceLabelsAnnotationsFieldPath",
                input=Image("", {"for": "bar", "boo": "boo"}, D("x+ignored", "", 20, {"foo": "boo"})),
                fieldpaths=["annotations", "labels"],
                expected=Image("", {"for": "bar", "boo": "boo"}, D(BLAB, "", 10, {"foo": "boo"})),
            ),
            dict(
                name="ReplaceLabel",
                input=Image("", {"foo": "baz", "baz": "bunk"}, D("x+ignored", "", 20, {"foo": "bar"})),
                fieldpaths=["labels.foo"],
                expected=Image("", {"foo": "baz", "baz": "boo"}, base.target),
            ),
            dict(
                name="ReplaceAnnotation",
                input=Image("", {"foo": "baz", "baz": "bunk"}, D("x+ignored", "", 20, {"foo": "baz", "baz": "bunk"})),
                fieldpaths=["annotations.foo"],
                expected=Image("", {"foo": "bar", "baz": "boo"}, D(BLAB, "", 10, {"foo": "baz", "baz": "boo"})),
            ),
            dict(
                name="ReplaceTarget",
                input=Image("", {}, D(BLAB + "+replaced", "", 10, {"fox": "dog"})),
                fieldpaths=["target"],
                expected=Image("", {"foo": "bar", "baz": "boo"}, D(BLAB + "+replaced", "", 10, {"fox": "dog"})),
            ),
            dict(
                name="EmptySize",
                input=Image("", {"foo": "bar"}, Descriptor("application/vnd.oci.blab", "", 0, {"foo": "bar"})),
                cause=InvalidArgument,
            ),
            dict(
                name="EmptySizeOnCreate",
                original=Image("", {"foo": "bar"}, Descriptor("application/vnd.oci.blab", "", 0, {"foo": "bar"})),
                createerr=InvalidArgument,
            ),
            dict(name="EmptyMediaType", input=Image("", {"foo": "bar"}, Descriptor("", "", 10)), cause=InvalidArgument),
            dict(name="EmptyMediaTypeOnCreate", original=Image("", {}, D("", "", 10)), createerr=InvalidArgument),
            dict(
                name="TryUpdateNameFail",
                input=Image("test should fail", {"foo": "bar"}, Descriptor("application/vnd.oci.blab", "", 10)),
                cause=NotFound,
            ),
        ]  # fmt: skip
        for case in cases:
            name = case["name"]
            original = replace(case.get("original", image_base()), name=name)
            digest = original.target.digest or from_string(name)
            original.target = replace(original.target, digest=digest)
            before = time.time_ns()
            if case.get("createerr"):
                self.assertRaises(case["createerr"], self.store.create, "ns", original)
                continue
            created = self.store.create("ns", original)
            self.assertEqual(created.created_at, created.updated_at)
            self.assertGreaterEqual(created.created_at, before)
            self.assertEqual(replace(created, created_at=0, updated_at=0), original, name)
            inp: Image = case["input"]
            inp = replace(inp, name=inp.name or name, target=replace(inp.target, digest=digest))
            if case.get("cause"):
                self.assertRaises(case["cause"], self.store.update, "ns", inp, *case.get("fieldpaths", []))
                continue
            updated = self.store.update("ns", inp, *case.get("fieldpaths", []))
            self.assertEqual(updated.created_at, created.created_at)
            self.assertGreater(updated.updated_at, updated.created_at, name)
            expected: Image = case["expected"]
            expected = replace(expected, name=name, target=replace(expected.target, digest=digest))
            self.assertEqual(replace(updated, created_at=0, updated_at=0), expected, name)
            self.assertEqual(self.store.get("ns", name), updated, name)

    def test_error_texts(self) -> None:
        good = image_base("img")
        cases = [
            (replace(good, name=""), InvalidArgument, "image name must not be empty: invalid argument"),
            (
                replace(good, labels={"k" * 4000: "v" * 100}),
                InvalidArgument,
                "image.Labels: label key and value greater than maximum size (4096 bytes), key: kkkkkkkkkk: "
                "invalid argument",
            ),
            (
                replace(good, target=replace(good.target, digest="")),
                InvalidArgument,
                'Target.Digest "" invalid: invalid checksum digest format: invalid argument',
            ),
            (
                replace(good, target=replace(good.target, digest="sha256:abc")),
                InvalidArgument,
                'Target.Digest "sha256:abc" invalid: invalid checksum digest length: invalid argument',
            ),
            (
                replace(good, target=replace(good.target, digest="md5:00")),
                InvalidArgument,
                'Target.Digest "md5:00" invalid: unsupported digest algorithm: invalid argument',
            ),
            (
                replace(good, target=replace(good.target, digest="sha256:" + "G" * 64)),
                InvalidArgument,
                'Target.Digest "sha256:' + "G" * 64 + '" invalid: invalid checksum digest format: invalid argument',
            ),
            (
                replace(good, target=replace(good.target, size=-1)),
                InvalidArgument,
                "Target.Size must be greater than zero: invalid argument",
            ),
            (
                replace(good, target=replace(good.target, media_type="")),
                InvalidArgument,
                "Target.MediaType must be set: invalid argument",
            ),
            (
                replace(good, labels={"": "v", "a": "b"}),
                CdtwistError,
                'writing labels for image img: failed to set label ""="v": key required',
            ),
            (
                replace(good, target=replace(good.target, annotations={"": "v"})),
                CdtwistError,
                'writing Annotations for image img: failed to set label ""="v": key required',
            ),
            (
                replace(good, target=replace(good.target, annotations={"k" * 32769: "v"})),
                CdtwistError,
                f'writing Annotations for image img: failed to set label "{"k" * 32769}"="v": key too large',
            ),
        ]
        for image, cls, message in cases:
            err = self.assertRaises(cls, self.store.create, "ns", image)
            self.assertIs(type(err), cls)
            self.assertEqual(str(err), message)
        self.assertEqual(self.store.list("ns"), [])
        self.store.create("ns", good)
        err = self.assertRaises(AlreadyExists, self.store.create, "ns", good)
        self.assertEqual(str(err), 'image "img": already exists')
        err = self.assertRaises(InvalidArgument, self.store.update, "ns", good, "name")
        self.assertEqual(str(err), 'cannot update "name" field on image "img": invalid argument')
        err = self.assertRaises(InvalidArgument, self.store.update, "ns", good, "labels", "target.size")
        self.assertEqual(str(err), 'cannot update "target.size" field on image "img": invalid argument')
        err = self.assertRaises(InvalidArgument, self.store.update, "ns", replace(good, name=""))
        self.assertEqual(str(err), "image name is required for update: invalid argument")
        # no mask: every field, so an image with only labels fails on its target (ctr images label NAME)
        err = self.assertRaises(InvalidArgument, self.store.update, "ns", Image("img", {"a": "b"}))
        self.assertEqual(str(err), 'Target.Digest "" invalid: invalid checksum digest format: invalid argument')
        err = self.assertRaises(NotFound, self.store.get, "ns", "nope")
        self.assertEqual(str(err), 'image "nope": not found')
        err = self.assertRaises(NotFound, self.store.get, "other", "img")
        self.assertEqual(str(err), 'image "img": not found')
        err = self.assertRaises(InvalidArgument, self.store.list, "ns", "name==")
        self.assertEqual(
            str(err), "filters: parse error: [name==]: expected value or quoted: invalid argument: invalid argument"
        )
        # nothing above changed the stored image
        self.assertEqual(replace(self.store.get("ns", "img"), created_at=0, updated_at=0), good)

    def test_empty_values_dropped_and_caller_untouched(self) -> None:
        image = Image("e", {"a": "1", "gone": ""}, Descriptor(MEDIA, from_string("e"), 3, {"x": "", "y": "2"}))
        created = self.store.create("ns", image)
        self.assertEqual((created.labels, created.target.annotations), ({"a": "1"}, {"y": "2"}))
        self.assertEqual(image.labels, {"a": "1", "gone": ""})
        updated = self.store.update("ns", Image("e", {"a": ""}), "labels.a", "labels.never")
        self.assertEqual(updated.labels, {})
        self.assertEqual(self.store.get("ns", "e").labels, {})
        updated = self.store.update("ns", Image("e", target=Descriptor(annotations={"z": "9"})), "annotations.z")
        self.assertEqual(updated.target.annotations, {"y": "2", "z": "9"})

    def test_other_digest_algorithms_and_any_name(self) -> None:
        """go-digest accepts sha384/sha512 for a target; names are free-form (no identifier rules)."""
        for i, (alg, n) in enumerate((("sha384", 96), ("sha512", 128))):
            name = f"docker.io/library/x:{i}@weird name/ü"
            self.store.create("ns", Image(name, target=Descriptor(MEDIA, f"{alg}:{'a' * n}", 1)))
            self.assertEqual(self.store.get("ns", name).target.digest, f"{alg}:{'a' * n}")

    def test_list_in_byte_order(self) -> None:
        names = ["b", "a", "B", "é", "z", "a/b", "a:1", "~"]
        for name in names:
            self.store.create("ns", Image(name, target=Descriptor(MEDIA, from_string(name), 1)))
        self.assertEqual([i.name for i in self.store.list("ns")], sorted(names, key=lambda s: s.encode()))

    def test_create_makes_the_namespace_and_delete_of_namespace_refuses(self) -> None:
        self.store.create("fresh", image_base("i"))
        self.assertIn("fresh", self.db.view(namespaces.list_names))
        self.db.update(
            lambda tx: tx.execute("INSERT INTO content_blobs VALUES ('fresh', ?, 1, 0, 0)", (from_string("x"),))
        )
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "fresh"))
        self.assertEqual(
            str(err), 'namespace "fresh" must be empty, but it still has images, blobs: failed precondition'
        )
        self.store.delete("fresh", "i")
        err = self.assertRaises(FailedPrecondition, self.db.update, lambda tx: namespaces.delete(tx, "fresh"))
        self.assertEqual(str(err), 'namespace "fresh" must be empty, but it still has blobs: failed precondition')

    def test_failed_update_changes_nothing(self) -> None:
        created = self.store.create("ns", image_base("i"))
        self.assertRaises(CdtwistError, self.store.update, "ns", Image("i", {"": "x"}), "labels.")
        self.assertEqual(self.store.get("ns", "i"), created)

    def test_delete_marks_dirty(self) -> None:
        self.store.create("ns", image_base("i"))
        self.assertFalse(self.collector.dirty)
        self.store.delete("ns", "i")
        self.assertTrue(self.collector.dirty)


class GCTests(_StoreCase):
    def test_roots_as_in_containerd(self) -> None:
        """The image part of TestGCRoots."""

        def dgst(i: int) -> str:
            return from_string(str(i))

        PAST = "2000-01-01T00:00:00Z"  # noqa: N806

        for ns, name, target, labels in [
            ("ns1", "image1", dgst(1), {}),
            ("ns1", "image2", dgst(2), {mgc.LABEL_GC_SNAP_REF + "overlay": "sn2"}),
            ("ns2", "image3", dgst(10), {mgc.LABEL_GC_CONTENT_REF: dgst(11), "other": dgst(12)}),
            ("ns2", "image4", dgst(13), {mgc.LABEL_GC_CONTENT_REF + "x": dgst(14)}),  # not a ref: no "." or "/"
            # images do not expire in 1.6: gc.expire on an image means nothing
            ("ns2", "image5", dgst(15), {mgc.LABEL_GC_CONTENT_REF + "/m": dgst(16), mgc.LABEL_GC_EXPIRE: PAST}),
        ]:  # fmt: skip
            self.store.create(ns, Image(name, labels, Descriptor(MEDIA, target, 1)))
        collector = mgc.Collector(self.db, kinds=[store.KIND])
        roots = set(self.db.view(collector.roots))
        self.assertEqual(
            roots,
            {
                Node(mgc.CONTENT, "ns1", dgst(1)),
                Node(mgc.CONTENT, "ns1", dgst(2)),
                Node(mgc.SNAPSHOT, "ns1", "overlay/sn2"),
                Node(mgc.CONTENT, "ns2", dgst(10)),
                Node(mgc.CONTENT, "ns2", dgst(11)),
                Node(mgc.CONTENT, "ns2", dgst(13)),
                Node(mgc.CONTENT, "ns2", dgst(15)),
                Node(mgc.CONTENT, "ns2", dgst(16)),
            },
        )

    def test_registered_in_the_global_graph(self) -> None:
        self.assertIn(store.KIND, mgc.KINDS)


# -- the service over gRPC ---------------------------------------------------------------


class ImagesFixture:
    """cdtwist's content fixture plus the images service on its own server, sharing DB, GC and events."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.f = Fixture(case)
        self.store = ImageStore(self.f.db, self.f.collector)
        self.service = ImagesService(self.store, self.f.exchange, self.f.scheduler)  # type: ignore[arg-type]
        self.server = grpc.server(ThreadPoolExecutor(4), interceptors=[ErrorAndMetricsInterceptor()])
        ImagesGRPC(self.service).register_grpc(self.server)
        address = os.path.join(self.f.tmp, "i.sock")
        self.server.add_insecure_port("unix:" + address)
        self.server.start()
        case.addCleanup(lambda: self.server.stop(None).wait(5))
        self.channel = grpc.insecure_channel("unix:" + address)
        case.addCleanup(self.channel.close)
        self.images = api_grpc.ImagesStub(self.channel)

    md = staticmethod(Fixture.md)

    def create(self, name: str, digest: str, size: int = 1, labels: dict[str, str] | None = None, **kw: Any) -> Any:
        target = descriptor_pb2.Descriptor(media_type=MEDIA, digest=digest, size=size)
        req = api.CreateImageRequest(image=api.Image(name=name, labels=labels or {}, target=target))
        return self.images.Create(req, metadata=self.md(**kw)).image

    def event(self) -> tuple[str, str, str, dict[str, Any]]:
        envelope = self.f.events.get(2)
        assert envelope is not None, "no event"
        message = typeurl.unmarshal_any(envelope.event)
        fields = {f.name: v for f, v in message.ListFields()}
        fields = {k: dict(v) if k == "labels" else v for k, v in fields.items()}
        return envelope.namespace, envelope.topic, envelope.event.type_url, fields

    def no_event(self) -> None:
        assert self.f.events.get(0.05) is None


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.i = ImagesFixture(self)

    def assertStatus(self, code: grpc.StatusCode, message: str, fn, *args, **kw):  # type: ignore[no-untyped-def]  # noqa: N802
        err = self.assertRaises(grpc.RpcError, fn, *args, **kw)
        self.assertEqual((err.code(), err.details()), (code, message))
        return err

    def test_create_get_list_and_events(self) -> None:
        d = from_string("a")
        before = time.time()
        image = self.i.create("docker.io/x:1", d, 5, {"k": "v", "empty": ""})
        self.assertEqual((image.name, dict(image.labels)), ("docker.io/x:1", {"k": "v"}))
        self.assertEqual((image.target.digest, image.target.size, image.target.media_type), (d, 5, MEDIA))
        self.assertEqual(image.created_at, image.updated_at)
        self.assertGreaterEqual(image.created_at.ToNanoseconds(), int(before * 1e9))
        self.assertEqual(
            self.i.event(),
            (
                "default",
                "/images/create",
                "containerd.services.images.v1.ImageCreate",
                {"name": "docker.io/x:1", "labels": {"k": "v"}},
            ),
        )
        got = self.i.images.Get(api.GetImageRequest(name="docker.io/x:1"), metadata=self.i.md()).image
        self.assertEqual(got, image)
        self.i.create("other", from_string("b"), labels={"k": "w"})
        self.i.event()
        listed = self.i.images.List(api.ListImagesRequest(), metadata=self.i.md()).images
        self.assertEqual([x.name for x in listed], ["docker.io/x:1", "other"])
        self.assertEqual(listed[0], image)
        for filters, names in [
            (["labels.k==w"], ["other"]),
            (["name~=^docker", "labels.k==w"], ["docker.io/x:1", "other"]),
            ([f"target.digest=={d}"], ["docker.io/x:1"]),
            ([f"target.mediatype=={MEDIA},labels.k==v"], ["docker.io/x:1"]),
        ]:
            listed = self.i.images.List(api.ListImagesRequest(filters=filters), metadata=self.i.md()).images
            self.assertEqual([x.name for x in listed], names, filters)
        self.assertEqual(list(self.i.images.List(api.ListImagesRequest(), metadata=self.i.md("elsewhere")).images), [])

    def test_errors(self) -> None:
        d = from_string("a")
        create = self.i.images.Create
        self.assertStatus(
            Code.INVALID_ARGUMENT, "Image.Name required", create, api.CreateImageRequest(), metadata=self.i.md(None)
        )
        target = descriptor_pb2.Descriptor(media_type=MEDIA, digest=d, size=1)
        self.assertStatus(
            Code.FAILED_PRECONDITION,
            "namespace is required: failed precondition",
            create,
            api.CreateImageRequest(image=api.Image(name="x", target=target)),
            metadata=self.i.md(None),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'namespace validation: identifier "-x" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: '
            "invalid argument",
            create,
            api.CreateImageRequest(image=api.Image(name="x", target=target)),
            metadata=self.i.md("-x"),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'Target.Digest "" invalid: invalid checksum digest format: invalid argument',
            create,
            api.CreateImageRequest(image=api.Image(name="x")),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.UNKNOWN,
            'writing labels for image x: failed to set label ""="v": key required',
            create,
            api.CreateImageRequest(image=api.Image(name="x", target=target, labels={"": "v"})),
            metadata=self.i.md(),
        )
        self.i.create("x", d)
        self.i.event()
        self.assertStatus(
            Code.ALREADY_EXISTS,
            'image "x": already exists',
            create,
            api.CreateImageRequest(image=api.Image(name="x", target=target)),
            metadata=self.i.md(),
        )
        update = self.i.images.Update
        self.assertStatus(
            Code.INVALID_ARGUMENT, "Image.Name required", update, api.UpdateImageRequest(), metadata=self.i.md()
        )
        self.assertStatus(
            Code.NOT_FOUND,
            'image "y": not found',
            update,
            api.UpdateImageRequest(image=api.Image(name="y")),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'cannot update "size" field on image "x": invalid argument',
            update,
            api.UpdateImageRequest(image=api.Image(name="x"), update_mask=field_mask_pb2.FieldMask(paths=["size"])),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            'Target.Digest "" invalid: invalid checksum digest format: invalid argument',
            update,
            api.UpdateImageRequest(image=api.Image(name="x", labels={"a": "b"})),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.NOT_FOUND,
            'image "y": not found',
            self.i.images.Get,
            api.GetImageRequest(name="y"),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.FAILED_PRECONDITION,
            "namespace is required: failed precondition",
            self.i.images.Get,
            api.GetImageRequest(name="x"),
            metadata=self.i.md(None),
        )
        self.assertStatus(
            Code.INVALID_ARGUMENT,
            "filters: parse error: [name==]: expected value or quoted: invalid argument: invalid argument",
            self.i.images.List,
            api.ListImagesRequest(filters=["name=="]),
            metadata=self.i.md(),
        )
        self.assertStatus(
            Code.NOT_FOUND,
            'image "y": not found',
            self.i.images.Delete,
            api.DeleteImageRequest(name="y"),
            metadata=self.i.md(),
        )
        self.i.no_event()

    def test_update_masks_and_event(self) -> None:
        d = from_string("a")
        created = self.i.create("x", d, 1, {"a": "1", "b": "2"})
        self.i.event()
        req = api.UpdateImageRequest(
            image=api.Image(name="x", labels={"a": "9", "c": "3"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.a", "labels.b"]),
        )
        updated = self.i.images.Update(req, metadata=self.i.md()).image
        self.assertEqual(dict(updated.labels), {"a": "9"})
        self.assertEqual(updated.created_at, created.created_at)
        self.assertGreater(updated.updated_at.ToNanoseconds(), created.updated_at.ToNanoseconds())
        self.assertEqual(updated.target, created.target)
        self.assertEqual(
            self.i.event(),
            (
                "default",
                "/images/update",
                "containerd.services.images.v1.ImageUpdate",
                {"name": "x", "labels": {"a": "9"}},
            ),
        )
        d2 = from_string("b")
        target = descriptor_pb2.Descriptor(media_type="m", digest=d2, size=7, annotations={"an": "v"})
        req = api.UpdateImageRequest(
            image=api.Image(name="x", target=target), update_mask=field_mask_pb2.FieldMask(paths=["target"])
        )
        updated = self.i.images.Update(req, metadata=self.i.md()).image
        self.assertEqual((updated.target, dict(updated.labels)), (target, {"a": "9"}))
        self.i.event()
        # an empty mask is no mask: everything is replaced
        req = api.UpdateImageRequest(image=api.Image(name="x", target=target), update_mask=field_mask_pb2.FieldMask())
        updated = self.i.images.Update(req, metadata=self.i.md()).image
        self.assertEqual(dict(updated.labels), {})
        self.assertEqual(self.i.event()[3], {"name": "x"})

    def test_delete_event_and_sync(self) -> None:
        self.i.create("x", from_string("a"))
        self.i.event()
        self.i.images.Delete(api.DeleteImageRequest(name="x"), metadata=self.i.md())
        self.assertEqual(
            self.i.event(), ("default", "/images/delete", "containerd.services.images.v1.ImageDelete", {"name": "x"})
        )
        self.assertEqual(self.i.f.scheduler.runs, 0)
        self.i.create("y", from_string("a"))
        self.i.event()
        self.i.images.Delete(api.DeleteImageRequest(name="y", sync=True), metadata=self.i.md())
        self.assertEqual(self.i.f.scheduler.runs, 1)

    def test_gc_follows_images(self) -> None:
        """An image holds its target and, through content labels, the rest; deleting it with sync frees them."""
        f = self.i.f
        config = f.ingest(b"config", ref="c")
        layer = f.ingest(b"layer", ref="l")
        manifest = f.ingest(
            b"manifest",
            ref="m",
            labels={"containerd.io/gc.ref.content.config": config, "containerd.io/gc.ref.content.l.0": layer},
        )
        loose = f.ingest(b"loose", ref="x")
        labelled = f.ingest(b"labelled", ref="y")
        self.i.create("img", manifest, 8)
        self.i.create("other", manifest, 8, {"containerd.io/gc.ref.content.extra": labelled})
        f.collector.garbage_collect()

        def present() -> set[str]:
            return {i.digest for b in f.content.List(capi.ListContentRequest(), metadata=f.md()) for i in b.info}

        self.assertEqual(present(), {config, layer, manifest, labelled})
        self.i.images.Delete(api.DeleteImageRequest(name="img", sync=True), metadata=self.i.md())
        self.assertEqual(present(), {config, layer, manifest, labelled})  # "other" still holds them
        self.i.images.Delete(api.DeleteImageRequest(name="other", sync=True), metadata=self.i.md())
        self.assertEqual(present(), set())
        for digest in (config, layer, manifest, labelled, loose):
            self.assertRaises(NotFound, f.backend.info, digest)

    def test_namespace_delete_refused_while_images_exist(self) -> None:
        from cdtwist.namespaces.service import NamespacesService

        service = NamespacesService(type("M", (), {"db": self.i.f.db})(), self.i.f.exchange)  # type: ignore[arg-type]
        self.i.create("x", from_string("a"), namespace="busy")
        err = self.assertRaises(FailedPrecondition, service.Delete, napi.DeleteNamespaceRequest(name="busy"), None)
        self.assertEqual(str(err), 'namespace "busy" must be empty, but it still has images: failed precondition')


class RegistrationTests(SynchronousTestCase):
    def test_plugins_as_containerd_registers_them(self) -> None:
        service = registry.get(f"{SERVICE}.images-service")
        grpc_plugin = registry.get(f"{GRPC}.images")
        assert service is not None and grpc_plugin is not None
        self.assertEqual(service.requires, (METADATA, GC))
        self.assertEqual(grpc_plugin.requires, (SERVICE,))
        self.assertEqual(images_service.SERVICE_ID, "images-service")
        modules = list(loader.BUILTIN_MODULES)
        position = modules.index("cdtwist.images.service")
        self.assertEqual(modules[position - 1 : position + 2], [
            "cdtwist.health.service", "cdtwist.images.service", "cdtwist.leases.service",
        ])  # fmt: skip

    def test_digest_helper(self) -> None:
        self.assertEqual(digest_of(b"a"), from_string("a"))
