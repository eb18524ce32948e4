"""The daemon's ttrpc socket: shims forward events there; strangers are refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from twisted.trial import unittest

from cdtwist import typeurl
from cdtwist.api.events import task_pb2
from cdtwist.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events
from cdtwist.api.ttrpc.request_pb2 import Request
from cdtwist.ttrpc.framing import MessageType, encode_frame
from tests.integration.harness import REPO_ROOT, BackgroundCtr, DaemonError, start_cdtwist

FORWARD = r"""
import sys, time
from twisted.internet import task
from cdtwist.ttrpc import connect_unix
from cdtwist.api.services.ttrpc.events.v1 import events_pb2 as ev
from google.protobuf import empty_pb2

async def main(reactor):
    client = await connect_unix(reactor, sys.argv[1])
    env = ev.Envelope.FromString(bytes.fromhex(sys.argv[2]))
    await client.call("containerd.services.events.ttrpc.v1.Events", "Forward",
                      ev.ForwardRequest(envelope=env), empty_pb2.Empty, timeout=5)
    client.close()

task.react(lambda r: __import__("twisted.internet.defer", fromlist=["x"]).ensureDeferred(main(r)))
"""


def envelope(topic: str, event: object) -> ttrpc_events.Envelope:
    env = ttrpc_events.Envelope(namespace="default", topic=topic, event=typeurl.marshal_any(event))
    env.timestamp.FromNanoseconds(1_700_000_000_123_456_789)
    return env


class TTRPCDaemonTests(unittest.TestCase):
    def forward(self, path: str, env: ttrpc_events.Envelope, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-c", FORWARD, path, env.SerializeToString().hex()],
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
            capture_output=True,
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )

    def test_forwarded_event_reaches_ctr_events(self) -> None:
        daemon = start_cdtwist(self)
        self.assertEqual(stat.S_IMODE(os.stat(daemon.ttrpc_address).st_mode), 0o660)
        events = BackgroundCtr(daemon.address, "events")
        self.addCleanup(events.stop)
        # ctr events only prints what arrives after it subscribed: wait for the stream.
        for attempt in range(50):
            daemon.ctr("ns", "create", f"warmup{attempt}").ok()
            try:
                events.wait_for(lambda lines: any("/namespaces/create" in x for x in lines), timeout=0.2)
                break
            except DaemonError:
                continue
        exit_event = task_pb2.TaskExit(container_id="c1", id="c1", pid=42, exit_status=3)
        done = self.forward(daemon.ttrpc_address, envelope("/tasks/exit", exit_event))
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        lines = events.wait_for(lambda lines: any("/tasks/exit" in x for x in lines))
        line = next(x for x in lines if "/tasks/exit" in x)
        self.assertIn("2023-11-14 22:13:20.123456789 +0000 UTC default /tasks/exit", line)
        self.assertIn('"container_id":"c1"', line)
        self.assertIn('"exit_status":3', line)

    def test_invalid_envelope_is_refused_with_containerd_message(self) -> None:
        daemon = start_cdtwist(self)
        env = envelope("no-slash", task_pb2.TaskExit(container_id="c1"))
        done = self.forward(daemon.ttrpc_address, env)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("must start with '/'", done.stderr.decode())

    def test_peer_from_another_uid_is_refused(self) -> None:
        daemon = start_cdtwist(self)
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('EACCES'); sys.exit(0)\n"
            "try:\n"
            "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    pass  # closed before we could even speak\n"
            "s.settimeout(10)\n"
            "data = b''\n"
            "while True:\n"
            "    try:\n"
            "        chunk = s.recv(4096)\n"
            "    except ConnectionResetError:\n"
            "        break\n"
            "    if not chunk: break\n"
            "    data += chunk\n"
            "print('CLOSED', len(data))\n"
        )
        request = Request(service="containerd.services.events.ttrpc.v1.Events", method="Forward")
        frame = encode_frame(1, MessageType.REQUEST, request.SerializeToString())

        def as_nobody() -> str:
            done = subprocess.run(
                # the system python: the test's own may live where nobody cannot read.
                ["/usr/bin/python3", "-c", probe, daemon.ttrpc_address, frame.hex()],
                user=65534, group=65534, extra_groups=[], capture_output=True, timeout=30,
            )
            self.assertEqual(done.returncode, 0, done.stderr.decode())
            return done.stdout.decode().strip()

        # The socket file (0660 root:root) keeps other users out ...
        self.assertEqual(as_nobody(), "EACCES")
        # ... and behind an opened-up mode, the peer credential check does.
        os.chmod(daemon.tmpdir, 0o711)
        os.chmod(daemon.ttrpc_address, 0o666)
        self.assertEqual(as_nobody(), "CLOSED 0")
        # The daemon still serves its own user.
        done = self.forward(daemon.ttrpc_address, envelope("/tasks/oom", task_pb2.TaskOOM(container_id="c")))
        self.assertEqual(done.returncode, 0, done.stderr.decode())
