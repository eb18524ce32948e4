"""Issue 6 (containers service): ``ctr containers`` and the Containers API on cdtwist, compared with containerd.

Every scenario runs on both daemons, in a namespace of the same name on
each, and the outputs (exit status, stdout, stderr with times normalised),
events and gRPC outcomes are compared.  Containers come from ``ctr
containers create`` of a small OCI image built here (imported and unpacked:
content, snapshots and diff services), and through grpcio with cdtwist's
generated stubs for what ``ctr`` cannot send; ``ctr c ls/info/label/rm``
then run against both.  Both daemons are shared by the module's tests; each
test uses its own namespace.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import grpc
from google.protobuf import any_pb2, field_mask_pb2
from twisted.trial import unittest

from cdtwist.api.services.containers.v1 import containers_pb2 as api
from cdtwist.api.services.containers.v1 import containers_pb2_grpc as api_grpc
from tests.integration.harness import (
    BackgroundCtr,
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonError,
    DaemonProcess,
    Result,
    module_suite,
    shared_daemons,
)
from tests.integration.test_content_ctr import Session, outcome, run_ctr, unique
from tests.integration.test_content_ctr import normalise as _normalise
from tests.integration.test_images_ctr import OCIImage, digest

CDTWIST, CONTAINERD_D = shared_daemons()


def test_suite() -> unittest.TestSuite:
    """trial's hook: this module's tests share :data:`CDTWIST` and :data:`CONTAINERD_D`."""
    return module_suite(__name__, CDTWIST, CONTAINERD_D)


RUNC = "io.containerd.runc.v2"
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
#: RFC 3339 times with a fraction (``ctr c info``), which the content tests' normalise leaves alone
_NANO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)")


def normalise(text: str, *daemons: DaemonProcess) -> str:
    return _normalise(_NANO_TIME.sub("<TIME>", text), *daemons)


def summary(result: Result, daemon: DaemonProcess) -> tuple[int, str, str]:
    return result.rc, normalise(result.stdout, daemon), normalise(result.stderr, daemon)


def spec(**doc: Any) -> any_pb2.Any:
    """An OCI spec as containerd's typeurl packs it: JSON under the runtime-spec type url."""
    return any_pb2.Any(type_url=SPEC_URL, value=json.dumps({"ociVersion": "1.0.2", **doc}).encode())


def ext(value: str) -> any_pb2.Any:
    return any_pb2.Any(type_url="example.com/ext", value=value.encode())


def runc_options() -> any_pb2.Any:
    """``containerd.runc.v1.Options{binary_name: "runc"}``, packed by hand."""
    return any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x32\x04runc")


def container_summary(c: api.Container) -> tuple[Any, ...]:
    """Everything but the times, which only have to be set and consistent."""

    def anyv(value: any_pb2.Any) -> tuple[str, bytes]:
        return value.type_url, value.value

    return (
        c.id,
        sorted(c.labels.items()),
        c.image,
        c.HasField("runtime"),
        c.runtime.name,
        anyv(c.runtime.options) if c.runtime.HasField("options") else None,
        anyv(c.spec) if c.HasField("spec") else None,
        c.snapshotter,
        c.snapshot_key,
        sorted((k, anyv(v)) for k, v in c.extensions.items()),
        c.created_at.seconds > 0,
        c.updated_at.ToNanoseconds() >= c.created_at.ToNanoseconds(),
    )


class ContainersSession:
    """The Containers API on one daemon's socket (grpcio)."""

    def __init__(self, daemon: DaemonProcess, namespace: str) -> None:
        self.channel = grpc.insecure_channel("unix:" + daemon.address)
        self.stub = api_grpc.ContainersStub(self.channel)
        self.namespace = namespace

    def md(self, namespace: str | None = "") -> list[tuple[str, str]]:
        ns = self.namespace if namespace == "" else namespace
        return [("containerd-namespace", ns)] if ns else []

    def create(self, cid: str, md: str | None = "", **kw: Any) -> api.Container:
        fields: dict[str, Any] = {"runtime": api.Container.Runtime(name=RUNC), "spec": spec()}
        fields.update(kw)
        fields = {k: v for k, v in fields.items() if v is not None}
        req = api.CreateContainerRequest(container=api.Container(id=cid, **fields))
        return self.stub.Create(req, metadata=self.md(md)).container

    def close(self) -> None:
        self.channel.close()


