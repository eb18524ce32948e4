# -*- test-case-name: tests.test_metadata -*-
"""``io.containerd.metadata.v1.bolt``: the metadata database as a plugin.

The id stays ``bolt`` so configs and ``ctr plugins ls`` read as on
containerd, though the file under the plugin root is sqlite (``meta.sqlite``,
never mistaken for a bolt file by a containerd pointed at the same root).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from cdtwist.errors import InvalidArgument
from cdtwist.metadata.db import DB
from cdtwist.plugin import CONTENT, METADATA, SNAPSHOTTER, Registration, register

if TYPE_CHECKING:
    from twisted.python.threadpool import ThreadPool

    from cdtwist.plugin.context import InitContext

DB_FILE = "meta.sqlite"


@dataclass
class BoltConfig:
    #: "shared": a blob in the store is visible to any namespace that proves
    #: it has it; "isolated": only to namespaces that wrote it.
    content_sharing_policy: str = "shared"


class MetadataPlugin:
    """Holds the open database for the plugins that require metadata."""

    def __init__(self, db: DB, config: BoltConfig, reactor: object, pool: ThreadPool) -> None:
        self.db = db
        self.config = config
        self._reactor = reactor
        self._pool = pool

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

    backends = ic.get_by_type(CONTENT)
    if backends:
        content_store_for(db, next(iter(backends.values())), config.content_sharing_policy == "shared")
    snapshotters_for(db, ic.get_by_type(SNAPSHOTTER))
    return MetadataPlugin(db, config, ic.reactor, ic.io_pool)


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
