# -*- test-case-name: tests.test_core_services -*-
"""``containerd.services.introspection.v1.Introspection``.

Lists every plugin that was tried, in init order, with why it failed or
was skipped; plugins that start later (none after boot today) appear as
they are added, since the set is read at each call.  A plugin that loaded
but depends on a peer (a proxy plugin) reports the peer being unreachable
as its error for as long as it is.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2
from google.rpc import status_pb2

from cdtwist import filters
from cdtwist.api.services.introspection.v1 import introspection_pb2 as api
from cdtwist.api.services.introspection.v1 import introspection_pb2_grpc as api_grpc
from cdtwist.api.types import platform_pb2
from cdtwist.errors import CdtwistError, InvalidArgument
from cdtwist.plugin import GRPC, SERVICE, Registration, SkipPlugin, register
from cdtwist.plugin.context import Plugin, PluginSet

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

SERVICE_ID = "introspection-service"


def plugin_to_proto(plugin: Plugin) -> api.Plugin:
    reg = plugin.registration
    out = api.Plugin(
        type=reg.type,
        id=reg.id,
        requires=list(reg.requires),
        platforms=[
            platform_pb2.Platform(os=p.os, architecture=p.architecture, variant=p.variant)
            for p in plugin.meta.platforms
        ],
        exports=plugin.meta.exports,
        capabilities=plugin.meta.capabilities,
    )
    err = plugin.error
    message = plugin.error_message()
    if err is None:
        # Plugins whose usability changes after boot (proxy plugins and their
        # peers) say so here, so `ctr plugins ls` shows them as they are now.
        health_error = getattr(plugin.instance, "health_error", None)
        if callable(health_error):
            err = health_error()
            message = str(err) if err is not None else ""
    if err is not None:
        if isinstance(err, CdtwistError) and not isinstance(err, SkipPlugin):
            code = err.code.value[0]
        else:
            code = grpc.StatusCode.UNKNOWN.value[0]
        out.init_err.CopyFrom(status_pb2.Status(code=code, message=message))
    return out


def _adaptor(plugin: api.Plugin) -> filters.AdaptorFunc:
    def field(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "type":
            return plugin.type, bool(plugin.type)
        if fieldpath[0] == "id":
            return plugin.id, bool(plugin.id)
        return "", False

    return filters.AdaptorFunc(field)


class IntrospectionService(api_grpc.IntrospectionServicer):
    def __init__(self, plugins: PluginSet, root: str) -> None:
        self.plugins = plugins
        self.root = root
        self._lock = threading.Lock()

    def Plugins(  # noqa: N802 - generated API
        self, request: api.PluginsRequest, context: grpc.ServicerContext
    ) -> api.PluginsResponse:
        try:
            matcher = filters.parse_all(*request.filters)
        except CdtwistError as e:
            raise InvalidArgument(str(e)) from None
        found = [plugin_to_proto(p) for p in self.plugins.all()]
        return api.PluginsResponse(plugins=[p for p in found if matcher.match(_adaptor(p))])

    def Server(  # noqa: N802
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> api.ServerResponse:
        return api.ServerResponse(uuid=self.server_uuid())

    def server_uuid(self) -> str:
        """Made once and kept under the plugin root, so it survives restarts."""
        path = os.path.join(self.root, "uuid")
        with self._lock:
            try:
                with open(path) as f:
                    value = f.read()
                return str(uuid.UUID(value))
            except FileNotFoundError:
                pass
            value = str(uuid.uuid4())
            os.makedirs(self.root, 0o700, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            return value


class IntrospectionGRPC:
    def __init__(self, service: IntrospectionService) -> None:
        self.service = service

    def register_grpc(self, server: grpc.Server) -> None:
        api_grpc.add_IntrospectionServicer_to_server(self.service, server)

    #: Also on ``[grpc].tcp_address``: read-only answers remote tooling needs
    #: (containerd 1.6 serves no built-in service there; cdtwist offers these).
    register_tcp = register_grpc


def _init_service(ic: InitContext) -> IntrospectionService:
    return IntrospectionService(ic.plugins, ic.root)


def _init_grpc(ic: InitContext) -> IntrospectionGRPC:
    return IntrospectionGRPC(ic.get_by_id(SERVICE, SERVICE_ID))


register(Registration(type=SERVICE, id=SERVICE_ID, init=_init_service))
register(Registration(type=GRPC, id="introspection", requires=(SERVICE,), init=_init_grpc))
