# -*- test-case-name: tests.test_ttrpc_protocol -*-
"""ttrpc, containerd's lightweight RPC for shims, wire-compatible with github.com/containerd/ttrpc.

:mod:`~cdtwist.ttrpc.framing` is the wire format, :mod:`~cdtwist.ttrpc.server`
the Twisted server, :mod:`~cdtwist.ttrpc.client` the loop-neutral client
(Twisted adapter included) and :mod:`~cdtwist.ttrpc.aio` its asyncio adapter.
"""

from cdtwist.ttrpc.client import ClientStream, Stub, TTRPCClient, TTRPCClientProtocol, connect_unix
from cdtwist.ttrpc.framing import MESSAGE_LENGTH_MAX, Frame, FrameDecoder, MessageType, encode_frame
from cdtwist.ttrpc.server import (
    NAMESPACE_KEY,
    REQUIRE_SAME_USER,
    CallContext,
    ServerStream,
    Services,
    TTRPCServerFactory,
    TTRPCServerProtocol,
    listen_ttrpc,
)
from cdtwist.ttrpc.status import ClosedError, StatusError

__all__ = [
    "MESSAGE_LENGTH_MAX",
    "NAMESPACE_KEY",
    "REQUIRE_SAME_USER",
    "CallContext",
    "ClientStream",
    "ClosedError",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "ServerStream",
    "Services",
    "StatusError",
    "Stub",
    "TTRPCClient",
    "TTRPCClientProtocol",
    "TTRPCServerFactory",
    "TTRPCServerProtocol",
    "connect_unix",
    "encode_frame",
    "listen_ttrpc",
]
