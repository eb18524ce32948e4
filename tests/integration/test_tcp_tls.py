"""gRPC over TCP with TLS client certificates, terminated by Twisted and bridged to grpcio."""

from __future__ import annotations

import shutil
import subprocess

import grpc
from twisted.trial import unittest

from tests.integration.harness import CdtwistDaemon, free_tcp_port, manage, toml_str
from tests.support_tls import call_version, make_pki, short_tempdir, tls_channel


class TCPTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = short_tempdir("cdtt")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pki = make_pki(self.dir)
        self.port = free_tcp_port()

    def start(self) -> None:
        daemon = CdtwistDaemon(None)
        text = daemon.render_config().replace(
            "[grpc]\n",
            "[grpc]\n"
            f"  tcp_address = \"127.0.0.1:{self.port}\"\n"
            f"  tcp_tls_cert = {toml_str(self.pki.server_cert)}\n"
            f"  tcp_tls_key = {toml_str(self.pki.server_key)}\n"
            f"  tcp_tls_ca = {toml_str(self.pki.ca)}\n",
        )
        daemon.write_config(config_text=text)
        self.daemon = manage(self, daemon)
        # `ctr version` answers as soon as the UNIX socket serves; the TCP
        # listener comes up just after it, before the daemon reports booted.
        daemon.wait_for_log("successfully booted", timeout=15)

    def version(self, cert: str | None = None, key: str | None = None) -> object:
        pki = self.pki
        channel = tls_channel(
            f"127.0.0.1:{self.port}",
            pki.read(pki.ca),
            pki.read(cert) if cert else None,
            pki.read(key) if key else None,
            override="localhost",
        )
        with channel:
            try:
                return call_version(channel, timeout=5)
            except grpc.RpcError as e:
                return e

    def test_valid_client_certificate(self) -> None:
        self.start()
        response = self.version(self.pki.client_cert, self.pki.client_key)
        self.assertTrue(response.version.startswith("1.6.20+cdtwist"), response)

    def test_refused_without_or_with_bad_certificates(self) -> None:
        self.start()
        pki = self.pki
        for cert, key in [(None, None), (pki.other_client_cert, pki.other_client_key),
                          (pki.expired_cert, pki.expired_key)]:
            err = self.version(cert, key)
            self.assertIsInstance(err, grpc.RpcError, (cert, err))
            self.assertEqual(err.code(), grpc.StatusCode.UNAVAILABLE)
        # The UNIX socket still serves.
        self.assertEqual(self.daemon.ctr("version").rc, 0)

    def test_openssl_handshake_refused_without_certificate(self) -> None:
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl not installed")
        self.start()
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-CAfile", self.pki.ca,
             "-alpn", "h2", "-verify_return_error", "-ign_eof"],
            input=b"", capture_output=True, timeout=20,
        )
        text = (done.stdout + done.stderr).decode(errors="replace")
        self.assertIn("certificate required", text)
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-CAfile", self.pki.ca,
             "-cert", self.pki.client_cert, "-key", self.pki.client_key, "-alpn", "h2"],
            input=b"", capture_output=True, timeout=20,
        )
        self.assertIn("ALPN protocol: h2", done.stdout.decode(errors="replace"))
