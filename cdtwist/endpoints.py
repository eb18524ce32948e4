# -*- test-case-name: tests.test_endpoints -*-
"""The one place that turns a configured address into a Twisted endpoint.

containerd writes a socket path (``/run/x.sock``) or ``host:port``; cdtwist
also accepts any Twisted server endpoint string (``unix:…``, ``tcp:…``,
``ssl:…`` or a plugin's prefix).  Everything that listens goes through here,
and so does everything that dials out (proxy plugins): a path or ``unix:``
string is a UNIX socket, ``host:port`` is TCP, anything else a Twisted
client endpoint string (``tcp:…``, ``tls:…``, ``cdtls:…``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cdtwist.errors import InvalidArgument

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamServerEndpoint

_ENDPOINT_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]*:")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*)):(?P<port>\d+)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def is_unix_path(address: str) -> bool:
    """A bare path: absolute, or relative without a colon (a colon means host:port or an endpoint)."""
    if address.startswith("/") or address.startswith("./"):
        return True
    return bool(address) and ":" not in address


def _split(address: str) -> tuple[str, str, str]:
    """``("unix", path, "")``, ``("tcp", host, port)`` or ``("endpoint", description, "")``."""
    if not address:
        raise InvalidArgument("empty address")
    if is_unix_path(address):
        return "unix", address, ""
    match = _HOST_PORT.match(address)
    if match:
        return "tcp", match.group("v6") or match.group("host") or "", match.group("port")
    if _ENDPOINT_PREFIX.match(address):
        return "endpoint", address, ""
    raise InvalidArgument(f"address {address!r} is neither a socket path, host:port, nor an endpoint string")


def server_description(address: str, *, unix_mode: int = 0o660) -> str:
    """A Twisted server endpoint description for a configured address."""
    kind, value, port = _split(address)
    if kind == "unix":
        return f"unix:{_escape(value)}:mode={unix_mode:o}"
    if kind == "tcp":
        return f"tcp:{port}:interface={_escape(value)}" if value else f"tcp:{port}"
    return value


def client_description(address: str) -> str:
    """A Twisted client endpoint description for an address to dial (``:port`` dials 127.0.0.1)."""
    kind, value, port = _split(address)
    if kind == "unix":
        return f"unix:{_escape(value)}"
    if kind == "tcp":
        return f"tcp:host={_escape(value or '127.0.0.1')}:port={port}"
    return value


def server_endpoint(reactor: object, address: str, *, unix_mode: int = 0o660) -> IStreamServerEndpoint:
    from twisted.internet.endpoints import serverFromString

    return serverFromString(reactor, server_description(address, unix_mode=unix_mode))


def unix_path(address: str) -> str | None:
    """The socket file behind an address, if it is a UNIX socket (for cleanup)."""
    if is_unix_path(address):
        return address
    if address.startswith("unix:"):
        raw = re.split(r"(?<!\\):", address[len("unix:"):], maxsplit=1)[0]
        return raw.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")
    return None


def unix_mode(address: str, default: int = 0o660) -> int:
    """The ``mode=`` of a ``unix:`` endpoint string (octal, as Twisted reads it), else ``default``."""
    if address.startswith("unix:"):
        for part in re.split(r"(?<!\\):", address[len("unix:"):])[1:]:
            if part.startswith("mode="):
                return int(part[len("mode="):], 8)
    return default
