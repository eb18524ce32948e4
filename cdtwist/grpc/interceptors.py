# -*- test-case-name: tests.test_grpc_server -*-
"""Shared per-call work done once for every servicer: errors and metrics.

Servicers raise :class:`cdtwist.errors.CdtwistError` subclasses; this layer
turns them into the status codes containerd sends (``errdefs.ToGRPC``), so
no handler formats a status itself.  Metrics follow go-grpc-prometheus,
which containerd uses, so the same dashboards work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from cdtwist.errors import CdtwistError, to_grpc_code
from cdtwist.log import get_logger

log = get_logger(__name__)


class GRPCMetrics:
    """go-grpc-prometheus's server metrics, same names and labels."""

    def __init__(self, registry: CollectorRegistry, histogram: bool) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels + ["grpc_code"],
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=registry,
        )
        self.seconds: Histogram | None = None
        if histogram:
            self.seconds = Histogram(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level "
                "handled by the server.",
                labels,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=registry,
            )


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _MethodMetrics:
    """One method's metric children, bound once: label lookups cost per call otherwise."""

    def __init__(self, metrics: GRPCMetrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.handled_family = metrics.handled
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels) if metrics.seconds is not None else None
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self.handled_family.labels(*self.labels, _code_name(code))
        return child


class _Call:
    """Bookkeeping for one RPC: timing and outcome."""

    __slots__ = ("metrics", "start")

    def __init__(self, metrics: _MethodMetrics | None) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        if metrics:
            metrics.started.inc()

    def received(self) -> None:
        if self.metrics:
            self.metrics.received.inc()

    def sent(self) -> None:
        if self.metrics:
            self.metrics.sent.inc()

    def done(self, code: grpc.StatusCode) -> None:
        if not self.metrics:
            return
        self.metrics.handled(code).inc()
        if self.metrics.seconds is not None:
            self.metrics.seconds.observe(time.monotonic() - self.start)


def _code_name(code: grpc.StatusCode) -> str:
    # Go names: OK, NotFound, InvalidArgument ...
    return "".join(part.capitalize() for part in code.name.split("_")) if code.name != "OK" else "OK"


def _fail(context: grpc.ServicerContext, err: BaseException, method: str) -> grpc.StatusCode:
    """Abort the call with containerd's code for ``err``; never returns normally."""
    if isinstance(err, CdtwistError):
        code = err.code
        message = err.message
    else:
        code = to_grpc_code(err)
        message = str(err) or type(err).__name__
        if code == grpc.StatusCode.UNKNOWN:
            log.failure("{method} failed", failure=None, method=method)
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _status_of(context: grpc.ServicerContext) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


_WRAPPED_CACHE_LIMIT = 4096


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Wraps every handler: maps cdtwist errors to status codes, counts calls."""

    def __init__(self, metrics: GRPCMetrics | None = None) -> None:
        self.metrics = metrics
        # grpcio asks for every call; the wrapped handler depends only on the method.
        self._wrapped: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrap(handler_call_details.method, handler)
            # Registered handlers are few and long-lived; anything else
            # (per-call fallbacks) must not grow the cache without bound.
            if len(self._wrapped) < _WRAPPED_CACHE_LIMIT:
                self._wrapped[key] = wrapped
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` for ``/service/Method`` with this layer around it, for wrapping at registration.

        The server wraps every registered handler once, up front, instead of
        having grpcio run an interceptor pipeline on its serving thread for
        every call; the wrapped handler behaves exactly as the intercepted one.
        """
        return self._wrap(method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, name = _split(method)
        labels = (_rpc_type(handler), service, name)
        metrics = _MethodMetrics(self.metrics, labels) if self.metrics is not None else None

        def begin(request: Any) -> tuple[_Call, Any]:
            call = _Call(metrics)
            if not handler.request_streaming:
                call.received()
                return call, request
            return call, _counted(request, call)

        def failed(call: _Call, err: Exception, context: grpc.ServicerContext) -> NoReturn:
            if _is_abort(err, context):
                call.done(_status_of(context))
                raise err
            call.done(_code_for(err))
            _fail(context, err, method)

        def run_unary(behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
            call, request = begin(request)
            try:
                response = behavior(request, context)
            except Exception as e:
                failed(call, e, context)
            call.sent()
            call.done(_status_of(context))
            return response

        def run_stream(
            behavior: Callable[..., Iterator[Any]], request: Any, context: grpc.ServicerContext
        ) -> Iterator[Any]:
            call, request = begin(request)
            try:
                for response in behavior(request, context):
                    call.sent()
                    yield response
            except Exception as e:
                failed(call, e, context)
            call.done(_status_of(context))

        if metrics is not None and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_unary(handler.unary_unary, metrics, failed),
                handler.request_deserializer,
                handler.response_serializer,
            )
        for kind, make, run in _KINDS:
            inner = getattr(handler, kind)
            if inner is not None:
                runner = run_unary if run == "unary" else run_stream
                return make(
                    lambda req, ctx, inner=inner, runner=runner: runner(inner, req, ctx),
                    handler.request_deserializer,
                    handler.response_serializer,
                )
        raise AssertionError(f"{method}: handler without behaviour")


def _unary_unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    metrics: _MethodMetrics,
    failed: Callable[[_Call, Exception, grpc.ServicerContext], NoReturn],
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """The hot path (most calls are unary): what ``run_unary`` does, without its indirections.

    Counts in the same order as :class:`_Call`: started and received before
    the handler, sent and handled after it.
    """
    started, received, sent = metrics.started.inc, metrics.received.inc, metrics.sent.inc
    handled, seconds = metrics.handled, metrics.seconds
    monotonic = time.monotonic

    def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
        start = monotonic()
        started()
        received()
        try:
            response = behavior(request, context)
        except Exception as e:
            call = _Call.__new__(_Call)
            call.metrics, call.start = metrics, start
            failed(call, e, context)
        sent()
        handled(_status_of(context)).inc()
        if seconds is not None:
            seconds.observe(monotonic() - start)
        return response

    return unary_unary


class InterceptedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose answers go through ``interceptor`` (what the server no longer asks grpcio to do)."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: ErrorAndMetricsInterceptor) -> None:
        self.inner = inner
        self.interceptor = interceptor
        name = getattr(inner, "service_name", None)
        if callable(name):
            self.service_name = name

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.interceptor.intercept_service(self.inner.service, handler_call_details)


def _counted(requests: Iterator[Any], call: _Call) -> Iterator[Any]:
    for request in requests:
        call.received()
        yield request


#: handler attribute, its grpcio constructor, and whether the response streams.
_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, "unary"),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, "unary"),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, "stream"),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, "stream"),
)


def _code_for(err: BaseException) -> grpc.StatusCode:
    return err.code if isinstance(err, CdtwistError) else to_grpc_code(err)


def _is_abort(err: BaseException, context: grpc.ServicerContext) -> bool:
    """grpcio signals ``context.abort`` with a bare Exception after setting the code."""
    code = context.code() if hasattr(context, "code") else None
    return type(err) is Exception and isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK
