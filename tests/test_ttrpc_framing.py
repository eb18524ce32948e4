"""ttrpc framing: golden bytes, incremental decoding, oversize skipping, garbage tolerance."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.ttrpc import request_pb2
from cdtwist.ttrpc.framing import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    HEADER,
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    encode_frame,
)
from cdtwist.ttrpc.server import TTRPCServerFactory
from tests.test_ttrpc_support import task_services

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class GoldenTests(SynchronousTestCase):
    def test_constants_match_go(self) -> None:
        self.assertEqual((HEADER.format, HEADER_LENGTH, MESSAGE_LENGTH_MAX), (">IIBB", 10, 4194304))
        self.assertEqual((MessageType.REQUEST, MessageType.RESPONSE, MessageType.DATA), (1, 2, 3))
        self.assertEqual((FLAG_REMOTE_CLOSED, FLAG_REMOTE_OPEN, FLAG_NO_DATA), (1, 2, 4))

    def test_unary_request_header(self) -> None:
        frame = encode_frame(1, MessageType.REQUEST, b"0123456789")
        self.assertEqual(frame[:10].hex(" "), "00 00 00 0a 00 00 00 01 01 00")
        self.assertEqual(frame[10:], b"0123456789")

    def test_data_close_header(self) -> None:
        frame = encode_frame(0xFFFFFFFF, MessageType.DATA, b"", FLAG_REMOTE_CLOSED | FLAG_NO_DATA)
        self.assertEqual(frame.hex(" "), "00 00 00 00 ff ff ff ff 03 05")

    def test_full_request_frame(self) -> None:
        """A State call as the Go client writes it (Request fields in number order)."""
        payload = shim_pb2.StateRequest(id="c1").SerializeToString()
        req = request_pb2.Request(
            service="containerd.task.v2.Task",
            method="State",
            payload=payload,
            timeout_nano=1_000_000_000,
            metadata=[request_pb2.KeyValue(key="containerd-namespace-ttrpc", value="default")],
        )
        body = (
            b"\x0a\x17containerd.task.v2.Task"
            + b"\x12\x05State"
            + b"\x1a\x04\x0a\x02c1"
            + b"\x20\x80\x94\xeb\xdc\x03"
            + b"\x2a\x25\x0a\x1acontainerd-namespace-ttrpc\x12\x07default"
        )
        self.assertEqual(req.SerializeToString(), body)
        self.assertEqual(encode_frame(3, MessageType.REQUEST, body)[:10], HEADER.pack(len(body), 3, 1, 0))

    def test_encoder_refuses_oversize(self) -> None:
        err = self.assertRaises(OversizedMessageError, encode_frame, 1, 1, b"\0" * (MESSAGE_LENGTH_MAX + 1))
        self.assertEqual(str(err), "message length 4194305 exceed maximum message size of 4194304")
        self.assertEqual(len(encode_frame(1, 1, b"\0" * MESSAGE_LENGTH_MAX)), MESSAGE_LENGTH_MAX + 10)
        self.assertRaises(ValueError, encode_frame, 1 << 32, 1, b"")

    def test_oversized_body_is_skipped_not_buffered(self) -> None:
        dec = FrameDecoder()
        length = MESSAGE_LENGTH_MAX + 100
        out = dec.feed(HEADER.pack(length, 7, 1, 0) + b"\0" * 1000)
        self.assertEqual(out, [])
        self.assertEqual(len(dec._buffer), 0)  # nothing of the body is held
        out = dec.feed(b"\0" * (length - 1000) + encode_frame(9, 1, b"ok"))
        self.assertEqual(out, [OversizedFrame(7, 1, 0, length), Frame(9, 1, 0, b"ok")])
        self.assertEqual(out[0].message, f"message length {length} exceed maximum message size of 4194304")
        self.assertEqual(dec.buffered, 0)

    def test_max_uint32_length(self) -> None:
        dec = FrameDecoder()
        self.assertEqual(dec.feed(HEADER.pack(0xFFFFFFFF, 1, 1, 0)), [])
        self.assertEqual(dec.buffered, 0xFFFFFFFF)


frames = st.builds(
    Frame,
    stream_id=st.integers(0, 0xFFFFFFFF),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    data=st.binary(max_size=300),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


class DecoderProperties(SynchronousTestCase):
    @PROPERTY
    @given(st.lists(frames, max_size=20), st.lists(st.integers(0, 10_000), max_size=30))
    def test_any_split_decodes_identically(self, items: list[Frame], cuts: list[int]) -> None:
        wire = b"".join(encode_frame(f.stream_id, f.type, f.data, f.flags) for f in items)
        dec = FrameDecoder()
        out = [frame for piece in split(wire, cuts) for frame in dec.feed(piece)]
        self.assertEqual(out, items)
        self.assertEqual(dec.buffered, 0)

    @PROPERTY
    @given(
        st.lists(st.tuples(frames, st.booleans()), max_size=12),
        st.lists(st.integers(0, 10_000), max_size=30),
    )
    def test_oversized_frames_are_reported_in_order(self, items: list[tuple[Frame, bool]], cuts: list[int]) -> None:
        limit = 64
        expected: list[Frame | OversizedFrame] = []
        wire = b""
        for f, big in items:
            data = f.data + b"\0" * (limit + 1) if big else f.data[:limit]
            wire += encode_frame(f.stream_id, f.type, data, f.flags, max_length=None)
            if len(data) > limit:
                expected.append(OversizedFrame(f.stream_id, f.type, f.flags, len(data), limit))
            else:
                expected.append(Frame(f.stream_id, f.type, f.flags, data))
        dec = FrameDecoder(limit)
        out = [frame for piece in split(wire, cuts) for frame in dec.feed(piece)]
        self.assertEqual(out, expected)
        self.assertLessEqual(len(dec._buffer), limit + HEADER_LENGTH)

    @PROPERTY
    @given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=10))
    def test_garbage_never_crashes_decoder(self, garbage: bytes, cuts: list[int]) -> None:
        dec = FrameDecoder()
        whole = FrameDecoder().feed(garbage)
        out = [frame for piece in split(garbage, cuts) for frame in dec.feed(piece)]
        self.assertEqual(out, whole)


class ServerGarbageTests(SynchronousTestCase):
    """Whatever arrives, the server answers with well-formed Response frames or stays silent."""

    def serve(self, data: list[bytes]) -> tuple[StringTransport, list[Frame | OversizedFrame]]:
        clock = Clock()
        services, _ = task_services(clock)
        proto = TTRPCServerFactory(services, reactor=clock, require_peer=None).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        for chunk in data:
            proto.dataReceived(chunk)
        clock.advance(100)
        proto.connectionLost(None)
        return transport, FrameDecoder().feed(transport.value())

    @PROPERTY
    @given(st.lists(st.binary(max_size=200), max_size=10))
    def test_random_bytes(self, chunks: list[bytes]) -> None:
        transport, out = self.serve(chunks)
        for frame in out:
            self.assertIsInstance(frame, Frame)
            assert isinstance(frame, Frame)
            self.assertEqual((frame.type, frame.flags), (MessageType.RESPONSE, 0))
            request_pb2.Response.FromString(frame.data)

    @PROPERTY
    @given(st.lists(frames, max_size=15))
    def test_random_frames(self, items: list[Frame]) -> None:
        wire = [encode_frame(f.stream_id, f.type, f.data, f.flags) for f in items]
        transport, out = self.serve(wire)
        self.assertFalse(transport.disconnecting)
        answerable = [f for f in items if f.type in (MessageType.REQUEST, MessageType.DATA)]
        # every Request/Data frame is either answered once or (unknown types) ignored; nothing else
        self.assertLessEqual(len(out), len(answerable))
        for frame in out:
            assert isinstance(frame, Frame)
            self.assertEqual(frame.type, MessageType.RESPONSE)
            self.assertIn(frame.stream_id, {f.stream_id for f in answerable})
            resp = request_pb2.Response.FromString(frame.data)
            self.assertNotEqual(resp.status.code, grpc.StatusCode.OK.value[0])

    def test_oversize_in_garbage_keeps_connection(self) -> None:
        body = b"\xab" * (MESSAGE_LENGTH_MAX + 5)
        wire = HEADER.pack(len(body), 0x11, 0x99, 0x42) + body
        transport, out = self.serve([wire[i : i + 100_000] for i in range(0, len(wire), 100_000)])
        self.assertEqual(len(out), 1)
        assert isinstance(out[0], Frame)
        resp = request_pb2.Response.FromString(out[0].data)
        self.assertEqual((out[0].stream_id, resp.status.code), (0x11, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]))
        self.assertEqual(resp.status.message, "message length 4194309 exceed maximum message size of 4194304")
        self.assertFalse(transport.disconnecting)
