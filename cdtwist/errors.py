# -*- test-case-name: tests.test_errors -*-
"""containerd's error classes and their gRPC status codes.

Go wraps a class error with context (``namespace "a": already exists``);
:class:`CdtwistError` keeps that shape so clients see the same messages,
and :func:`to_grpc_code` is the one place that maps classes to codes
(containerd's ``errdefs.ToGRPC``).
"""

from __future__ import annotations

import grpc


class CdtwistError(Exception):
    """Base of the error classes; ``str()`` is ``"<context>: <class text>"``.

    Used directly it is a plain error with no class (gRPC UNKNOWN), whose
    message is the context alone, as a bare Go error would read.
    """

    text = ""
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, context: str | None = None) -> None:
        self.context = context
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if not self.text:
            return self.context or "unknown"
        return f"{self.context}: {self.text}" if self.context else self.text

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CdtwistError):
    text = "invalid argument"
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CdtwistError):
    text = "not found"
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CdtwistError):
    text = "already exists"
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CdtwistError):
    text = "failed precondition"
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CdtwistError):
    text = "unavailable"
    code = grpc.StatusCode.UNAVAILABLE


class NotImplemented_(CdtwistError):
    text = "not implemented"
    code = grpc.StatusCode.UNIMPLEMENTED


class Canceled(CdtwistError):
    text = "context canceled"
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(CdtwistError):
    text = "context deadline exceeded"
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        NotImplemented_,
        Canceled,
        DeadlineExceeded,
    )
}


def to_grpc_code(err: BaseException) -> grpc.StatusCode:
    """The status code containerd would send for ``err``."""
    if isinstance(err, CdtwistError):
        return err.code
    if isinstance(err, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, FileExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    return grpc.StatusCode.UNKNOWN


def from_grpc_code(code: grpc.StatusCode, message: str) -> CdtwistError:
    """Rebuild the error class from a status received from a peer (``errdefs.FromGRPC``)."""
    cls = _BY_CODE.get(code, CdtwistError)
    suffix = ": " + cls.text
    context: str | None = message
    if message == cls.text:
        context = None
    elif message.endswith(suffix):
        context = message[: -len(suffix)]
    return cls(context)


class GRPCStatus(CdtwistError):
    """A status chosen directly, with its message verbatim (Go's ``status.Errorf``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code  # type: ignore[misc]
        super().__init__(message)
