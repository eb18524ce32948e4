"""twistd/endpoints dropin: the ``cdtls:`` server endpoint string (mutual TLS).

Tiny on purpose: the parser lives in :mod:`cdtwist.tls`, which defers its
pyOpenSSL imports until a ``cdtls:`` string is actually parsed.
"""

from cdtwist.tls import parser as cdtls

__all__ = ["cdtls"]
