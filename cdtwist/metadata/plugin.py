# -*- test-case-name: tests.test_metadata -*-
"""``io.containerd.metadata.v1.bolt``: the metadata database as a plugin.

The id stays ``bolt`` so configs and ``ctr plugins ls`` read as on
containerd, though the file under the plugin root is sqlite (``meta.sqlite``,
never mistaken for a bolt file by a containerd pointed at the same root).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.errors import InvalidArgument, NotFound
from cdtwist.log import get_logger
from cdtwist.metadata.db import DB
from cdtwist.plugin import CONTENT, METADATA, SNAPSHOTTER, Registration, register

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from cdtwist.metadata.content import NamespacedContentStore
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

DB_FILE = "meta.sqlite"
#: the built-in local content store's plugin id
LOCAL_CONTENT_ID = "content"


@dataclass
class BoltConfig:
    #: "shared": a blob in the store is visible to any namespace that proves
    #: it has it; "isolated": only to namespaces that wrote it.
    content_sharing_policy: str = "shared"


class MetadataPlugin:
    """Holds the open database for the plugins that require metadata.

    ``content`` is the namespaced content store over the one content
    backend the database was opened with; every user shares it.
    """

    def __init__(
        self,
        db: DB,
        config: BoltConfig,
        reactor: object,
        pool: ThreadPool,
        content: NamespacedContentStore | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.content = content
        self._reactor = reactor
        self._pool = pool

    def content_store(self) -> NamespacedContentStore:
        if self.content is None:
            raise NotFound("no plugins registered for " + CONTENT)
        return self.content

    def stop(self) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self.db.close)  # type: ignore[arg-type]


async def _init(ic: InitContext) -> MetadataPlugin:
    config: BoltConfig = ic.config
    if config.content_sharing_policy not in ("shared", "isolated"):
        raise InvalidArgument(f"unknown policy: {config.content_sharing_policy}")
    db = DB(os.path.join(ic.root, DB_FILE))
    ic.meta.exports["path"] = db.path
    ic.meta.exports["policy"] = config.content_sharing_policy
    await deferToThreadPool(ic.reactor, ic.io_pool, db.open)  # type: ignore[arg-type]
    # Like containerd's metadata.NewDB(bolt, content, snapshotters): wrap the
    # backends here, so the GC sweeps them even when no service uses them.
    from cdtwist.metadata.content import content_store_for
    from cdtwist.metadata.snapshots import snapshotters_for

    backend = content_backend(ic.get_by_type(CONTENT))
    content = None
    if backend is not None:
        content = content_store_for(db, backend, config.content_sharing_policy == "shared")
    snapshotters_for(db, ic.get_by_type(SNAPSHOTTER))
    return MetadataPlugin(db, config, ic.reactor, ic.io_pool, content)


def content_backend(backends: Mapping[str, Any]) -> Any:
    """The content store the database wraps: a proxy one when configured, else the local one.

    containerd takes whichever its plugin map yields first; cdtwist decides:
    configuring a ``[proxy_plugins]`` content store means using it.
    """
    if not backends:
        return None
    chosen = next((name for name in backends if name != LOCAL_CONTENT_ID), LOCAL_CONTENT_ID)
    others = sorted(name for name in backends if name != chosen)
    if others:
        log.warn("content stores not used by the metadata database", used=chosen, unused=",".join(others))
    return backends[chosen]


def _init_deferred(ic: InitContext) -> Deferred[MetadataPlugin]:
    return Deferred.fromCoroutine(_init(ic))


register(
    Registration(
        type=METADATA,
        id="bolt",
        requires=(CONTENT, SNAPSHOTTER),
        config=BoltConfig,
        init=_init_deferred,
    )
)
