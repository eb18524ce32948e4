# -*- test-case-name: tests.test_runtime_manager -*-
"""Reading containers from the metadata database, for the runtime and the tasks service.

containerd's runtime and tasks service read containers through
``metadata.NewContainerStore(db)``; here they go through
:mod:`cdtwist.metadata.containers` (``get(tx, namespace, id)``), imported on
first use.  Blocking: call from a pool thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cdtwist.metadata.db import DB


class ContainerGetter(Protocol):
    """What the runtime and the tasks service need of the container store."""

    def get(self, namespace: str, id: str) -> Any: ...


class ContainerStore:
    """``get(namespace, id)`` over the metadata database; NotFound as containerd words it."""

    def __init__(self, db: DB) -> None:
        self.db = db

    def get(self, namespace: str, id: str) -> Any:
        from cdtwist.metadata import containers

        return self.db.view(lambda tx: containers.get(tx, namespace, id))
