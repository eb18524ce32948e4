"""Test PKI and a tiny grpcio Version server for the TLS bridge tests.

Certificates are made with ``cryptography`` (EC P-256: fast), never the
openssl CLI, so the tests only need the binary for the s_client check.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import empty_pb2

from cdtwist.api.services.version.v1 import version_pb2, version_pb2_grpc

_ONE_DAY = datetime.timedelta(days=1)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, parent: Issued | None = None) -> Issued:
    """A root CA, or an intermediate signed by *parent*."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(parent.cert.subject if parent else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(parent.key if parent else key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    cn: str,
    *,
    server: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    expired: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        not_before, not_after = now - 10 * _ONE_DAY, now - _ONE_DAY
    else:
        not_before, not_after = now - _ONE_DAY, now + 30 * _ONE_DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def cert_pem(issued: Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.PEM)


def key_pem(issued: Issued, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@dataclass
class PKI:
    """Paths of every file the tests use, all under ``dir``."""

    dir: str
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str
    expired_cert: str
    expired_key: str
    encrypted_key: str
    #: server leaf signed by an intermediate, followed by the intermediate
    chain_cert: str
    chain_key: str

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


def make_pki(directory: str) -> PKI:
    def write(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    ca = make_ca("cdtwist test CA")
    other = make_ca("some other CA")
    server = issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1"))
    client = issue(ca, "cdtwist client", server=False)
    other_client = issue(other, "cdtwist client", server=False)
    expired = issue(ca, "cdtwist client", server=False, expired=True)
    intermediate = make_ca("cdtwist intermediate", parent=ca)
    chained = issue(intermediate, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    return PKI(
        dir=directory,
        ca=write("ca.pem", cert_pem(ca)),
        server_cert=write("server.pem", cert_pem(server)),
        server_key=write("server.key", key_pem(server)),
        client_cert=write("client.pem", cert_pem(client)),
        client_key=write("client.key", key_pem(client)),
        other_ca=write("other-ca.pem", cert_pem(other)),
        other_client_cert=write("other-client.pem", cert_pem(other_client)),
        other_client_key=write("other-client.key", key_pem(other_client)),
        expired_cert=write("expired.pem", cert_pem(expired)),
        expired_key=write("expired.key", key_pem(expired)),
        encrypted_key=write("encrypted.key", key_pem(server, b"secret")),
        chain_cert=write("chain.pem", cert_pem(chained) + cert_pem(intermediate)),
        chain_key=write("chain.key", key_pem(chained)),
    )


def short_tempdir(prefix: str = "cdtls") -> str:
    """Under /tmp: sun_path is only 108 bytes, trial's cwd can be deep."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class VersionServicer(version_pb2_grpc.VersionServicer):
    """Answers ``v``/``r``; ``payload_size`` pads ``version`` to test large frames."""

    payload_size = 0

    def Version(self, request: Any, context: grpc.ServicerContext) -> version_pb2.VersionResponse:  # noqa: N802
        version = "x" * self.payload_size if self.payload_size else "v"
        return version_pb2.VersionResponse(version=version, revision="r")


def start_unix_grpc(path: str, servicer: VersionServicer, workers: int = 8) -> grpc.Server:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    version_pb2_grpc.add_VersionServicer_to_server(servicer, server)
    if server.add_insecure_port("unix:" + path) == 0:
        raise OSError(f"grpc could not bind {path}")
    server.start()
    return server


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def tls_channel(
    target: str,
    ca: bytes,
    cert: bytes | None = None,
    key: bytes | None = None,
    *,
    override: str | None = None,
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = list(CHANNEL_OPTIONS)
    if override:
        options.append(("grpc.ssl_target_name_override", override))
    return grpc.secure_channel(target, creds, options=options)


def call_version(channel: grpc.Channel, timeout: float = 10.0) -> version_pb2.VersionResponse:
    return version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=timeout)
