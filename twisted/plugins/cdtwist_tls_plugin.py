"""twistd/endpoints dropin: the ``cdtls:`` endpoint strings (mutual TLS), server and client.

Tiny on purpose: the parser lives in :mod:`cdtwist.tls`, which defers its
pyOpenSSL imports until a ``cdtls:`` string is actually parsed.  One object
provides both parser interfaces, so ``serverFromString`` and
``clientFromString`` each find it.
"""

from cdtwist.tls import parser as cdtls

__all__ = ["cdtls"]