class _Base(unittest.TestCase):
    def tmpdir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def both(self) -> tuple[CdtwistDaemon, ContainerdDaemon]:
        return CDTWIST.get(self), CONTAINERD_D.get(self)

    def containers(self, daemon: DaemonProcess, namespace: str) -> ContainersSession:
        s = ContainersSession(daemon, namespace)
        self.addCleanup(s.close)
        return s

    def compare(self, scenario: Any, prefix: str = "ctr") -> Any:
        """Run ``scenario(daemon, namespace)`` on both daemons (same namespace name) and compare."""
        ns = unique(prefix)
        results = [scenario(daemon, ns) for daemon in self.both()]
        self.assertEqual(results[0], results[1])
        return results[0]


class CtrContainersTests(_Base):
    def test_create_ls_info_label_rm_match_containerd(self) -> None:
        """``ctr c create`` from an unpacked image, then every ``ctr c`` command and its failures."""
        tar = OCIImage(unique("seed"), ["tiny:1"]).write(self.tmpdir())

        def scenario(daemon: DaemonProcess, ns: str) -> list[tuple[int, str, str]]:
            def c(*args: str) -> tuple[int, str, str]:
                return summary(run_ctr(daemon, *args, namespace=ns), daemon)

            return [
                c("containers", "ls"),
                c("images", "import", tar),
                c("containers", "create", "tiny:1", "c1"),
                c("containers", "create", "--label", "a=b", "--label", "c=d", "tiny:1", "c2", "--", "/hello", "x"),
                c("containers", "create", "tiny:1", "c1"),
                c("containers", "create", "--snapshotter", "native", "tiny:1", "c3"),
                c("containers", "create", "missing:1", "c4"),
                c("containers", "ls"),
                c("containers", "ls", "-q"),
                c("containers", "ls", "-q", "labels.a==b"),
                c("containers", "ls", "-q", "id==c3", "id==c1"),
                c("containers", "ls", "-q", f"runtime.name=={RUNC},image==tiny:1"),
                c("containers", "ls", "-q", "snapshotter==native"),
                c("containers", "ls", 'labels."a'),
                c("containers", "info", "c1"),
                c("containers", "info", "--spec", "c2"),
                c("containers", "info", "missing"),
                c("containers", "info"),
                c("containers", "label", "c2", "x=1", "y=2"),
                c("containers", "label", "c2", "a="),
                c("containers", "label", "c2"),
                c("containers", "label", "missing", "k=v"),
                c("snapshots", "ls"),
                c("snapshots", "--snapshotter", "native", "ls"),
                c("namespaces", "rm", ns),
                c("containers", "rm", "c1", "missing", "c2"),
                c("containers", "rm", "--keep-snapshot", "c3"),
                c("containers", "rm"),
                c("containers", "ls"),
                # c3's snapshot is kept by ctr but no longer held: when a collection takes it is timing
                c("snapshots", "ls"),
            ]  # fmt: skip

        results = self.compare(scenario)
        self.assertEqual(results[2][0], 0)
        self.assertEqual(results[8][1], "c1\nc2\nc3\n")
        self.assertIn("but it still has images, blobs, containers, snapshots on", results[24][2])

    def test_ctr_on_api_created_containers(self) -> None:
        """Containers without snapshots: ``ctr c ls/info/label/rm`` need nothing but the containers service."""

        def scenario(daemon: DaemonProcess, ns: str) -> list[Any]:
            s = self.containers(daemon, ns)
            s.create("plain")
            s.create("full", image="docker.io/library/x:1", labels={"k": "v", "containerd.io/gc.ref.content": "x"},
                     runtime=api.Container.Runtime(name=RUNC, options=runc_options()),
                     extensions={"e1": ext("one")}, spec=spec(hostname="h", process={"args": ["sh"]}))  # fmt: skip
            s.create("odd-spec", spec=any_pb2.Any(type_url="example.com/unknown", value=b"x"),
                     runtime=api.Container.Runtime(name="io.containerd.other.v1"))  # fmt: skip
            s.create("empty-spec", spec=any_pb2.Any())

            def c(*args: str) -> tuple[int, str, str]:
                return summary(run_ctr(daemon, *args, namespace=ns), daemon)

            return [
                c("c", "ls"),
                c("c", "ls", "-q", "runtime.name==io.containerd.other.v1"),
                c("c", "info", "plain"),
                c("c", "info", "full"),
                c("c", "info", "--spec", "full"),
                c("c", "info", "odd-spec"),
                c("c", "info", "--spec", "empty-spec"),
                c("c", "info", "empty-spec"),
                c("c", "label", "full", "k=", "n=1"),
                c("c", "info", "full"),
                c("c", "rm", "plain", "full", "odd-spec", "empty-spec"),
                c("c", "ls"),
                c("namespaces", "rm", ns),
            ]

        results = self.compare(scenario)
        self.assertIn("plain", results[0][1])
        self.assertEqual(results[-1][0], 0)

    def test_events_match_containerd(self) -> None:
        def scenario(daemon: DaemonProcess, ns: str) -> list[str]:
            events = BackgroundCtr(daemon.address, "events", f"namespace=={ns}")
            self.addCleanup(events.stop)
            # the subscription is live once a probe shows up
            deadline = time.monotonic() + 10
            for i in range(1000):
                run_ctr(daemon, "namespaces", "label", ns, f"probe={i}", namespace=ns).ok()
                try:
                    events.wait_for(lambda lines: any('"probe"' in line for line in lines), timeout=0.3)
                    break
                except DaemonError:
                    if time.monotonic() > deadline:
                        raise
            s = self.containers(daemon, ns)
            s.create("ev1", image="img:1", runtime=api.Container.Runtime(name=RUNC, options=runc_options()))
            s.create("ev2", labels={"a": "1"}, snapshotter="native", snapshot_key="ev2-snap")
            run_ctr(daemon, "c", "label", "ev2", "b=2", namespace=ns).ok()
            update = api.UpdateContainerRequest(
                container=api.Container(id="ev1", image="img:2"), update_mask=field_mask_pb2.FieldMask(paths=["image"])
            )
            s.stub.Update(update, metadata=s.md())
            run_ctr(daemon, "c", "rm", "ev1", namespace=ns).ok()
            s.stub.Delete(api.DeleteContainerRequest(id="ev2"), metadata=s.md())
            lines = events.wait_for(lambda lines: sum('"ev2"' in line and "/delete" in line for line in lines) >= 1)
            events.stop()
            out = []
            for line in lines:
                m = re.match(r"^\S+ \S+ \S+ \S+ (\S+) (/\S+) (.*)$", line.rstrip("\n"))
                assert m is not None, line
                if m.group(2).startswith("/containers/"):
                    out.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
            return out

        events = self.compare(scenario)
        self.assertEqual(
            [e.split(" ")[1] for e in events],
            ["/containers/create"] * 2 + ["/containers/update"] * 2 + ["/containers/delete"] * 2,
        )


