# -*- test-case-name: tests.test_diff_service -*-
"""``io.containerd.differ.v1.walking``: containerd's walking differ and file-system applier.

:meth:`WalkingDiffer.apply` is ``apply.fsApplier.Apply``: the layer blob is
read from the namespaced content store, turned into a plain tar by the
stream processors (decompression, ``[stream_processors]`` binaries), and
applied onto the target mounts — straight onto the upper directory with
overlay whiteouts when the target is one overlay mount, else onto a
temporary mount of it under ``<root>/tmpmounts`` with plain deletions.
The result is the tar's digest and size (the layer's diff id).

:meth:`WalkingDiffer.compare` is ``walking.walkingDiff.Compare``: lower and
upper mounted (upper read-only), the changes written as a ``tar`` or
``tar+gzip`` layer into the content store under a ref, committed with the
``containerd.io/uncompressed`` label.

Both block (mounts, disk, database): call them from a pool thread.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdtwist.content.local import ReaderAt
from cdtwist.diff.apply import ApplyResult, apply_layer, plan_apply
from cdtwist.diff.compare import compare as write_layer
from cdtwist.diff.compression import MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_GZIP, UNCOMPRESSED_LABEL
from cdtwist.diff.stream import LayerStream, ProcessorRegistry
from cdtwist.errors import AlreadyExists, CdtwistError, FailedPrecondition, InvalidArgument, NotImplemented_
from cdtwist.grpc.context import validate_identifier
from cdtwist.log import get_logger
from cdtwist.metadata.content import NamespacedContentStore, NamespacedWriter
from cdtwist.metadata.plugin import MetadataPlugin
from cdtwist.mount import Mount, with_readonly_temp_mount, with_temp_mount
from cdtwist.plugin import DIFFER, METADATA, Registration, register
from cdtwist.snapshots import default_platform, wrap_error

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext

log = get_logger(__name__)

_READ_CHUNK = 1 << 20


@dataclass
class Descriptor:
    """The OCI descriptor fields the diff API carries."""

    media_type: str = ""
    digest: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


def unique_ref() -> str:
    """``uniqueRef``: the time in nanoseconds and 3 random bytes in URL base64."""
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def namespace_required(namespace: str) -> str:
    """``namespaces.NamespaceRequired`` where the content store checks it, with its errors."""
    if not namespace:
        raise FailedPrecondition("namespace is required")
    try:
        validate_identifier(namespace)
    except InvalidArgument as e:
        raise InvalidArgument(f"namespace validation: {e.context}") from None
    return namespace


class _BlobReader:
    """``content.NewReader``: a blob read from start to end, in order."""

    def __init__(self, ra: ReaderAt) -> None:
        self._ra = ra
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _READ_CHUNK
        data = self._ra.read_at(self._offset, min(n, max(self._ra.size - self._offset, 0)))
        self._offset += len(data)
        return data


class WalkingDiffer:
    """The walking differ plugin's instance: a ``diff.Comparer`` and a ``diff.Applier``."""

    def __init__(self, store: NamespacedContentStore, processors: ProcessorRegistry | None = None) -> None:
        self.store = store
        self.processors = processors if processors is not None else ProcessorRegistry()

    # -- Applier --------------------------------------------------------------

    def apply(
        self,
        namespace: str,
        desc: Descriptor,
        mounts: Sequence[Mount],
        payloads: Mapping[str, Any] | None = None,
        expected_diff_id: str | None = None,
    ) -> Descriptor:
        """Apply the blob ``desc`` onto ``mounts``; the applied tar's descriptor.

        ``expected_diff_id`` is for callers inside the daemon that know the
        layer's diff id (an unpacker): a different digest fails as
        containerd's unpacker fails.  The gRPC API carries none.
        """
        t0 = time.monotonic()
        try:
            ra = self.store.reader(namespace_required(namespace), desc.digest)
        except Exception as e:
            raise wrap_error("failed to get reader from content store", e) from e
        try:
            stream = self.processors.open(desc.media_type, _BlobReader(ra), payloads)
            try:
                result = _apply(mounts, stream)
                stream.check()
            finally:
                stream.close()
        finally:
            ra.close()
        log.debug(
            "diff applied",
            d=f"{time.monotonic() - t0:.6f}s",
            digest=desc.digest,
            size=desc.size,
            media=desc.media_type,
        )
        if expected_diff_id is not None and result.digest != expected_diff_id:
            raise CdtwistError(f'wrong diff id calculated on extraction "{expected_diff_id}"')
        return Descriptor(media_type=MEDIA_TYPE_IMAGE_LAYER, digest=result.digest, size=result.size)

    # -- Comparer -------------------------------------------------------------

    def compare(
        self,
        namespace: str,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        media_type: str = "",
        ref: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> Descriptor:
        """The layer from ``lower`` to ``upper``, written to the content store (``tar+gzip`` by default)."""
        media_type = media_type or MEDIA_TYPE_IMAGE_LAYER_GZIP
        if media_type not in (MEDIA_TYPE_IMAGE_LAYER, MEDIA_TYPE_IMAGE_LAYER_GZIP):
            raise NotImplemented_(f"unsupported diff media type: {media_type}")
        config_labels = dict(labels) if labels is not None else None

        def with_lower(lower_root: str) -> Descriptor:
            return with_readonly_temp_mount(
                upper,
                lambda upper_root: self._write(
                    namespace, lower_root, upper_root, media_type, ref, config_labels, lease
                ),
            )

        return with_temp_mount(lower, with_lower)

    def _write(
        self,
        namespace: str,
        lower_root: str,
        upper_root: str,
        media_type: str,
        ref: str,
        labels: dict[str, str] | None,
        lease: str | None,
    ) -> Descriptor:
        new_reference = ref == ""
        if new_reference:
            ref = unique_ref()
        try:
            writer = self.store.writer(namespace_required(namespace), ref, lease=lease)
        except Exception as e:
            raise wrap_error("failed to open writer", e) from e
        open_error = True
        try:
            if not new_reference:
                writer.truncate(0)
            written = write_layer(lower_root, upper_root, writer, media_type=media_type, labels=labels)
            if media_type == MEDIA_TYPE_IMAGE_LAYER_GZIP:
                labels = dict(labels or {})
                labels[UNCOMPRESSED_LABEL] = written.uncompressed_digest
            try:
                writer.commit(0, written.digest, labels, lease)
            except AlreadyExists:
                pass
            except Exception as e:
                raise wrap_error("failed to commit", e) from e
            open_error = False
        finally:
            if open_error:
                self._discard(writer, namespace, ref, lease, new_reference)
        return self._finish(namespace, written.digest, media_type, labels)

    def _discard(self, writer: NamespacedWriter, namespace: str, ref: str, lease: str | None, abort: bool) -> None:
        try:
            writer.close()
        except Exception as e:
            log.warn("failed to close diff writer", ref=ref, error=str(e))
        if abort:
            try:
                self.store.abort(namespace, ref, lease)
            except Exception as e:
                log.warn("failed to delete diff upload", ref=ref, error=str(e))

    def _finish(self, namespace: str, digest: str, media_type: str, labels: dict[str, str] | None) -> Descriptor:
        try:
            info = self.store.info(namespace, digest)
        except Exception as e:
            raise wrap_error("failed to get info from content store", e) from e
        if UNCOMPRESSED_LABEL not in info.labels:
            # The blob existed without the label: set it (an empty value only clears it).
            info.labels[UNCOMPRESSED_LABEL] = (labels or {}).get(UNCOMPRESSED_LABEL, "")
            try:
                self.store.update(namespace, info, "labels." + UNCOMPRESSED_LABEL)
            except Exception as e:
                raise wrap_error("error setting uncompressed label", e) from e
        return Descriptor(media_type=media_type, digest=info.digest, size=info.size)


def _apply(mounts: Sequence[Mount], stream: LayerStream) -> ApplyResult:
    """``apply`` of ``diff/apply/apply_linux.go``: onto an overlay upperdir directly, else via a temp mount."""
    plan = plan_apply(mounts)
    if plan.root is not None:
        return apply_layer(plan.root, stream, overlay=True, userxattr=plan.userxattr, parents=plan.parents)
    return with_temp_mount(mounts, lambda root: apply_layer(root, stream))


# -- plugin ---------------------------------------------------------------------------


def processor_registry(stream_processors: Mapping[str, object] | None) -> ProcessorRegistry:
    """The built-in decompression handler plus the daemon's ``[stream_processors]``."""
    registry = ProcessorRegistry()
    registry.register_config(stream_processors or {})
    return registry


def _init(ic: InitContext) -> WalkingDiffer:
    metadata: MetadataPlugin = ic.get(METADATA)
    ic.meta.platforms.append(default_platform())
    store = metadata.content_store()
    processors = processor_registry(getattr(ic.daemon_config, "stream_processors", None))
    return WalkingDiffer(store, processors)


registration = register(Registration(type=DIFFER, id="walking", requires=(METADATA,), init=_init))

__all__ = ["Descriptor", "WalkingDiffer", "processor_registry", "unique_ref"]
