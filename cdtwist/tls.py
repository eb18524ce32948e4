# -*- test-case-name: tests.test_tls -*-
"""Mutual TLS for cdtwist's listeners and outgoing connections.

Twisted's own ``ssl:`` endpoint string never verifies client certificates
(twisted#6757), so cdtwist has its own prefix, ``cdtls``, that wraps *any*
other server endpoint string with TLS and, given ``ca=``, requires and
verifies a client certificate during the handshake (containerd's
``tcp_tls_ca`` -> ``RequireAndVerifyClientCert``)::

    cdtls:cert=<pem>:key=<pem>[:ca=<pem>][:alpn=<p1,p2>]:endpoint=<inner>

* ``cert``: PEM file, leaf certificate first, then any intermediates.
* ``key``: PEM private key (unencrypted) matching the leaf.
* ``ca``: PEM bundle of CAs trusted to sign client certificates; when it is
  absent the listener is server-authenticated TLS only.
* ``alpn``: comma-separated ALPN protocols, default ``h2`` (grpcio clients
  insist on it); empty disables ALPN.
* ``endpoint``: the inner server endpoint description (``tcp:8443``,
  ``unix:/run/x.sock``, ``systemd:...``), escaped the way Twisted escapes
  values: ``\\`` before ``\\``, ``:`` and ``=``.  Build strings with
  :func:`tls_server_description` rather than by hand.

TLS 1.2 is the minimum either way.  The files are read and checked when the
string is parsed, so a bad path fails ``listen`` with a message naming the
key, not a handshake later.

The same prefix as a *client* endpoint string (cdtwist dialling out, e.g.
a proxy plugin's ``address``) wraps any client endpoint with TLS whose
peer must present a certificate for ``hostname`` (checked by
service-identity), signed by ``ca`` (default: the platform's roots)::

    cdtls:endpoint=<inner client>[:hostname=<name>][:ca=<pem>][:cert=<pem>][:key=<pem>][:alpn=<p1,p2>]

``hostname`` defaults to the inner endpoint's host; ``cert``/``key``
present a client certificate.

Heavy imports (pyOpenSSL, cryptography) happen inside functions: the
twistd dropin imports this module whenever Twisted scans for plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import (
        IListeningPort,
        IOpenSSLClientConnectionCreator,
        IOpenSSLServerConnectionCreator,
        IProtocolFactory,
        IReactorTime,
    )

__all__ = [
    "PREFIX",
    "CDTLSClientParser",
    "CDTLSServerParser",
    "TLSConfigError",
    "TLSServerEndpoint",
    "escape_endpoint_value",
    "tls_client_options",
    "tls_server_description",
    "tls_server_options",
]

PREFIX = "cdtls"
DEFAULT_ALPN = ("h2",)
_REQUIRED = ("cert", "key", "endpoint")
_KEYS = frozenset(_REQUIRED + ("ca", "alpn"))
_GRAMMAR = f"{PREFIX}:cert=<pem>:key=<pem>[:ca=<pem>][:alpn=<p1,p2>]:endpoint=<escaped inner endpoint>"
_CLIENT_KEYS = frozenset(("endpoint", "hostname", "ca", "cert", "key", "alpn"))
_CLIENT_GRAMMAR = (
    f"{PREFIX}:endpoint=<escaped inner client endpoint>[:hostname=<name>][:ca=<pem>][:cert=<pem>][:key=<pem>]"
    "[:alpn=<p1,p2>]"
)


class TLSConfigError(ValueError):
    """A TLS setting that cannot work; the message names the key and file."""


def escape_endpoint_value(value: str) -> str:
    """Escape a value so Twisted's endpoint tokenizer hands it back unchanged."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def tls_server_description(
    inner: str,
    cert: str,
    key: str,
    ca: str | None,
    *,
    alpn: Sequence[str] | None = None,
) -> str:
    """The ``cdtls:`` string for *inner*, so nobody formats escapes by hand."""
    if not inner:
        raise TLSConfigError(f"{PREFIX}: endpoint= (the inner endpoint) is empty")
    parts = [PREFIX, "cert=" + escape_endpoint_value(cert), "key=" + escape_endpoint_value(key)]
    if ca:
        parts.append("ca=" + escape_endpoint_value(ca))
    if alpn is not None:
        parts.append("alpn=" + escape_endpoint_value(",".join(alpn)))
    parts.append("endpoint=" + escape_endpoint_value(inner))
    return ":".join(parts)


# -- loading ---------------------------------------------------------------


