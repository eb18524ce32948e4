# -*- test-case-name: tests.test_ttrpc_protocol -*-
"""The ttrpc client under asyncio: same :class:`~cdtwist.ttrpc.client.TTRPCClient`, asyncio futures.

It uses a txaio API instance bound to the running loop
(``txaio.aio.with_config(loop)``), never the process-wide txaio selection,
so it coexists with Twisted code (which calls ``txaio.use_twisted()``)::

    async def main() -> None:
        client = await open_unix_client("/run/containerd/s/abc")
        task = Stub(client, "containerd.task.v2.Task")
        state = await task.State(StateRequest(id="c1"), timeout=5)
        client.close()

No Twisted reactor is installed or needed.
"""

from __future__ import annotations

import asyncio

import txaio.aio

from cdtwist.ttrpc.client import TTRPCClient
from cdtwist.ttrpc.framing import MESSAGE_LENGTH_MAX

__all__ = ["AsyncioTTRPCProtocol", "open_unix_client"]


class AsyncioTTRPCProtocol(asyncio.Protocol):
    """Feeds a :class:`TTRPCClient` from an asyncio transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self.loop = loop
        self.max_length = max_length
        self.client: TTRPCClient | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client = TTRPCClient(
            transport.write,
            transport.close,
            api=txaio.aio.with_config(loop=self.loop),
            call_later=self.loop.call_later,
            max_length=self.max_length,
        )

    def data_received(self, data: bytes) -> None:
        assert self.client is not None
        self.client.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.connection_lost(exc)


async def open_unix_client(path: str, *, max_length: int = MESSAGE_LENGTH_MAX) -> TTRPCClient:
    """Connect to a ttrpc UNIX socket from a running asyncio loop."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(lambda: AsyncioTTRPCProtocol(loop, max_length), path)
    assert proto.client is not None
    return proto.client
