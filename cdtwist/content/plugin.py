# -*- test-case-name: tests.test_content_service -*-
"""``io.containerd.content.v1.content``: the local blob store under its plugin root."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.content.local import LocalStore
from cdtwist.plugin import CONTENT, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext


def _init(ic: InitContext) -> Deferred[LocalStore]:
    ic.meta.exports["root"] = ic.root
    # The store creates its directories: disk work, off the reactor.
    return deferToThreadPool(ic.reactor, ic.io_pool, LocalStore, ic.root)  # type: ignore[arg-type]


register(Registration(type=CONTENT, id="content", init=_init))
