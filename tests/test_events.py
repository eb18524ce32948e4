"""The event exchange: validation, fan-out, filters, typeurl."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cdtwist import typeurl
from cdtwist.api.events import namespace_pb2
from cdtwist.errors import CdtwistError, FailedPrecondition, InvalidArgument
from cdtwist.events.exchange import Envelope, Exchange, message_field, validate_topic


class TypeurlTests(SynchronousTestCase):
    def test_bare_message_name_like_containerd(self) -> None:
        packed = typeurl.marshal_any(namespace_pb2.NamespaceCreate(name="a"))
        self.assertEqual(packed.type_url, "containerd.events.NamespaceCreate")
        self.assertEqual(packed.value, b"\n\x01a")
        self.assertEqual(typeurl.unmarshal_any(packed), namespace_pb2.NamespaceCreate(name="a"))

    def test_prefixed_urls_resolve_too(self) -> None:
        packed = typeurl.marshal_any(namespace_pb2.NamespaceDelete(name="b"))
        packed.type_url = "types.containerd.io/" + packed.type_url
        self.assertEqual(typeurl.unmarshal_any(packed).name, "b")


class TopicTests(SynchronousTestCase):
    def test_valid(self) -> None:
        validate_topic("/tasks/exit")
        validate_topic("/a")

    def test_invalid_messages_match_containerd(self) -> None:
        cases = {
            "": 'envelope topic "": must not be empty: invalid argument',
            "tasks": "envelope topic \"tasks\": must start with '/': invalid argument",
            "/": 'envelope topic "/": must have at least one component: invalid argument',
            "/a//b": 'envelope topic "/a//b": failed validation on component "": '
            "identifier must not be empty: invalid argument",
        }
        for topic, message in cases.items():
            err = self.assertRaises(InvalidArgument, validate_topic, topic)
            self.assertEqual(str(err), message)


class InlineReactor:
    """Stands in for the reactor thread: calls from other threads run at once."""

    def callFromThread(self, f, *args):  # noqa: N802
        f(*args)


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = InlineReactor()
        self.exchange = Exchange(self.reactor)

    def test_publish_reaches_every_subscriber_in_order(self) -> None:
        first = self.exchange.subscribe()
        second = self.exchange.subscribe()
        self.exchange.publish("default", "/namespaces/create", namespace_pb2.NamespaceCreate(name="a"))
        self.exchange.publish("default", "/namespaces/delete", namespace_pb2.NamespaceDelete(name="a"))
        for sub in (first, second):
            topics = [sub.get(timeout=0).topic, sub.get(timeout=0).topic]
            self.assertEqual(topics, ["/namespaces/create", "/namespaces/delete"])
            self.assertIsNone(sub.get(timeout=0))

    def test_envelope_fields(self) -> None:
        sub = self.exchange.subscribe()
        self.exchange.publish("ns1", "/x/y", namespace_pb2.NamespaceCreate(name="a", labels={"k": "v"}))
        env = sub.get(timeout=0)
        self.assertEqual((env.namespace, env.topic), ("ns1", "/x/y"))
        self.assertEqual(env.event.type_url, "containerd.events.NamespaceCreate")
        self.assertGreater(env.timestamp.seconds, 0)

    def test_filters(self) -> None:
        by_topic = self.exchange.subscribe('topic=="/namespaces/delete"')
        by_event = self.exchange.subscribe("event.labels.k==v")
        by_ns = self.exchange.subscribe("namespace==other", 'topic~="create$"')
        self.exchange.publish("default", "/namespaces/create", namespace_pb2.NamespaceCreate(name="a"))
        self.exchange.publish(
            "default", "/namespaces/update", namespace_pb2.NamespaceUpdate(name="a", labels={"k": "v"})
        )
        self.exchange.publish("other", "/namespaces/delete", namespace_pb2.NamespaceDelete(name="a"))
        self.assertEqual(by_topic.get(timeout=0).topic, "/namespaces/delete")
        self.assertIsNone(by_topic.get(timeout=0))
        self.assertEqual(by_event.get(timeout=0).topic, "/namespaces/update")
        self.assertIsNone(by_event.get(timeout=0))
        # alternatives: namespace==other OR topic ends with create
        self.assertEqual(
            [by_ns.get(timeout=0).topic, by_ns.get(timeout=0).topic], ["/namespaces/create", "/namespaces/delete"]
        )

    def test_bad_filter_is_an_unknown_error_like_containerd(self) -> None:
        err = self.assertRaises(CdtwistError, self.exchange.subscribe, "topic==")
        self.assertTrue(str(err).startswith("subscription error: failed parsing subscription filters: "))

    def test_publish_needs_a_valid_namespace(self) -> None:
        event = namespace_pb2.NamespaceCreate(name="a")
        err = self.assertRaises(FailedPrecondition, self.exchange.publish, None, "/a", event)
        self.assertEqual(str(err), "failed publishing event: namespace is required: failed precondition")
        self.assertRaises(InvalidArgument, self.exchange.publish, "bad ns", "/a", event)

    def test_forward_validates_envelope(self) -> None:
        sub = self.exchange.subscribe()
        env = Envelope(
            namespace="default", topic="/tasks/exit", event=typeurl.marshal_any(namespace_pb2.NamespaceCreate(name="x"))
        )
        err = self.assertRaises(InvalidArgument, self.exchange.forward, env)
        self.assertEqual(str(err), "timestamp must be set on forwarded event: invalid argument")
        env.timestamp.seconds = 1700000000
        self.exchange.forward(env)
        self.assertEqual(sub.get(timeout=0), env)

    def test_closed_subscription_stops_and_is_removed(self) -> None:
        sub = self.exchange.subscribe()
        sub.close()
        self.exchange.publish("default", "/a", namespace_pb2.NamespaceCreate(name="a"))
        self.assertRaises(StopIteration, sub.get, 0)
        self.assertEqual(self.exchange._subscribers, [])

    def test_stop_closes_subscribers(self) -> None:
        sub = self.exchange.subscribe()
        self.exchange.stop()
        self.assertRaises(StopIteration, sub.get, 0)


class MessageFieldTests(SynchronousTestCase):
    def test_fields(self) -> None:
        msg = namespace_pb2.NamespaceUpdate(name="n", labels={"a.b": "c"})
        self.assertEqual(message_field(msg, ["name"]), ("n", True))
        self.assertEqual(message_field(msg, ["labels", "a", "b"]), ("c", True))
        self.assertEqual(message_field(msg, ["labels", "zz"]), ("", False))
        self.assertEqual(message_field(msg, ["nope"]), ("", False))
        self.assertEqual(message_field(msg, []), ("", False))