class GCTests(_Base):
    def test_container_holds_its_snapshot(self) -> None:
        tar = OCIImage(unique("gcsnap"), ["gc:1"]).write(self.tmpdir())

        def scenario(daemon: DaemonProcess, ns: str) -> list[Any]:
            def ctr(*args: str) -> Result:
                return run_ctr(daemon, *args, namespace=ns).ok()

            def collect() -> None:
                ctr("images", "tag", "gc:1", "kick")
                ctr("images", "rm", "--sync", "kick")

            def active() -> list[str]:
                rows = ctr("snapshots", "ls").stdout.splitlines()[1:]
                return sorted(row.split()[0] for row in rows if row.split()[-1] == "Active")

            out: list[Any] = []
            ctr("images", "import", tar)
            ctr("containers", "create", "gc:1", "held")
            ctr("containers", "create", "gc:1", "dropped")
            collect()
            out.append(("both held", active()))
            ctr("containers", "rm", "--keep-snapshot", "dropped")
            collect()
            out.append(("dropped collected", active()))
            ctr("containers", "rm", "held")
            out.append(("removed with its container", active()))
            return out

        self.assertEqual(
            self.compare(scenario, "gc"),
            [
                ("both held", ["dropped", "held"]),
                ("dropped collected", ["held"]),
                ("removed with its container", []),
            ],
        )

    def test_container_labels_hold_content(self) -> None:
        data = f"held by a container {unique('blob')}".encode()
        blob = digest(data)

        def scenario(daemon: DaemonProcess, ns: str) -> list[Any]:
            def present() -> bool:
                return blob in run_ctr(daemon, "content", "ls", "-q", namespace=ns).ok().stdout.split()

            content = Session(daemon, ns)
            self.addCleanup(content.close)
            content.hold(blob)
            run_ctr(daemon, "content", "ingest", "held", namespace=ns, stdin=data).ok()
            s = self.containers(daemon, ns)
            s.create("holder", labels={"containerd.io/gc.ref.content.x": blob})
            run_ctr(daemon, "leases", "rm", "protect", namespace=ns).ok()
            out: list[Any] = []
            # a deletion triggers a collection; the label keeps the blob
            s.create("kick")
            s.stub.Delete(api.DeleteContainerRequest(id="kick"), metadata=s.md())
            run_ctr(daemon, "content", "ingest", "kick", namespace=ns, stdin=b"kick").ok()
            run_ctr(daemon, "images", "import", "--no-unpack", "--index-name", "k", self._kick_tar(), namespace=ns).ok()
            run_ctr(daemon, "images", "rm", "--sync", "k", namespace=ns).ok()
            out.append(("held by the label", present()))
            s.stub.Delete(api.DeleteContainerRequest(id="holder"), metadata=s.md())
            run_ctr(daemon, "images", "import", "--no-unpack", "--index-name", "k", self._kick_tar(), namespace=ns).ok()
            run_ctr(daemon, "images", "rm", "--sync", "k", namespace=ns).ok()
            out.append(("collected with the container", present()))
            return out

        self.assertEqual(
            self.compare(scenario, "gc"),
            [("held by the label", True), ("collected with the container", False)],
        )

    def _kick_tar(self) -> str:
        path = getattr(self, "_kick", None)
        if path is None:
            path = OCIImage(unique("kick"), ["kick:1"]).write(self.tmpdir())
            self._kick = path
        return path


