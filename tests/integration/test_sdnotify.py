"""systemd readiness: READY=1 once serving, STOPPING=1 when asked to stop."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.trial import unittest

from tests.integration.harness import CdtwistDaemon, manage


class NotifyingDaemon(CdtwistDaemon):
    def __init__(self, notify_socket: str, **kwargs: Any) -> None:
        self.notify_socket = notify_socket
        super().__init__(None, **kwargs)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["NOTIFY_SOCKET"] = self.notify_socket
        return env


class SDNotifyTests(unittest.TestCase):
    def test_ready_then_stopping(self) -> None:
        CdtwistDaemon.check_requirements()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        daemon = NotifyingDaemon("")
        path = os.path.join(daemon.tmpdir, "notify.sock")
        daemon.notify_socket = path
        listener.bind(path)
        listener.settimeout(15)
        manage(self, daemon)
        ready = listener.recv(4096).decode()
        self.assertEqual(ready, "READY=1")
        # Serving by the time READY=1 is sent.
        self.assertEqual(daemon.ctr("version").rc, 0)
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(listener.recv(4096).decode(), "STOPPING=1")
        self.assertEqual(daemon.wait_exit(), 0)
