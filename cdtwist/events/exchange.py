# -*- test-case-name: tests.test_events -*-
"""Fan events out to subscribers (containerd's ``events/exchange``).

Publishers may call from any thread: validation happens in the caller, so
errors reach it synchronously, then the envelope crosses to the reactor
thread, which hands it to every subscriber's queue in publish order.
Subscribers are usually gRPC stream handlers on pool threads; each drains
its own bounded queue and applies its filters there, so a slow or
expensive subscriber never holds up the reactor or the others.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from twisted.python import threadable

from cdtwist import filters, typeurl
from cdtwist.api.services.events.v1 import events_pb2
from cdtwist.errors import CdtwistError, FailedPrecondition, InvalidArgument
from cdtwist.grpc.context import validate_identifier
from cdtwist.log import get_logger
from cdtwist.plugin import EVENT, Registration, register

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

Envelope = events_pb2.Envelope

#: A subscriber this far behind is cut off rather than grow without bound.
SUBSCRIBER_QUEUE_LIMIT = 65536


class SubscriptionOverflow(CdtwistError):
    text = "subscriber fell too far behind"


def validate_topic(topic: str) -> None:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f'envelope topic "{topic}": {why}')

    if not topic:
        raise bad("must not be empty")
    if topic[0] != "/":
        raise bad("must start with '/'")
    if len(topic) == 1:
        raise bad("must have at least one component")
    for component in topic[1:].split("/"):
        try:
            validate_identifier(component)
        except InvalidArgument as e:
            raise bad(f'failed validation on component "{component}": {e.context}') from None


def validate_envelope(envelope: Envelope) -> None:
    try:
        validate_identifier(envelope.namespace)
    except InvalidArgument as e:
        raise InvalidArgument(f"event envelope has invalid namespace: {e.context}") from None
    validate_topic(envelope.topic)
    if envelope.timestamp.seconds == 0 and envelope.timestamp.nanos == 0:
        raise InvalidArgument("timestamp must be set on forwarded event")


def message_field(message: Message, fieldpath: Sequence[str]) -> tuple[str, bool]:
    """Resolve a filter fieldpath on a protobuf message, as containerd's
    generated ``Field`` methods do: strings, bools, string maps, nesting."""
    if not fieldpath:
        return "", False
    field = message.DESCRIPTOR.fields_by_name.get(fieldpath[0])
    if field is None:
        return "", False
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = ".".join(fieldpath[1:])
        if key in value:
            return str(value[key]), True
        return "", False
    if field.message_type is not None:
        if field.is_repeated or not message.HasField(field.name):
            return "", False
        return message_field(value, fieldpath[1:])
    if len(fieldpath) > 1 or field.is_repeated:
        return "", False
    if field.type == field.TYPE_BOOL:
        return ("true" if value else "false"), True
    if field.type == field.TYPE_STRING:
        return value, bool(value)
    return "", False


def envelope_adaptor(envelope: Envelope) -> filters.AdaptorFunc:
    def field(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == "namespace":
            return envelope.namespace, bool(envelope.namespace)
        if fieldpath[0] == "topic":
            return envelope.topic, bool(envelope.topic)
        if fieldpath[0] == "event":
            try:
                decoded = typeurl.unmarshal_any(envelope.event)
            except Exception:
                return "", False
            return message_field(decoded, fieldpath[1:])
        return "", False

    return filters.AdaptorFunc(field)


class Subscription:
    """A thread-safe feed of envelopes for one subscriber."""

    _CLOSED = object()

    def __init__(self, exchange: Exchange, filter_: filters.Filter) -> None:
        self.exchange = exchange
        self.filter = filter_
        self._queue: queue.Queue[object] = queue.Queue(SUBSCRIBER_QUEUE_LIMIT)
        self.error: CdtwistError | None = None
        self.closed = False

    def _deliver(self, envelope: Envelope) -> None:
        try:
            self._queue.put_nowait(envelope)
        except queue.Full:
            self.error = SubscriptionOverflow()
            log.warn("event subscriber overflowed; closing it")
            self.close()

    def get(self, timeout: float) -> Envelope | None:
        """The next matching envelope, or None after ``timeout`` seconds.

        Raises StopIteration once the subscription is closed.
        """
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                if self.closed:
                    raise StopIteration from None
                return None
            if item is self._CLOSED:
                raise StopIteration
            assert isinstance(item, Envelope)
            if self.filter.match(envelope_adaptor(item)):
                return item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.exchange._remove(self)
        try:
            self._queue.put_nowait(self._CLOSED)
        except queue.Full:
            pass


class Exchange:
    """The ``io.containerd.event.v1.exchange`` plugin instance."""

    def __init__(self, reactor: IReactorThreads) -> None:
        self.reactor = reactor
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()

    # -- publishing (any thread) -------------------------------------------

    def publish(self, namespace: str | None, topic: str, event: Message) -> Envelope:
        if not namespace:
            raise FailedPrecondition("failed publishing event: namespace is required")
        try:
            validate_identifier(namespace)
        except InvalidArgument as e:
            raise InvalidArgument(f"failed publishing event: namespace validation: {e.context}") from None
        validate_topic(topic)
        # An event that arrives packed (the Publish RPC) keeps its bytes and type url.
        packed = event if isinstance(event, any_pb2.Any) else typeurl.marshal_any(event)
        envelope = Envelope(namespace=namespace, topic=topic, event=packed)
        envelope.timestamp.CopyFrom(_now())
        self._dispatch(envelope)
        return envelope

    def forward(self, envelope: Envelope) -> None:
        validate_envelope(envelope)
        self._dispatch(envelope)

    def _dispatch(self, envelope: Envelope) -> None:
        log.debug("event published", topic=envelope.topic, ns=envelope.namespace, type=envelope.event.type_url)
        if not self._subscribers:
            # Nobody to hand it to: no wake-up of the reactor (a subscriber
            # arriving after this point never saw this event in any case).
            return
        if threadable.isInIOThread():
            self._broadcast(envelope)
        else:
            self.reactor.callFromThread(self._broadcast, envelope)

    def _broadcast(self, envelope: Envelope) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription._deliver(envelope)

    # -- subscribing (any thread) ------------------------------------------

    def subscribe(self, *filter_exprs: str) -> Subscription:
        try:
            parsed = filters.parse_all(*filter_exprs)
        except CdtwistError as e:
            raise CdtwistError(f"subscription error: failed parsing subscription filters: {e}") from None
        subscription = Subscription(self, parsed)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def drain(self) -> None:
        """The servers are stopping: end every subscription so its stream closes."""
        self.stop()

    def stop(self) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.close()


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _init(ic: InitContext) -> Exchange:
    return Exchange(ic.reactor)


register(Registration(type=EVENT, id="exchange", init=_init))