class APITests(_Base):
    """Requests ``ctr`` never sends, to both daemons: same codes, same messages, same results."""

    def test_create_get_list_update_delete(self) -> None:
        def scenario(daemon: DaemonProcess, ns: str) -> list[Any]:
            s = self.containers(daemon, ns)
            stub = s.stub

            def create(cid: str, md: Any = "", **kw: Any) -> Any:
                return outcome(lambda: container_summary(s.create(cid, md, **kw)))

            def get(cid: str, md: Any = "") -> Any:
                return outcome(lambda: container_summary(stub.Get(api.GetContainerRequest(id=cid),
                                                                  metadata=s.md(md)).container))  # fmt: skip

            def ls(*filters: str) -> Any:
                req = api.ListContainersRequest(filters=list(filters))
                listed = outcome(lambda: [c.id for c in stub.List(req, metadata=s.md()).containers])
                streamed = outcome(lambda: [m.container.id for m in stub.ListStream(req, metadata=s.md())])
                return listed, streamed

            def update(cid: str, paths: list[str] | None = None, md: Any = "", **kw: Any) -> Any:
                mask = field_mask_pb2.FieldMask(paths=paths) if paths is not None else None
                req = api.UpdateContainerRequest(container=api.Container(id=cid, **kw), update_mask=mask)
                return outcome(lambda: container_summary(stub.Update(req, metadata=s.md(md)).container))

            def delete(cid: str, md: Any = "") -> Any:
                return outcome(lambda: stub.Delete(api.DeleteContainerRequest(id=cid), metadata=s.md(md)) is not None)

            runc = api.Container.Runtime(name=RUNC)
            return [
                create("c1"),
                create("c1"),
                create(""),
                create("bad id"),
                create("a" * 77),
                create("c2", runtime=None),
                create("c2", spec=None),
                create("c2", runtime=None, spec=None, snapshot_key="k"),
                create("c2", snapshot_key="k"),
                create("c2", extensions={"": ext("x")}),
                create("c2", labels={"k" * 4000: "v" * 100}),
                create("c2", labels={"": "v"}),
                create("c2", labels={"": ""}),
                create("c3", extensions={"e" * 40000: ext("x")}),
                create("c4", md=None),
                create("c4", md="Bad ns"),
                create("c5", image="img:1", labels={"a": "1", "drop": ""},
                       runtime=api.Container.Runtime(name=RUNC, options=runc_options()), spec=any_pb2.Any(),
                       snapshotter="overlayfs", snapshot_key="c5-snap",
                       extensions={"x": ext("1"), "empty": any_pb2.Any()}),
                create("c6", image="img:2", runtime=api.Container.Runtime(name="io.containerd.other.v1",
                                                                          options=any_pb2.Any())),
                get("c5"),
                get("nope"),
                get(""),
                get("c1", md=None),
                get("c1", md="other"),
                ls(),
                ls("id==c1"),
                ls("image~=^img"),
                ls(f"runtime.name=={RUNC}"),
                ls("runtime"),
                ls("labels.a", "id==c6"),
                ls("snapshotter==overlayfs"),
                ls('labels."a'),
                update(""),
                update("c1", md=None),
                update("nope", ["labels"]),
                update("c1", ["labels"], md="other"),
                update("c1"),
                update("c5", runtime=runc, spec=spec()),
                update("c1", runtime=runc, spec=spec(), snapshotter="x"),
                update("c1", ["runtime"]),
                update("c1", ["runtime.name"]),
                update("c1", ["snapshotter"]),
                update("c1", ["id"]),
                update("c1", ["labels", "bogus"]),
                update("c1", ["labels.a", "labels.b"], labels={"a": "1"}),
                update("c1", ["labels"], labels={"z": "2", "empty": ""}),
                update("c1", ["image", "snapshotkey"], image="i2", snapshot_key="k"),
                update("c1", ["image"], image="i2"),
                update("c1", ["spec"]),
                update("c1", ["spec"], spec=spec(hostname="h")),
                update("c1", ["extensions.x", "extensions.y"], extensions={"x": ext("x")}),
                update("c1", ["extensions"], extensions={"z": ext("z")}),
                get("c1"),
                update("c1", ["extensions."]),
                update("c1", ["labels."], labels={"": "v"}),
                update("c1", ["labels.k"], labels={"k": "v" * 5000}),
                update("c5", runtime=runc, snapshotter="overlayfs", spec=spec(), labels={"n": "1"}),
                get("c5"),
                update("c5", [], snapshot_key="c5-new", runtime=runc, snapshotter="overlayfs", spec=spec()),
                delete("nope"),
                delete(""),
                delete("c1", md=None),
                delete("c1", md="other2"),
                delete("c1"),
                delete("c1"),
                ls(),
                delete("c2"),
                delete("c5"),
                delete("c6"),
                outcome(lambda: run_ctr(daemon, "namespaces", "rm", ns, namespace=ns).rc),
            ]  # fmt: skip

        results = self.compare(scenario, "api")
        self.assertEqual(results[0][0], "ok")
        self.assertEqual(results[1], ("ALREADY_EXISTS", 'container "c1": already exists'))
        self.assertEqual(results[-1], ("ok", 0))
