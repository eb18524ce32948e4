# -*- test-case-name: tests.test_events -*-
"""``containerd.services.events.v1.Events`` over gRPC and ttrpc."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from cdtwist.api.services.events.v1 import events_pb2, events_pb2_grpc
from cdtwist.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from cdtwist.events.exchange import Exchange
from cdtwist.grpc import context as callctx
from cdtwist.plugin import EVENT, GRPC, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext
    from cdtwist.ttrpc.server import CallContext, Services

#: How long a subscriber's thread sleeps between checks that its call is alive.
SUBSCRIBER_POLL = 5.0


class EventsService(events_pb2_grpc.EventsServicer):
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def register_grpc(self, server: grpc.Server) -> None:
        events_pb2_grpc.add_EventsServicer_to_server(self, server)

    def register_ttrpc(self, services: Services) -> None:
        services.register(ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"], _TTRPCEvents(self.exchange))

    def Publish(  # noqa: N802 - generated API
        self, request: events_pb2.PublishRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.exchange.publish(callctx.namespace(context), request.topic, request.event)
        return empty_pb2.Empty()

    def Forward(  # noqa: N802
        self, request: events_pb2.ForwardRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.exchange.forward(request.envelope)
        return empty_pb2.Empty()

    def Subscribe(  # noqa: N802
        self, request: events_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.Envelope]:
        subscription = self.exchange.subscribe(*request.filters)
        # Wakes the loop below as soon as the client goes away or the server stops.
        context.add_callback(subscription.close)
        try:
            while context.is_active():
                try:
                    envelope = subscription.get(timeout=SUBSCRIBER_POLL)
                except StopIteration:
                    break
                if envelope is not None:
                    yield envelope
            if subscription.error is not None:
                raise subscription.error
        finally:
            subscription.close()


class _TTRPCEvents:
    """``containerd.services.events.ttrpc.v1.Events``: how shims publish task events."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def Forward(  # noqa: N802 - generated API
        self, request: ttrpc_events_pb2.ForwardRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        # Same fields, another package: re-encode onto the gRPC envelope.
        envelope = events_pb2.Envelope.FromString(request.envelope.SerializeToString())
        self.exchange.forward(envelope)
        return empty_pb2.Empty()


def _init(ic: InitContext) -> EventsService:
    return EventsService(ic.get_by_id(EVENT, "exchange"))


register(Registration(type=GRPC, id="events", requires=(EVENT,), init=_init))
