# -*- test-case-name: tests.test_proxy -*-
"""The Content API over the local store alone, without namespaces.

containerd serves an external content store with the very same
``contentserver`` code over a store that ignores namespaces; here the
same :class:`~cdtwist.content.service.ContentServicer` runs over an
adapter that drops the namespace and lease arguments, and calls need no
namespace header.  Deletes publish no event (there is no exchange).
"""

from __future__ import annotations

import grpc

from cdtwist.content.local import Info, LocalStore, ReaderAt, Status, Writer
from cdtwist.content.service import ContentService, ContentServicer


class PlainContentStore:
    """:class:`LocalStore` with the namespaced store's signatures (namespace and lease ignored)."""

    def __init__(self, store: LocalStore) -> None:
        self.backend = store

    def info(self, namespace: str, digest: str) -> Info:
        return self.backend.info(digest)

    def update(self, namespace: str, info: Info, *fieldpaths: str) -> Info:
        return self.backend.update(info, *fieldpaths)

    def walk(self, namespace: str, *filter_exprs: str) -> list[Info]:
        out: list[Info] = []
        self.backend.walk(out.append, *filter_exprs)
        return out

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        self.backend.delete(digest)

    def open(self, namespace: str, digest: str) -> tuple[int, ReaderAt]:
        reader = self.backend.reader(digest)
        return reader.size, reader

    def status(self, namespace: str, ref: str) -> Status:
        return self.backend.status(ref)

    def list_statuses(self, namespace: str, *filter_exprs: str) -> list[Status]:
        return self.backend.list_statuses(*filter_exprs)

    def abort(self, namespace: str, ref: str, lease: str | None = None) -> None:
        self.backend.abort(ref)

    def writer(
        self, namespace: str, ref: str, total: int = 0, expected: str = "", lease: str | None = None
    ) -> PlainWriter:
        return PlainWriter(self.backend.writer(ref, total, expected))


class PlainWriter:
    """A local writer whose ``commit`` takes (and ignores) the lease argument."""

    def __init__(self, writer: Writer) -> None:
        self.w = writer
        self.status = writer.status
        self.digest = writer.digest
        self.write = writer.write
        self.truncate = writer.truncate
        self.close = writer.close

    def commit(
        self, size: int = 0, expected: str = "", labels: dict[str, str] | None = None, lease: str | None = None
    ) -> None:
        self.w.commit(size, expected, labels)


class PlainContentService(ContentService):
    def __init__(self, store: LocalStore) -> None:
        super().__init__(PlainContentStore(store), None)  # type: ignore[arg-type]

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        self.store.delete(namespace, digest, lease)


def _no_namespace(context: grpc.ServicerContext) -> str:
    return ""


class PlainContentServicer(ContentServicer):
    namespace_of = staticmethod(_no_namespace)

    def __init__(self, store: LocalStore) -> None:
        super().__init__(PlainContentService(store))

    def register_grpc(self, server: grpc.Server) -> None:
        from cdtwist.api.services.content.v1 import content_pb2_grpc as api_grpc

        api_grpc.add_ContentServicer_to_server(self, server)

    #: served on ``--tcp-address`` too: that is the point of serving it over TLS
    register_tcp = register_grpc