def _read(what: str, path: str) -> bytes:
    if not path:
        raise TLSConfigError(f"{PREFIX}: {what}= is empty")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{PREFIX}: {what}={path}: cannot read: {e.strerror or e}") from e


def _load_certificates(what: str, path: str) -> list[x509.Certificate]:
    from cryptography import x509

    data = _read(what, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{PREFIX}: {what}={path}: no PEM certificate found ({e})") from e
    if not certs:  # pragma: no cover - cryptography raises instead
        raise TLSConfigError(f"{PREFIX}: {what}={path}: no PEM certificate found")
    return certs


def _load_key(path: str) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read("key", path)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError as e:
        raise TLSConfigError(f"{PREFIX}: key={path}: encrypted private keys are not supported") from e
    except ValueError as e:
        raise TLSConfigError(f"{PREFIX}: key={path}: not a PEM private key ({e})") from e


def _check_pair(cert: x509.Certificate, key: PrivateKeyTypes, cert_path: str, key_path: str) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def spki(k: Any) -> bytes:
        return k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(cert.public_key()) != spki(key.public_key()):
        raise TLSConfigError(f"{PREFIX}: key={key_path} does not match the certificate in cert={cert_path}")


def _trust_root(ca: str) -> Any:
    from OpenSSL.crypto import X509
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    return trustRootFromCertificates([Certificate(X509.from_cryptography(c)) for c in _load_certificates("ca", ca)])


def _identity(cert: str, key: str) -> tuple[Any, Any, list[Any]]:
    """(PKey, leaf X509, intermediates) for pyOpenSSL, checked to belong together."""
    from OpenSSL.crypto import X509, PKey

    certs = _load_certificates("cert", cert)
    private = _load_key(key)
    _check_pair(certs[0], private, cert, key)
    return (
        PKey.from_cryptography_key(private),  # type: ignore[arg-type]
        X509.from_cryptography(certs[0]),
        [X509.from_cryptography(c) for c in certs[1:]],
    )


def tls_server_options(
    cert: str,
    key: str,
    ca: str | None = None,
    *,
    alpn: Sequence[str] = DEFAULT_ALPN,
) -> IOpenSSLServerConnectionCreator:
    """Server TLS settings; with *ca* a client certificate is required and verified.

    Blocking (reads files): fine on the reactor thread at start-up only.
    """
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    private, leaf, chain = _identity(cert, key)
    extra: dict[str, Any] = {}
    if ca:
        # trustRoot implies VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT.
        extra["trustRoot"] = _trust_root(ca)
    return CertificateOptions(
        privateKey=private,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=[p.encode("ascii") for p in alpn] or None,
        **extra,
    )


def tls_client_options(
    hostname: str,
    ca: str | None,
    cert: str | None = None,
    key: str | None = None,
    *,
    alpn: Sequence[str] = (),
) -> IOpenSSLClientConnectionCreator:
    """Client TLS for cdtwist dialling out (proxy plugins): the peer must match *hostname*.

    *hostname* is checked with service-identity (DNS name or IP address);
    *ca* ``None`` means the platform's trust store.  *cert*/*key* present a
    client certificate (key defaults to the cert file).  Blocking (reads
    files).
    """
    from twisted.internet.ssl import Certificate, KeyPair, PrivateCertificate, TLSVersion, optionsForClientTLS

    if key and not cert:
        raise TLSConfigError(f"{PREFIX}: client key={key} given without a certificate")
    extra: dict[str, Any] = {"raiseMinimumTo": TLSVersion.TLSv1_2}
    client = None
    if cert:
        private, leaf, chain = _identity(cert, key or cert)
        client = PrivateCertificate.fromCertificateAndKeyPair(Certificate(leaf), KeyPair(private))
        if chain:
            extra["extraCertChain"] = chain
    return optionsForClientTLS(
        hostname,
        trustRoot=_trust_root(ca) if ca else None,
        clientCertificate=client,
        acceptableProtocols=[p.encode("ascii") for p in alpn] or None,
        extraCertificateOptions=extra,
    )


# -- endpoint --------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """TLS in memory (TLSMemoryBIOFactory) over any inner server endpoint."""

    def __init__(
        self,
        inner: IStreamServerEndpoint,
        options: IOpenSSLServerConnectionCreator,
        clock: IReactorTime | None = None,
    ) -> None:
        self.inner = inner
        self.options = options
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self.inner.listen(TLSMemoryBIOFactory(self.options, False, protocolFactory, clock=self.clock))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class CDTLSServerParser:
    """The ``cdtls:`` prefix for :func:`twisted.internet.endpoints.serverFromString`."""

    prefix = PREFIX

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> TLSServerEndpoint:  # noqa: N802
        from twisted.internet.endpoints import serverFromString

        if args:
            raise TLSConfigError(
                f"{PREFIX}: unexpected positional argument {args[0]!r}; the grammar is {_GRAMMAR}"
                " (escape ':' and '=' inside endpoint= as '\\:' and '\\=')"
            )
        unknown = sorted(set(kwargs) - _KEYS)
        if unknown:
            raise TLSConfigError(f"{PREFIX}: unknown key {unknown[0]}=; the grammar is {_GRAMMAR}")
        for name in _REQUIRED:
            if not kwargs.get(name):
                raise TLSConfigError(f"{PREFIX}: missing {name}=; the grammar is {_GRAMMAR}")
        alpn_raw = kwargs.get("alpn")
        alpn = DEFAULT_ALPN if alpn_raw is None else tuple(p for p in alpn_raw.split(",") if p)
        options = tls_server_options(kwargs["cert"], kwargs["key"], kwargs.get("ca") or None, alpn=alpn)
        inner_description = kwargs["endpoint"]
        try:
            inner = serverFromString(reactor, inner_description)
        except (ValueError, TypeError) as e:
            # TypeError: Twisted's parsers report unknown/missing arguments that way.
            raise TLSConfigError(f"{PREFIX}: endpoint={inner_description!r}: {e!s}") from e
        return TLSServerEndpoint(inner, options, clock=reactor)


def tls_client_description(
    inner: str,
    *,
    hostname: str = "",
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> str:
    """The client ``cdtls:`` string for *inner*, escapes done right."""
    parts = [PREFIX, "endpoint=" + escape_endpoint_value(inner)]
    for name, value in (("hostname", hostname), ("ca", ca), ("cert", cert), ("key", key)):
        if value:
            parts.append(f"{name}={escape_endpoint_value(value)}")
    return ":".join(parts)


def _endpoint_host(endpoint: Any) -> str:
    """The host a Twisted TCP/hostname client endpoint dials, if it has one."""
    for attr in ("_hostText", "_hostStr", "_host"):
        value = getattr(endpoint, attr, None)
        if isinstance(value, bytes):
            value = value.decode("idna")
        if isinstance(value, str) and value:
            return value
    return ""


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class CDTLSClientParser:
    """The ``cdtls:`` prefix for :func:`twisted.internet.endpoints.clientFromString`."""

    prefix = PREFIX

    def parseStreamClient(self, reactor: Any, *args: str, **kwargs: str) -> IStreamClientEndpoint:  # noqa: N802
        from twisted.internet.endpoints import clientFromString, wrapClientTLS

        if args:
            raise TLSConfigError(
                f"{PREFIX}: unexpected positional argument {args[0]!r}; the grammar is {_CLIENT_GRAMMAR}"
            )
        unknown = sorted(set(kwargs) - _CLIENT_KEYS)
        if unknown:
            raise TLSConfigError(f"{PREFIX}: unknown key {unknown[0]}=; the grammar is {_CLIENT_GRAMMAR}")
        inner_description = kwargs.get("endpoint", "")
        if not inner_description:
            raise TLSConfigError(f"{PREFIX}: missing endpoint=; the grammar is {_CLIENT_GRAMMAR}")
        try:
            inner = clientFromString(reactor, inner_description)
        except (ValueError, TypeError) as e:
            raise TLSConfigError(f"{PREFIX}: endpoint={inner_description!r}: {e!s}") from e
        hostname = kwargs.get("hostname") or _endpoint_host(inner)
        if not hostname:
            raise TLSConfigError(f"{PREFIX}: hostname= is needed to verify the peer of {inner_description!r}")
        alpn_raw = kwargs.get("alpn")
        alpn = DEFAULT_ALPN if alpn_raw is None else tuple(p for p in alpn_raw.split(",") if p)
        options = tls_client_options(
            hostname, kwargs.get("ca") or None, kwargs.get("cert") or None, kwargs.get("key") or None, alpn=alpn
        )
        return wrapClientTLS(options, inner)


class CDTLSParser(CDTLSServerParser, CDTLSClientParser):
    """Both directions under one prefix (one dropin object, found by either lookup)."""


#: The dropin's instance (``twisted/plugins/cdtwist_tls_plugin.py``).
parser = CDTLSParser()
