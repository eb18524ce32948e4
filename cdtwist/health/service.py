# -*- test-case-name: tests.test_core_services -*-
"""``grpc.health.v1.Health`` as containerd's ``healthcheck`` plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from cdtwist.errors import GRPCStatus
from cdtwist.plugin import GRPC, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext


class _HealthServicer(health.HealthServicer):
    """grpcio's servicer with grpc-go's answer for an unknown service."""

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - generated API
        with self._lock:
            known = request.service in self._server_status
        if not known:
            raise GRPCStatus(grpc.StatusCode.NOT_FOUND, "unknown service")
        return super().Check(request, context)


class HealthPlugin:
    def __init__(self) -> None:
        # The overall ("") status is SERVING from the start: the socket only
        # exists once every plugin is up, as with containerd.
        self.servicer = _HealthServicer()

    def register_grpc(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    #: Also on ``[grpc].tcp_address``: read-only answers remote tooling needs
    #: (containerd 1.6 serves no built-in service there; cdtwist offers these).
    register_tcp = register_grpc

    def stop(self) -> None:
        self.servicer.enter_graceful_shutdown()


def _init(ic: InitContext) -> HealthPlugin:
    return HealthPlugin()


register(Registration(type=GRPC, id="healthcheck", init=_init))
