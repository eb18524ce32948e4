# -*- test-case-name: tests.test_diff_service -*-
"""``containerd.services.diff.v1.Diff`` (containerd's ``services/diff``).

``diff-service`` holds the differs named by its ``default`` config, in that
order (containerd's ``[plugins."io.containerd.service.v1.diff-service"]``);
each call goes to the first differ that does not answer "not implemented".
The ``diff`` gRPC plugin serves it.  Handlers run on gRPC pool threads,
where the differs mount, read and write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from cdtwist.api.services.diff.v1 import diff_pb2 as api
from cdtwist.api.services.diff.v1 import diff_pb2_grpc as api_grpc
from cdtwist.api.types import descriptor_pb2, mount_pb2
from cdtwist.diff.walking import Descriptor
from cdtwist.errors import CdtwistError, NotImplemented_
from cdtwist.grpc import context as callctx
from cdtwist.mount import Mount
from cdtwist.plugin import DIFFER, GRPC, SERVICE, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

SERVICE_ID = "diff-service"


class Differ(Protocol):
    """``diff.Comparer`` and ``diff.Applier``, as the service calls them."""

    def apply(
        self, namespace: str, desc: Descriptor, mounts: Sequence[Mount], payloads: Mapping[str, Any] | None = None
    ) -> Descriptor: ...

    def compare(
        self,
        namespace: str,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        media_type: str = "",
        ref: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> Descriptor: ...


@dataclass
class DiffServiceConfig:
    """``[plugins."io.containerd.service.v1.diff-service"]``: differs in order of preference."""

    order: list[str] = field(default_factory=lambda: ["walking"], metadata={"toml": "default"})


class DiffService:
    """The ``diff-service`` plugin (containerd's ``local``)."""

    def __init__(self, differs: Sequence[Differ]) -> None:
        self.differs = list(differs)

    def apply(
        self, namespace: str, desc: Descriptor, mounts: Sequence[Mount], payloads: Mapping[str, Any] | None = None
    ) -> Descriptor:
        """The first differ that implements it applies; no differ at all is an empty descriptor."""
        err: CdtwistError | None = None
        for differ in self.differs:
            try:
                return differ.apply(namespace, desc, mounts, payloads)
            except NotImplemented_ as e:
                err = e
        if err is not None:
            raise err
        return Descriptor()

    def compare(
        self,
        namespace: str,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        media_type: str = "",
        ref: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> Descriptor:
        err: CdtwistError | None = None
        for differ in self.differs:
            try:
                return differ.compare(
                    namespace, lower, upper, media_type=media_type, ref=ref, labels=labels, lease=lease
                )
            except NotImplemented_ as e:
                err = e
        if err is not None:
            raise err
        return Descriptor()


def mounts_from_grpc(mounts: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def descriptor_to_grpc(desc: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=desc.media_type, digest=desc.digest, size=desc.size, annotations=desc.annotations
    )


def descriptor_from_grpc(desc: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(
        media_type=desc.media_type, digest=desc.digest, size=desc.size, annotations=dict(desc.annotations)
    )


class DiffServicer(api_grpc.DiffServicer):
    """containerd's diff gRPC service: the request handed to the service as is."""

    def __init__(self, service: DiffService) -> None:
        self.service = service

    def Apply(self, request: api.ApplyRequest, context: grpc.ServicerContext) -> api.ApplyResponse:  # noqa: N802
        # The namespace is checked where containerd checks it: by the content store.
        namespace = callctx.namespace(context) or ""
        payloads = dict(request.payloads) if request.payloads else None
        applied = self.service.apply(
            namespace, descriptor_from_grpc(request.diff), mounts_from_grpc(request.mounts), payloads
        )
        return api.ApplyResponse(applied=descriptor_to_grpc(applied))

    def Diff(self, request: api.DiffRequest, context: grpc.ServicerContext) -> api.DiffResponse:  # noqa: N802
        namespace = callctx.namespace(context) or ""
        desc = self.service.compare(
            namespace,
            mounts_from_grpc(request.left),
            mounts_from_grpc(request.right),
            media_type=request.media_type,
            ref=request.ref,
            labels=dict(request.labels) if request.labels else None,
            lease=callctx.lease(context),
        )
        return api.DiffResponse(diff=descriptor_to_grpc(desc))


class DiffGRPC:
    """The ``io.containerd.grpc.v1.diff`` plugin."""

    def __init__(self, service: DiffService) -> None:
        self.servicer = DiffServicer(service)

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_DiffServicer_to_server(self.servicer, server)


def _init_service(ic: InitContext) -> DiffService:
    config: DiffServiceConfig = ic.config
    ordered: list[Differ] = []
    for name in config.order:
        plugin = ic.plugins.lookup(DIFFER, name)
        if plugin is None:
            raise CdtwistError(f"needed differ not loaded: {name}")
        if plugin.error is not None:
            raise CdtwistError(
                f"could not load required differ due plugin init error: {name}: {plugin.error_message()}"
            )
        instance = plugin.instance
        if not (callable(getattr(instance, "apply", None)) and callable(getattr(instance, "compare", None))):
            raise CdtwistError(f"differ does not implement Comparer and Applier interface: {name}")
        ordered.append(instance)
    return DiffService(ordered)


def _init_grpc(ic: InitContext) -> DiffGRPC:
    return DiffGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(
    Registration(type=SERVICE, id=SERVICE_ID, requires=(DIFFER,), config=DiffServiceConfig, init=_init_service)
)
register(Registration(type=GRPC, id="diff", requires=(SERVICE,), init=_init_grpc))
