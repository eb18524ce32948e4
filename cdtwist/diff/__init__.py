"""Layer engines: apply a layer tar onto a directory, compare two directories into one.

Pure file-system work with no gRPC or metadata, for the diff service and the
snapshotters to build on:

* :mod:`.apply` — ``apply_layer(root, stream, overlay=..., parents=...)``
  (containerd's ``archive.Apply``, contained inside ``root`` whatever the tar
  says) and ``plan_apply(mounts)`` (which mode and directory containerd
  would pick for a snapshot's mounts);
* :mod:`.compare` — ``compare(lower, upper, out)`` (the walking differ) and
  ``write_diff``/``changes``;
* :mod:`.compression` — media types, ``decompress_stream``/``compress_stream``,
  ``UNCOMPRESSED_LABEL``;
* :mod:`.stream` — stream processors (``ProcessorRegistry.open(media_type, blob)``
  yields the uncompressed tar, running ``[stream_processors]`` binaries);
* :mod:`.tarstream` — the streaming tar reader and Go-compatible writer.

Typical apply, as the diff service does it::

    plan = plan_apply(mounts)                 # else mount, then apply natively
    with registry.open(desc.media_type, blob, payloads) as layer:
        result = apply_layer(plan.root, layer, overlay=plan.overlay,
                             userxattr=plan.userxattr, parents=plan.parents)
        layer.check()
    # result.digest is the diff id, result.size the uncompressed size
"""

from cdtwist.diff.apply import ApplyPlan, ApplyResult, InvalidArchive, apply_layer, plan_apply
from cdtwist.diff.compare import CompareResult, compare, write_diff
from cdtwist.diff.compression import UNCOMPRESSED_LABEL, decompress_stream
from cdtwist.diff.stream import ProcessorRegistry

__all__ = [
    "UNCOMPRESSED_LABEL",
    "ApplyPlan",
    "ApplyResult",
    "CompareResult",
    "InvalidArchive",
    "ProcessorRegistry",
    "apply_layer",
    "compare",
    "decompress_stream",
    "plan_apply",
    "write_diff",
]
