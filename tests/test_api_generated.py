"""Tests for the generated protobuf/gRPC package ``cdtwist.api``.

The "real containerd" byte strings below were captured from a stock Debian
containerd 1.6.20~ds1-1+deb12u3 (grpc over a unix socket, see
protos/README.md); the others are derived by hand from the .proto field
numbers so that a renumbering or type change in protos/ is caught.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

from twisted.trial import unittest

GENERATE_PY = Path(__file__).resolve().parent.parent / "protos" / "generate.py"


def _load_generate():
    spec = importlib.util.spec_from_file_location("cdtwist_protos_generate", GENERATE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GeneratedModulesTests(unittest.TestCase):
    def test_all_modules_import(self):
        import cdtwist.api

        names = [m.name for m in pkgutil.walk_packages(cdtwist.api.__path__, "cdtwist.api.") if not m.ispkg]
        for name in names:
            importlib.import_module(name)
        for expected in (
            "cdtwist.api.services.version.v1.version_pb2",
            "cdtwist.api.services.version.v1.version_pb2_grpc",
            "cdtwist.api.services.containers.v1.containers_pb2_grpc",
            "cdtwist.api.services.content.v1.content_pb2_grpc",
            "cdtwist.api.services.diff.v1.diff_pb2_grpc",
            "cdtwist.api.services.events.v1.events_pb2_grpc",
            "cdtwist.api.services.images.v1.images_pb2_grpc",
            "cdtwist.api.services.introspection.v1.introspection_pb2_grpc",
            "cdtwist.api.services.leases.v1.leases_pb2_grpc",
            "cdtwist.api.services.namespaces.v1.namespace_pb2_grpc",
            "cdtwist.api.services.snapshots.v1.snapshots_pb2_grpc",
            "cdtwist.api.services.tasks.v1.tasks_pb2_grpc",
            "cdtwist.api.services.ttrpc.events.v1.events_pb2_grpc",
            "cdtwist.api.types.mount_pb2",
            "cdtwist.api.types.task.task_pb2",
            "cdtwist.api.events.namespace_pb2",
            "cdtwist.api.events.task_pb2",
            "cdtwist.api.runtime.task.v2.shim_pb2_grpc",
            "cdtwist.api.runtime.runc.options.oci_pb2",
            "cdtwist.api.ttrpc.request_pb2",
        ):
            self.assertIn(expected, names)

    def test_not_stale(self):
        problems = _load_generate().check()
        self.assertEqual(
            problems, [], "cdtwist/api is stale, run: python protos/generate.py\n" + "\n".join(problems)
        )

    def test_descriptor_full_names(self):
        from cdtwist.api.events import image_pb2 as ev_image
        from cdtwist.api.events import namespace_pb2 as ev_ns
        from cdtwist.api.runtime.runc.options import oci_pb2
        from cdtwist.api.runtime.task.v2 import shim_pb2
        from cdtwist.api.services.events.v1 import events_pb2
        from cdtwist.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
        from cdtwist.api.services.version.v1 import version_pb2
        from cdtwist.api.ttrpc import request_pb2
        from cdtwist.api.types.task import task_pb2

        self.assertEqual(
            version_pb2.DESCRIPTOR.services_by_name["Version"].full_name,
            "containerd.services.version.v1.Version",
        )
        task_svc = shim_pb2.DESCRIPTOR.services_by_name["Task"]
        self.assertEqual(task_svc.full_name, "containerd.task.v2.Task")
        self.assertEqual(
            task_svc.methods_by_name["Create"].input_type.full_name, "containerd.task.v2.CreateTaskRequest"
        )
        self.assertEqual(request_pb2.Request.DESCRIPTOR.full_name, "ttrpc.Request")
        self.assertEqual(
            request_pb2.Response.DESCRIPTOR.fields_by_name["status"].message_type.full_name,
            "google.rpc.Status",
        )
        self.assertEqual(oci_pb2.Options.DESCRIPTOR.full_name, "containerd.runc.v1.Options")
        self.assertEqual(task_pb2.Status.DESCRIPTOR.full_name, "containerd.v1.types.Status")
        self.assertEqual(ev_ns.NamespaceCreate.DESCRIPTOR.full_name, "containerd.events.NamespaceCreate")
        # api/events/image.proto really is in the images service package upstream
        self.assertEqual(
            ev_image.ImageCreate.DESCRIPTOR.full_name, "containerd.services.images.v1.ImageCreate"
        )
        self.assertEqual(
            ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"].full_name,
            "containerd.services.events.ttrpc.v1.Events",
        )
        subscribe = events_pb2.DESCRIPTOR.services_by_name["Events"].methods_by_name["Subscribe"]
        self.assertEqual(subscribe.full_name, "containerd.services.events.v1.Events.Subscribe")
        self.assertTrue(subscribe.server_streaming)

    def test_no_gogoproto_left(self):
        from cdtwist.api.services.containers.v1 import containers_pb2

        deps = [d.name for d in containers_pb2.DESCRIPTOR.dependencies]
        self.assertNotIn("gogoproto/gogo.proto", deps)
        self.assertIn("google/protobuf/timestamp.proto", deps)


class WireTests(unittest.TestCase):
    def test_namespace_by_hand(self):
        from cdtwist.api.services.namespaces.v1 import namespace_pb2

        ns = namespace_pb2.Namespace(name="a", labels={"k": "v"})
        expected = (
            b"\x0a\x01a"  # field 1 (name), wire type 2, len 1
            b"\x12\x06"  # field 2 (labels map entry), wire type 2, len 6
            b"\x0a\x01k"  # entry field 1 (key)
            b"\x12\x01v"  # entry field 2 (value)
        )
        self.assertEqual(ns.SerializeToString(), expected)
        # GetNamespaceResponse{namespace=1} as returned by real containerd for `ctr ns create a k=v`
        real = b"\n\x0b\n\x01a\x12\x06\n\x01k\x12\x01v"
        self.assertEqual(namespace_pb2.GetNamespaceResponse(namespace=ns).SerializeToString(), real)
        self.assertEqual(b"\x0a\x0b" + expected, real)

    def test_version_response(self):
        from cdtwist.api.services.version.v1 import version_pb2

        real = b"\n\n1.6.20~ds1\x12\x141.6.20~ds1-1+deb12u3"
        resp = version_pb2.VersionResponse.FromString(real)
        self.assertEqual((resp.version, resp.revision), ("1.6.20~ds1", "1.6.20~ds1-1+deb12u3"))
        self.assertEqual(resp.SerializeToString(), real)

    def test_event_envelope_from_containerd(self):
        """Envelope streamed by Events.Subscribe during `ctr ns label foo a=b`."""
        from cdtwist.api.events import namespace_pb2 as ev_ns
        from cdtwist.api.services.events.v1 import events_pb2

        real = (
            b"\n\x0c\x08\xce\xa4\xa8\xd8\x06\x10\xf0\x94\xc6\xc7\x02"  # 1: timestamp
            b"\x12\x07default"  # 2: namespace
            b"\x1a\x12/namespaces/update"  # 3: topic
            b'"2'  # 4: event (Any), len 50
            b"\n!containerd.events.NamespaceUpdate"  # Any.type_url: bare full name, no '/'
            b"\x12\r\n\x03foo\x12\x06\n\x01a\x12\x01b"  # Any.value
        )
        env = events_pb2.Envelope.FromString(real)
        self.assertEqual(env.namespace, "default")
        self.assertEqual(env.topic, "/namespaces/update")
        self.assertEqual(env.timestamp.seconds, 1795822158)
        self.assertEqual(env.timestamp.nanos, 686918256)  # 2026-11-27T23:29:18.686918256Z
        self.assertEqual(env.event.type_url, "containerd.events.NamespaceUpdate")
        self.assertEqual(env.SerializeToString(), real)
        # containerd's type_url has no "type.googleapis.com/" style prefix, so
        # Any.Unpack()/Is() refuse it; decode by full name + ParseFromString.
        self.assertFalse(env.event.Is(ev_ns.NamespaceUpdate.DESCRIPTOR))
        self.assertEqual(env.event.TypeName(), ev_ns.NamespaceUpdate.DESCRIPTOR.full_name)
        upd = ev_ns.NamespaceUpdate.FromString(env.event.value)
        self.assertEqual((upd.name, dict(upd.labels)), ("foo", {"a": "b"}))
        self.assertEqual(
            ev_ns.NamespaceUpdate(name="foo", labels={"a": "b"}).SerializeToString(), env.event.value
        )

    def test_ttrpc_request_by_hand(self):
        from cdtwist.api.ttrpc import request_pb2

        req = request_pb2.Request(
            service="s",
            method="m",
            payload=b"p",
            timeout_nano=1,
            metadata=[request_pb2.KeyValue(key="k", value="v")],
        )
        self.assertEqual(
            req.SerializeToString(),
            b"\x0a\x01s"  # 1: service
            b"\x12\x01m"  # 2: method
            b"\x1a\x01p"  # 3: payload
            b"\x20\x01"  # 4: timeout_nano, varint
            b"\x2a\x06\x0a\x01k\x12\x01v",  # 5: metadata KeyValue{1: key, 2: value}
        )
        self.assertEqual(request_pb2.StringList(list=["a", "b"]).SerializeToString(), b"\x0a\x01a\x0a\x01b")

    def test_ttrpc_response_from_containerd(self):
        """containerd's ttrpc socket answering an unknown service (codes.Unimplemented)."""
        from cdtwist.api.ttrpc import request_pb2

        real = b"\n2\x08\x0c\x12.service containerd.services.version.v1.Version"
        resp = request_pb2.Response.FromString(real)
        self.assertEqual(resp.status.code, 12)
        self.assertEqual(resp.status.message, "service containerd.services.version.v1.Version")
        self.assertEqual(resp.payload, b"")
        self.assertEqual(resp.SerializeToString(), real)

    def test_shim_create_by_hand(self):
        from cdtwist.api.runtime.task.v2 import shim_pb2
        from cdtwist.api.types import mount_pb2

        req = shim_pb2.CreateTaskRequest(
            id="c",
            bundle="/b",
            rootfs=[mount_pb2.Mount(type="t")],
            terminal=True,
            stdin="i",
        )
        self.assertEqual(
            req.SerializeToString(),
            b"\x0a\x01c"  # 1: id
            b"\x12\x02/b"  # 2: bundle
            b"\x1a\x03\x0a\x01t"  # 3: rootfs Mount{1: type}
            b"\x20\x01"  # 4: terminal
            b"\x2a\x01i",  # 5: stdin
        )
        wait = shim_pb2.WaitResponse(exit_status=3)
        wait.exited_at.seconds = 5
        self.assertEqual(wait.SerializeToString(), b"\x08\x03\x12\x02\x08\x05")
