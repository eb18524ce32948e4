# -*- test-case-name: tests.test_grpc_server -*-
"""Per-call facts that containerd carries in its Go context: namespace, lease."""

from __future__ import annotations

import re

import grpc

from cdtwist.errors import FailedPrecondition, InvalidArgument
from cdtwist.log import go_quote

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"

_MAX_IDENTIFIER = 76
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*")


def validate_identifier(value: str) -> None:
    """containerd's ``identifiers.Validate``, with its messages."""
    if not value:
        raise InvalidArgument("identifier must not be empty")
    # Go measures bytes, anchors with $ that never matches before a final
    # newline (fullmatch), and quotes with %q.
    if len(value.encode()) > _MAX_IDENTIFIER:
        raise InvalidArgument(
            f"identifier {go_quote(value)} greater than maximum length ({_MAX_IDENTIFIER} characters)"
        )
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(
            f"identifier {go_quote(value)} must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
        )


def header(context: grpc.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def namespace(context: grpc.ServicerContext) -> str | None:
    return header(context, NAMESPACE_HEADER)


def namespace_required(context: grpc.ServicerContext) -> str:
    """The call's namespace, validated (``namespaces.NamespaceRequired``)."""
    ns = namespace(context)
    if not ns:
        raise FailedPrecondition("namespace is required")
    try:
        validate_identifier(ns)
    except InvalidArgument as e:
        raise InvalidArgument(f"namespace validation: {e.context}") from None
    return ns


def lease(context: grpc.ServicerContext) -> str | None:
    return header(context, LEASE_HEADER)
