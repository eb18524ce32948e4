# -*- test-case-name: tests.test_snapshots_suite -*-
"""What the metastore-backed engines (overlayfs, native) do the same way.

containerd's two engines repeat these methods word for word; here they
live once, and an engine supplies where a snapshot's data lives, how to
create one and how to mount one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cdtwist.mount import Mount
from cdtwist.snapshots import Kind, Snapshotter, Usage, wrap_error
from cdtwist.snapshots import fs as sfs
from cdtwist.snapshots.storage import DB_FILE, MetaStore, Snapshot


def open_root(root: str) -> MetaStore:
    """Create ``root`` (0700) and its ``snapshots`` dir; open the engine's metastore. Blocking."""
    os.makedirs(root, 0o700, exist_ok=True)
    store = MetaStore(os.path.join(root, DB_FILE))
    try:
        os.mkdir(os.path.join(root, "snapshots"), 0o700)
    except FileExistsError:
        pass
    return store


class StoredSnapshotter(Snapshotter):
    _ms: MetaStore
    #: Mounts' error prefix: Go's engines word it differently.
    mounts_error = "failed to get snapshot mount"

    def data_dir(self, sid: str) -> str:
        """The directory whose size is the snapshot's usage."""
        raise NotImplementedError

    def _create_snapshot(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        raise NotImplementedError

    def _mounts(self, s: Snapshot) -> list[Mount]:
        raise NotImplementedError

    def usage(self, key: str) -> Usage:
        """Stored at commit for committed snapshots; walked for active ones."""
        with self._ms.transaction(False) as t:
            sid, info, usage = t.get_info(key)
        if info.kind == Kind.ACTIVE:
            usage = sfs.disk_usage(self.data_dir(sid))
        return usage

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create_snapshot(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create_snapshot(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        with self._ms.transaction(False) as t:
            try:
                s = t.get_snapshot(key)
            except Exception as e:
                raise wrap_error(self.mounts_error, e) from e
        return self._mounts(s)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        with self._ms.transaction(True) as t:
            sid, _, _ = t.get_info(key)
            usage = sfs.disk_usage(self.data_dir(sid))
            try:
                t.commit_active(key, name, usage, labels)
            except Exception as e:
                raise wrap_error("failed to commit snapshot", e) from e
