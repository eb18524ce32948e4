# -*- test-case-name: tests.test_core_services -*-
"""``containerd.services.version.v1.Version``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from cdtwist import SERVER_VERSION
from cdtwist.api.services.version.v1 import version_pb2, version_pb2_grpc
from cdtwist.plugin import GRPC, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext


class VersionService(version_pb2_grpc.VersionServicer):
    def __init__(self, revision: str) -> None:
        self.response = version_pb2.VersionResponse(version=SERVER_VERSION, revision=revision)

    def register_grpc(self, server: grpc.Server) -> None:
        version_pb2_grpc.add_VersionServicer_to_server(self, server)

    #: Also on ``[grpc].tcp_address``: read-only answers remote tooling needs
    #: (containerd 1.6 serves no built-in service there; cdtwist offers these).
    register_tcp = register_grpc

    def Version(  # noqa: N802 - generated API
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> version_pb2.VersionResponse:
        return self.response


def _init(ic: InitContext) -> VersionService:
    return VersionService(ic.revision)


register(Registration(type=GRPC, id="version", init=_init))
