# -*- test-case-name: tests.test_ttrpc_protocol,tests.test_ttrpc_interop -*-
"""ttrpc statuses <-> cdtwist errors, the way the Go server and client map them.

A caller gets :func:`cdtwist.errors.from_grpc_code`'s class back; codes
that module has no class for still arrive intact in :class:`StatusError`,
so a proxy can forward e.g. RESOURCE_EXHAUSTED unchanged.  Kept free of
Twisted so the asyncio client can use it.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from cdtwist.errors import CdtwistError, GRPCStatus, Unavailable, from_grpc_code

__all__ = [
    "ClosedError",
    "StatusError",
    "code_of",
    "error_from_status",
    "status_proto",
]

_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def code_of(value: int) -> grpc.StatusCode:
    """The StatusCode for a wire integer; out-of-range values read as UNKNOWN like grpc-go."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


#: A status with an explicit code, for codes cdtwist.errors has no class for.
StatusError = GRPCStatus


class ClosedError(Unavailable):
    """Go's ``ttrpc.ErrClosed``: the connection went away under a call."""

    text = ""

    def __init__(self, context: str | None = "ttrpc: closed") -> None:
        super().__init__(context)


def status_proto(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def error_from_status(status: status_pb2.Status) -> CdtwistError:
    """The error a caller sees for a non-OK status (``errdefs.FromGRPC`` + exact code)."""
    code = code_of(status.code)
    err = from_grpc_code(code, status.message)
    if err.code is not code:
        return StatusError(code, status.message)
    return err
