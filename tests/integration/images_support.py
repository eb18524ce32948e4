"""Test images built in Python from ``busybox-static``: layers, OCI layouts, docker archives, expected trees.

Also :class:`CtrCase`, the base of the tests that run one ``ctr`` scenario
on cdtwist and on containerd and compare what they did.

No docker involved: a :class:`Layer` is a list of :class:`Entry` (files,
dirs, symlinks, hard links, devices, whiteouts) written as a tar, optionally
gzip or zstd compressed; an :class:`Image` is layers plus a config whose
``diff_ids`` are the uncompressed digests; :func:`write_oci_layout` and
:func:`write_docker_archive` put images in the tars ``ctr images import``
reads.  :func:`expected_tree` applies the layers the OCI way (whiteouts,
opaque dirs) to a model and :func:`scan_tree` reads a mounted rootfs into
the same shape, so a test compares them with one ``assertEqual``.

Blobs live as files in a cache dir under /tmp keyed by their recipe: the
100 MiB layer (seeded random data) is generated once and reused.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import grpc
from twisted.trial import unittest

from cdtwist.api.services.snapshots.v1 import snapshots_pb2 as sapi
from cdtwist.api.services.snapshots.v1 import snapshots_pb2_grpc as sapi_grpc
from tests.integration.harness import (
    CdtwistDaemon,
    ContainerdDaemon,
    DaemonProcess,
    Result,
    SharedDaemon,
    require_binaries,
)
from tests.integration.test_content_ctr import normalise as _normalise
from tests.integration.test_content_ctr import run_ctr, unique

MIB = 1 << 20
BUSYBOX = "/bin/busybox"
#: where built blobs and layouts are kept between tests (and runs)
CACHE_DIR = os.environ.get("CDTWIST_TEST_IMAGE_CACHE", "/tmp/cdtwist-test-images")
#: a fixed mtime for every entry, so trees compare exactly
MTIME = 1_600_000_000

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)

try:
    import zstandard
except ImportError:  # pragma: no cover - the CI requirements install it
    zstandard = None

HAVE_ZSTD = zstandard is not None

#: busybox applets linked in the base layer (the tests run some through chroot)
APPLETS = ("sh", "ls", "cat", "echo", "id", "true", "false", "stat", "readlink", "test", "wc", "head", "sha256sum")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- layer entries --------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member.  ``kind``: file, dir, symlink, hardlink, char, block, fifo."""

    path: str
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    #: file contents from a host path instead of ``data`` (busybox, the big blob)
    source: str | None = None
    #: symlink target, or the hard link's target path (relative to the root)
    target: str = ""
    mtime: int = MTIME
    xattrs: tuple[tuple[str, str], ...] = ()
    device: tuple[int, int] = (0, 0)
    #: a raw tar header name (hostile layers): written as is, never normalised
    raw_name: str | None = None
    #: header size claimed, when it should differ from the data written (hostile layers)
    claimed_size: int | None = None

    @property
    def size(self) -> int:
        if self.kind != "file":
            return 0
        return os.path.getsize(self.source) if self.source else len(self.data)

    def open(self) -> BinaryIO:
        return open(self.source, "rb") if self.source else io.BytesIO(self.data)

    def tarinfo(self) -> tarfile.TarInfo:
        name = self.raw_name if self.raw_name is not None else self.path
        info = tarfile.TarInfo(name)
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        if self.kind == "file":
            info.type = tarfile.REGTYPE
            info.size = self.size
        elif self.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif self.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = self.target
        elif self.kind == "hardlink":
            info.type = tarfile.LNKTYPE
            info.linkname = self.target
        elif self.kind in ("char", "block"):
            info.type = tarfile.CHRTYPE if self.kind == "char" else tarfile.BLKTYPE
            info.devmajor, info.devminor = self.device
        elif self.kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            raise ValueError(f"unknown entry kind {self.kind!r}")
        if self.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs}
        return info


def file(path: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(path, "file", mode, data=data.encode() if isinstance(data, str) else data, **kw)


def directory(path: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(path, "dir", mode, **kw)


def symlink(path: str, target: str, **kw: Any) -> Entry:
    return Entry(path, "symlink", 0o777, target=target, **kw)


def hardlink(path: str, target: str, **kw: Any) -> Entry:
    return Entry(path, "hardlink", 0o644, target=target, **kw)


def whiteout(path: str) -> Entry:
    """The OCI whiteout deleting ``path`` from the layers below."""
    parent, base = os.path.split(path)
    return Entry(os.path.join(parent, ".wh." + base), "file", 0o644)


def opaque(dirpath: str) -> Entry:
    """The OCI marker hiding everything the layers below have in ``dirpath``."""
    return Entry(os.path.join(dirpath, ".wh..wh..opq"), "file", 0o644)


def with_parents(entries: Iterable[Entry], mode: int = 0o755) -> list[Entry]:
    """``entries`` with a dir entry (``mode``, root-owned) before any entry whose parent has none."""
    out: list[Entry] = []
    seen: set[str] = set()
    listed = {e.path for e in entries if e.kind == "dir"}
    for e in entries:
        parts = e.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in seen and parent not in listed:
                out.append(directory(parent, mode))
                seen.add(parent)
        seen.add(e.path)
        out.append(e)
    return out


# --- layers -----------------------------------------------------------------------


def _media_type(compression: str) -> str:
    return OCI_LAYER + {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]


@dataclass
class Blob:
    """A blob on disk and its descriptor fields."""

    path: str
    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


@dataclass
class Layer:
    """Entries written as one (compressed) tar; ``raw_tail`` and ``truncate`` make broken streams."""

    name: str
    entries: list[Entry]
    compression: str = "gzip"
    #: cut the finished (compressed) blob to this many bytes
    truncate: int | None = None
    #: leave out the tar's end-of-archive blocks
    no_eof: bool = False
    #: where the blob is written (default: the cache, for layers that are the same every run)
    directory: str = ""
    _built: tuple[Blob, str] | None = field(default=None, init=False, repr=False)

    @property
    def media_type(self) -> str:
        return _media_type(self.compression)

    def recipe(self) -> str:
        """A key for the cache: everything the bytes depend on (sources by path, size and mtime)."""
        h = hashlib.sha256()
        h.update(repr((self.compression, self.truncate, self.no_eof)).encode())
        for e in self.entries:
            h.update(repr(e.__class__.__name__).encode())
            h.update(repr({k: v for k, v in e.__dict__.items() if k != "data"}).encode())
            h.update(hashlib.sha256(e.data).digest())
            if e.source:
                st = os.stat(e.source)
                h.update(repr((st.st_size, st.st_mtime_ns)).encode())
        return h.hexdigest()[:24]

    def build(self) -> tuple[Blob, str]:
        """(the blob as stored, the diff id): built once, cached under :data:`CACHE_DIR`."""
        if self._built is None:
            self._built = _cached_layer(self)
        return self._built

    @property
    def blob(self) -> Blob:
        return self.build()[0]

    @property
    def diff_id(self) -> str:
        return self.build()[1]

    def write_tar(self, out: BinaryIO) -> None:
        """The uncompressed tar stream of the entries."""
        tar = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)
        try:
            for e in self.entries:
                info = e.tarinfo()
                if e.kind == "file":
                    with e.open() as src:
                        if e.claimed_size is not None:
                            info.size = e.claimed_size
                            tar.addfile(info)  # header only: the data is short on purpose
                            shutil.copyfileobj(src, out)
                        else:
                            tar.addfile(info, src)
                else:
                    tar.addfile(info)
        finally:
            if not self.no_eof:  # else leave out the end-of-archive blocks: the stream just stops
                tar.close()


class _Tee(io.RawIOBase):
    """A write-only file that hashes what passes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.out.write(data)
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset


def _cached_layer(layer: Layer) -> tuple[Blob, str]:
    directory = layer.directory or CACHE_DIR
    os.makedirs(directory, exist_ok=True)
    key = f"{layer.name}-{layer.recipe()}"
    meta_path = os.path.join(directory, key + ".json")
    blob_path = os.path.join(directory, key + ".blob")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if os.path.getsize(blob_path) == meta["size"]:
            return Blob(blob_path, meta["digest"], meta["size"], layer.media_type), meta["diff_id"]
    except (OSError, ValueError, KeyError):
        pass
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-")
    with os.fdopen(fd, "wb") as raw:
        blob_out = _Tee(raw)  # type: ignore[arg-type]
        if layer.compression == "none":
            tee = blob_out
            layer.write_tar(tee)  # type: ignore[arg-type]
        elif layer.compression == "gzip":
            with gzip.GzipFile(fileobj=blob_out, mode="wb", mtime=0, compresslevel=6) as gz:  # type: ignore[arg-type]
                tee = _Tee(gz)  # type: ignore[arg-type]
                layer.write_tar(tee)  # type: ignore[arg-type]
        elif layer.compression == "zstd":
            assert zstandard is not None, "zstandard is not installed"
            with zstandard.ZstdCompressor(level=3).stream_writer(blob_out, closefd=False) as zw:  # type: ignore[arg-type]
                tee = _Tee(zw)  # type: ignore[arg-type]
                layer.write_tar(tee)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown compression {layer.compression!r}")
        diff_id = "sha256:" + tee.hash.hexdigest()
    if layer.truncate is not None:
        with open(tmp, "r+b") as f:
            f.truncate(layer.truncate)
    size = os.path.getsize(tmp)
    digest = file_sha256(tmp)
    if layer.compression == "none":
        diff_id = digest
    os.replace(tmp, blob_path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump({"digest": digest, "size": size, "diff_id": diff_id}, f)
    os.replace(meta_path + ".tmp", meta_path)
    return Blob(blob_path, digest, size, layer.media_type), diff_id


def _json_blob(obj: Any, media_type: str, directory: str = "") -> Blob:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = sha256_digest(data)
    directory = directory or CACHE_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, digest[7:] + ".json")
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return Blob(path, digest, len(data), media_type)


# --- images ---------------------------------------------------------------------------


@dataclass
class Image:
    """Layers, a config naming their diff ids, and an OCI (or docker) manifest."""

    layers: list[Layer]
    env: tuple[str, ...] = ("PATH=/bin",)
    cmd: tuple[str, ...] = ("/bin/sh",)
    labels: dict[str, str] = field(default_factory=dict)
    docker_media_types: bool = False
    #: diff ids to write instead of the real ones (hostile and broken images)
    diff_ids: list[str] | None = None
    #: where config and manifest are written (default: the cache)
    directory: str = ""

    @property
    def config(self) -> Blob:
        cfg = {
            "architecture": ARCH,
            "os": "linux",
            "config": {"Env": list(self.env), "Cmd": list(self.cmd), "Labels": self.labels or None},
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids or [layer.diff_id for layer in self.layers]},
            "history": [{"created_by": f"cdtwist test layer {layer.name}"} for layer in self.layers],
        }
        media_type = "application/vnd.docker.container.image.v1+json" if self.docker_media_types else OCI_CONFIG
        return _json_blob(cfg, media_type, self.directory)

    @property
    def manifest(self) -> Blob:
        layers = []
        for layer in self.layers:
            desc = layer.blob.descriptor()
            if self.docker_media_types:
                desc["mediaType"] = {
                    "none": "application/vnd.docker.image.rootfs.diff.tar",
                    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                }[layer.compression]
            layers.append(desc)
        m = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if self.docker_media_types else OCI_MANIFEST,
            "config": self.config.descriptor(),
            "layers": layers,
        }
        return _json_blob(m, DOCKER_MANIFEST if self.docker_media_types else OCI_MANIFEST, self.directory)

    @property
    def blobs(self) -> list[Blob]:
        return [self.manifest, self.config] + [layer.blob for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        """The snapshot names of the unpacked layers, bottom to top (OCI chain ids)."""
        out: list[str] = []
        for diff_id in self.diff_ids or [layer.diff_id for layer in self.layers]:
            out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
        return out

    @property
    def chain_id(self) -> str:
        return self.chain_ids[-1]

    def expected_tree(self) -> dict[str, tuple[Any, ...]]:
        return expected_tree(self.layers)


def _add_file(tar: tarfile.TarFile, name: str, path: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = os.path.getsize(path)
    info.mode = 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_oci_layout(
    path: str, images: Iterable[tuple[Image, Iterable[str]]], *, containerd_names: bool = False
) -> str:
    """An OCI layout tar: one index entry per (image, name), named by ``org.opencontainers.image.ref.name``.

    ``containerd_names`` adds ``io.containerd.image.name`` too (what ``ctr images export`` writes).
    """
    manifests = []
    blobs: dict[str, Blob] = {}
    for image, names in images:
        for blob in image.blobs:
            blobs[blob.digest] = blob
        for name in names:
            annotations = {REF_NAME: name}
            if containerd_names:
                annotations[CONTAINERD_NAME] = name
            manifests.append(image.manifest.descriptor(annotations=annotations))
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tar, "index.json", index)
        for digest, blob in sorted(blobs.items()):
            _add_file(tar, f"blobs/sha256/{digest[7:]}", blob.path)
    return path


def write_docker_archive(path: str, image: Image, repo_tags: Iterable[str]) -> str:
    """A ``docker save`` style tar: manifest.json, the config and ``<diff id>/layer.tar`` files."""
    config = image.config
    layer_names = [f"{layer.diff_id[7:]}/layer.tar" for layer in image.layers]
    manifest = [{"Config": config.digest[7:] + ".json", "RepoTags": list(repo_tags), "Layers": layer_names}]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        _add_file(tar, config.digest[7:] + ".json", config.path)
        for name, layer in zip(layer_names, image.layers, strict=True):
            _add_file(tar, name, layer.blob.path)
    return path


def cached_layout(name: str, images: Iterable[tuple[Image, Iterable[str]]]) -> str:
    """:func:`write_oci_layout` into the cache, written once per distinct content."""
    images = [(image, list(names)) for image, names in images]
    key = hashlib.sha256(repr([(i.manifest.digest, n) for i, n in images]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE_DIR, f"{name}-{key}.oci.tar")
    if not os.path.exists(path):
        write_oci_layout(path + ".tmp", images)
        os.replace(path + ".tmp", path)
    return path


# --- the test images ------------------------------------------------------------------


def base_layer() -> Layer:
    """busybox with its applet links, /etc, and what the next layers delete, hide or link."""
    entries = [
        directory("bin"),
        file("bin/busybox", mode=0o755, source=BUSYBOX),
        *[symlink(f"bin/{applet}", "busybox") for applet in APPLETS],
        directory("etc"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        file("etc/group", "root:x:0:\nuser:x:1000:\n"),
        file("etc/motd", "base\n"),
        file("etc/shadow", "root:*:19000::::::\n", mode=0o600, gid=42),
        directory("home"),
        directory("home/user", mode=0o750, uid=1000, gid=1000),
        file("home/user/.profile", "export PS1=x\n", uid=1000, gid=1000, mode=0o640),
        directory("root", mode=0o700),
        directory("tmp", mode=0o1777),
        directory("data"),
        file("data/keep.txt", "kept\n"),
        file("data/deleted.txt", "deleted in layer 2\n"),
        directory("data/gone-dir"),
        file("data/gone-dir/inner.txt", "a whole dir whited out\n"),
        file("data/setuid", "#!/bin/sh\n", mode=0o4755),
        file("data/xattr.txt", "with an xattr\n", xattrs=(("user.cdtwist", "yes"),)),
        file("data/hl-a", "one inode, three names\n"),
        hardlink("data/hl-b", "data/hl-a"),
        hardlink("data/hl-c", "data/hl-a"),
        symlink("data/rel-link", "keep.txt"),
        symlink("data/abs-link", "/etc/passwd"),
        symlink("data/dangling", "/nowhere/at/all"),
        symlink("data/dir-link", "../opq"),
        directory("opq"),
        file("opq/old1", "lower 1\n"),
        file("opq/old2", "lower 2\n"),
        directory("opq/sub"),
        file("opq/sub/old3", "lower 3\n"),
        directory("dev"),
        Entry("dev/null", "char", 0o666, device=(1, 3)),
        Entry("dev/fifo", "fifo", 0o600),
    ]
    return Layer("base", entries, "gzip")


def change_layer() -> Layer:
    """Whiteouts, an opaque dir, replaced and added files, new links."""
    entries = [
        directory("data"),
        whiteout("data/deleted.txt"),
        whiteout("data/gone-dir"),
        file("data/added.txt", "added in layer 2\n", mode=0o600, uid=1000, gid=1000),
        file("data/keep.txt", "replaced in layer 2\n"),
        symlink("data/rel-link", "added.txt"),
        directory("opq", mode=0o750),
        opaque("opq"),
        file("opq/new1", "upper 1\n"),
        directory("opq/sub"),
        file("opq/sub/new3", "upper 3\n"),
        directory("etc"),
        file("etc/motd", "layer 2\n"),
        directory("new"),
        file("new/x", "x\n"),
        hardlink("new/x-link", "new/x"),
    ]
    return Layer("changes", entries, "gzip")


def third_layer() -> Layer:
    """A small top layer: zstd when ``zstandard`` imports, else gzip."""
    entries = [
        directory("etc"),
        file("etc/motd", "layer 3\n"),
        directory("new"),
        whiteout("new/x-link"),
        directory("z"),
        file("z/compressed", ("zstd " if HAVE_ZSTD else "gzip ") * 100),
    ]
    return Layer("third", entries, "zstd" if HAVE_ZSTD else "gzip")


BIG_MIB = int(os.environ.get("CDTWIST_TEST_BIG_LAYER_MIB", "100"))


def big_blob_source(size_mib: int = BIG_MIB, seed: int = 5) -> str:
    """``size_mib`` MiB of seeded random data in the cache (made once)."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, f"random-{size_mib}MiB-{seed}.bin")
    if os.path.exists(path) and os.path.getsize(path) == size_mib * MIB:
        return path
    rng = random.Random(seed)
    with open(path + ".tmp", "wb") as f:
        for _ in range(size_mib):
            f.write(rng.randbytes(MIB))
    os.utime(path + ".tmp", (MTIME, MTIME))  # the recipe key sees the mtime
    os.replace(path + ".tmp", path)
    return path


def big_layer() -> Layer:
    """One big random file (uncompressed layer: random data does not compress)."""
    return Layer("big", [directory("big"), file("big/blob.bin", source=big_blob_source(), mode=0o640)], "none")


def small_image(**kw: Any) -> Image:
    """busybox + whiteouts/opaque/links + a zstd layer: three layers, a few KiB besides busybox."""
    return Image([base_layer(), change_layer(), third_layer()], **kw)


def big_image() -> Image:
    """The small image with the 100 MiB layer in the middle (four layers)."""
    return Image([base_layer(), big_layer(), change_layer(), third_layer()], labels={"size": "big"})


# --- hostile layers ----------------------------------------------------------------------


def _up(k: int) -> str:
    return "../" * k


def hostile_images(blob_dir: str, parent: str, escape: str, marker: str) -> dict[str, Image]:
    """Images whose layers try to write outside their snapshot, by what they try.

    ``parent`` holds the sentinel dir ``sentinel/`` (with ``keep`` and
    ``dir/``) next to the daemons' dirs; ``escape`` is a host dir (with
    ``target``, ``keep`` and ``dir/``) that absolute names aim at.  Every
    name a layer would create outside carries ``marker``.  Relative
    climbs go 1 to 8 levels up (a snapshot dir is 5 or 6 below
    ``parent``) and 16 (past ``/``).  Blobs are written in ``blob_dir``.
    """
    m = marker
    deep = _up(16) + escape.lstrip("/")

    def layer(name: str, entries: list[Entry], compression: str = "none", **kw: Any) -> Layer:
        return Layer(f"hostile-{name}", entries, compression, directory=blob_dir, **kw)

    def image(name: str, *layers: Layer, **kw: Any) -> Image:
        return Image(list(layers), directory=blob_dir, **kw)

    climbs = range(1, 9)
    cases: dict[str, list[Layer]] = {
        "traversal-file": [
            layer(
                "traversal-file",
                [file(f"inside-{m}", "inside\n")]
                + [file(_up(k) + f"sentinel/trav{k}-{m}", "pwned\n") for k in climbs]
                + [file(f"{deep}/deep-{m}", "pwned\n"), file(_up(16) + f"root-{m}", "pwned\n")],
            )
        ],
        "traversal-dir": [
            layer(
                "traversal-dir",
                [directory(_up(k) + f"sentinel/dir{k}-{m}") for k in climbs]
                + [file(_up(6) + f"sentinel/dir6-{m}/f-{m}", "pwned\n"), directory(f"{deep}/dir-{m}")],
            )
        ],
        "traversal-whiteout": [
            layer(
                "traversal-whiteout",
                [whiteout(_up(k) + "sentinel/keep") for k in climbs] + [whiteout(f"{deep}/keep")],
            )
        ],
        "traversal-opaque": [
            layer(
                "traversal-opaque",
                [opaque(_up(k) + "sentinel/dir") for k in climbs] + [opaque(f"{deep}/dir")],
            )
        ],
        "absolute": [
            layer(
                "absolute",
                [
                    file(f"{escape}/abs-{m}", "pwned\n"),
                    file(f"{parent}/sentinel/abs-{m}", "pwned\n"),
                    file(f"/abs-root-{m}", "pwned\n"),
                    directory(f"{escape}/absdir-{m}"),
                    whiteout(f"{parent}/sentinel/keep"),
                    whiteout(f"{escape}/keep"),
                    opaque(f"{escape}/dir"),
                ],
            )
        ],
        "symlink-escape": [
            layer(
                "symlink-escape",
                [
                    symlink("evil", escape),
                    file(f"evil/through-{m}", "pwned\n"),
                    whiteout("evil/keep"),
                    symlink("up", _up(16).rstrip("/")),
                    file(f"up/{escape.lstrip('/')}/up-{m}", "pwned\n"),
                    file(f"up/{parent.lstrip('/')}/sentinel/up-{m}", "pwned\n"),
                ],
            )
        ],
        "symlink-parent-dir": [
            layer(
                "symlink-parent-dir",
                [
                    symlink("sp", escape),
                    directory(f"sp/sub-{m}"),
                    file(f"sp/sub-{m}/f-{m}", "pwned\n"),
                    symlink("dd", ".."),
                    file("dd/" * 10 + f"dd-{m}", "pwned\n"),
                    symlink("rel", _up(6) + "sentinel"),
                    file(f"rel/rel-{m}", "pwned\n"),
                ],
            )
        ],
        "symlink-replace": [
            layer(
                "symlink-replace",
                [
                    symlink("s", f"{escape}/target"),
                    file("s", "pwned\n"),
                    symlink("s2", _up(6) + "sentinel/keep"),
                    file("s2", "pwned\n"),
                ],
            )
        ],
        "hardlink-absolute": [layer("hardlink-absolute", [hardlink("h", f"{escape}/target"), file("h", "pwned\n")])],
        **{
            f"hardlink-up{k}": [
                layer(f"hardlink-up{k}", [hardlink("h", _up(k) + "sentinel/keep"), file("h", "pwned\n")])
            ]
            for k in (5, 6, 16)
        },
        "hardlink-deep": [layer("hardlink-deep", [hardlink("h", f"{deep}/target"), file("h", "pwned\n")])],
        "hardlink-via-symlink": [
            layer(
                "hardlink-via-symlink",
                [symlink("l", escape), hardlink("h", "l/target"), file("h", "pwned\n")],
            )
        ],
        "cross-layer-symlink": [
            layer(
                "cross-layer-1",
                [symlink("evil", escape), symlink("up", _up(16).rstrip("/")), symlink("sent", _up(6) + "sentinel")],
            ),
            layer(
                "cross-layer-2",
                [
                    file(f"evil/layer2-{m}", "pwned\n"),
                    whiteout("evil/keep"),
                    opaque("evil/dir"),
                    file(f"up/{escape.lstrip('/')}/up2-{m}", "pwned\n"),
                    file(f"sent/sent-{m}", "pwned\n"),
                    hardlink("h", "evil/target"),
                ],
            ),
        ],
        "huge-header": [
            layer(
                "huge-header",
                [Entry(f"huge-{m}", "file", 0o644, data=b"x" * MIB, claimed_size=1 << 40)],
                no_eof=True,
            )
        ],
        "truncated-gzip": [
            layer("truncated-gzip", [file(f"t-{m}", random.Random(7).randbytes(2 * MIB))], "gzip", truncate=MIB)
        ],
        "truncated-tar": [layer("truncated-tar", [file(f"t-{m}", random.Random(8).randbytes(2 * MIB))], truncate=MIB)],
    }
    out = {name: image(name, *layers) for name, layers in cases.items()}
    out["diff-id-mismatch"] = image(
        "diff-id-mismatch",
        layer("diff-id-mismatch", [file(f"ok-{m}", "fine\n")], "gzip"),
        diff_ids=["sha256:" + "0" * 64],
    )
    return out


# --- trees: expected and scanned ---------------------------------------------------------


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "other"


def _entry_digest(e: Entry) -> str:
    if e.source:
        return file_sha256(e.source)
    return sha256_digest(e.data)


def expected_tree(layers: Iterable[Layer]) -> dict[str, tuple[Any, ...]]:
    """``{path: node}`` of the rootfs the layers make, as :func:`scan_tree` reports it.

    A node is (kind, permission bits, uid, gid, size or device, sha256 or
    link target, mtime, sorted other names of the same inode, xattrs).
    """
    nodes: dict[str, dict[str, Any]] = {}
    inode_of: dict[str, int] = {}
    next_inode = iter(range(1, 1 << 30))

    def remove(path: str) -> None:
        for p in [p for p in nodes if p == path or p.startswith(path + "/")]:
            del nodes[p]
            inode_of.pop(p, None)

    for layer in layers:
        this_layer: set[str] = set()
        opaque_dirs = [os.path.dirname(e.path) for e in layer.entries if os.path.basename(e.path) == ".wh..wh..opq"]
        for d in opaque_dirs:
            for p in [p for p in nodes if p.startswith(d + "/")]:
                del nodes[p]
                inode_of.pop(p, None)
        for e in layer.entries:
            parent, base = os.path.split(e.path)
            if base == ".wh..wh..opq":
                continue
            if base.startswith(".wh."):
                remove(os.path.join(parent, base[4:]))
                continue
            this_layer.add(e.path)
            if e.kind == "hardlink":
                remove(e.path)
                nodes[e.path] = nodes[e.target]
                inode_of[e.path] = inode_of[e.target]
                continue
            if e.kind != "dir" or nodes.get(e.path, {}).get("kind") != "dir":
                remove(e.path)
            node = {
                "kind": e.kind,
                "mode": e.mode,
                "uid": e.uid,
                "gid": e.gid,
                "size": e.size if e.kind == "file" else (e.device if e.kind in ("char", "block") else 0),
                "content": _entry_digest(e) if e.kind == "file" else (e.target if e.kind == "symlink" else ""),
                "mtime": e.mtime,
                "xattrs": tuple(sorted(e.xattrs)),
            }
            nodes[e.path] = node
            inode_of[e.path] = next(next_inode)
    out = {}
    for path, node in nodes.items():
        others = tuple(sorted(p for p, i in inode_of.items() if i == inode_of[path] and p != path))
        out["/" + path] = (
            node["kind"],
            oct(node["mode"] & 0o7777),
            node["uid"],
            node["gid"],
            node["size"],
            node["content"],
            node["mtime"],
            others,
            node["xattrs"],
        )
    return out


def scan_tree(root: str, skip: Iterable[str] = ()) -> dict[str, tuple[Any, ...]]:
    """``{"/path": node}`` of everything under ``root`` (not ``root`` itself), like :func:`expected_tree`."""
    skip = set(skip)
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            if rel in skip:
                continue
            found[rel] = os.lstat(full)
    by_inode: dict[tuple[int, int], list[str]] = {}
    for rel, st in found.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out = {}
    for rel, st in found.items():
        full = root + rel
        kind = _kind_of(st.st_mode)
        if kind == "file":
            size: Any = st.st_size
            content = file_sha256(full)
        elif kind in ("char", "block"):
            size, content = (os.major(st.st_rdev), os.minor(st.st_rdev)), ""
        elif kind == "symlink":
            size, content = 0, os.readlink(full)
        else:
            size, content = 0, ""
        others = tuple(sorted(p[1:] for p in by_inode.get((st.st_dev, st.st_ino), []) if p != rel))
        try:
            names = [n for n in os.listxattr(full, follow_symlinks=False) if n.startswith("user.")]
            xattrs = tuple(
                sorted((n, os.getxattr(full, n, follow_symlinks=False).decode(errors="replace")) for n in names)
            )
        except OSError:
            xattrs = ()
        out[rel] = (
            kind,
            oct(stat.S_IMODE(st.st_mode)) if kind != "symlink" else oct(0o777),
            st.st_uid,
            st.st_gid,
            size,
            content,
            int(st.st_mtime),
            others,
            xattrs,
        )
    return out


def layer_dir_tree(root: str) -> dict[str, tuple[Any, ...]]:
    """An overlay layer dir as stored: :func:`scan_tree` plus ``trusted.overlay.opaque``, whiteouts' mtimes None."""
    out = {}
    for rel, node in scan_tree(root).items():
        if node[0] == "char" and node[4] == (0, 0):
            node = node[:6] + (None,) + node[7:]  # a whiteout: made when the layer was applied
        try:
            opaque_flag = os.getxattr(root + rel, "trusted.overlay.opaque", follow_symlinks=False).decode()
        except OSError:
            opaque_flag = ""
        out[rel] = node + (opaque_flag,)
    return out


def tree_diff(expected: dict[str, Any], got: dict[str, Any]) -> str:
    """A readable difference of two trees ('' when equal)."""
    lines = []
    for path in sorted(set(expected) | set(got)):
        e, g = expected.get(path), got.get(path)
        if e != g:
            lines.append(f"{path}:\n  expected {e}\n  got      {g}")
    return "\n".join(lines)


# --- mounts -------------------------------------------------------------------------------


def mountinfo_points() -> list[str]:
    """Mount points in this mount namespace (octal escapes decoded)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4]
            points.append(point.encode().decode("unicode_escape"))
    return points


def mounts_under(*prefixes: str) -> list[str]:
    """Mount points at or under any of ``prefixes``."""
    return [
        p
        for p in mountinfo_points()
        if any(p == prefix or p.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)
    ]


def mount_all(mounts: list[dict[str, Any]], target: str) -> None:
    """Mount ``ctr snapshots view --mounts`` JSON on ``target`` with mount(8)."""
    for m in mounts:
        cmd = ["mount", "-t", m["Type"], m["Source"], target]
        if m.get("Options"):
            cmd += ["-o", ",".join(m["Options"])]
        subprocess.run(cmd, check=True, capture_output=True, text=True)


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` (lazily as a last resort)."""
    for _ in range(10):
        if target not in mountinfo_points():
            return
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)


# --- test cases driving ctr on both daemons ----------------------------------------------------

LONG = 180.0
_NANO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
#: what the layers are named by in the layouts the tests import
SMALL_NAMES = ["docker.io/library/small:1", "small:2"]
BIG_NAMES = ["big:1"]


_RANDOM_NAMES = [
    (re.compile(r"containerd-mount[A-Za-z0-9_]+"), "containerd-mount<R>"),  # temp mounts
    (re.compile(r"extract-\d+-[A-Za-z0-9_-]{4} "), "extract-<R> "),  # unpack snapshot keys
]


def normalise(text: str, *daemons: DaemonProcess) -> str:
    """Times (with fractions), ages, temp paths, addresses and random names placeholdered."""
    text = _NANO_TIME.sub("<TIME>", text)
    for pattern, placeholder in _RANDOM_NAMES:
        text = pattern.sub(placeholder, text)
    return _normalise(text, *daemons)


def summary(result: Result, daemon: DaemonProcess) -> tuple[int, str, str]:
    """Exit status and normalised outputs."""
    return result.rc, normalise(result.stdout, daemon), normalise(result.stderr, daemon)


def require_image_tools() -> None:
    """SkipTest without busybox-static, mount(8) or chroot(8)."""
    if not os.path.exists(BUSYBOX):
        raise unittest.SkipTest(f"{BUSYBOX} not found (Debian package busybox-static)")
    require_binaries("mount", "umount", "chroot")


def snapshot_dirs(daemon: DaemonProcess, snapshotter: str) -> set[str]:
    """The snapshotter's backend snapshot dirs on disk (by id: not those renamed ``rm-<id>`` for removal)."""
    pattern = os.path.join(daemon.root, f"io.containerd.snapshotter.v1.{snapshotter}", "snapshots", "*")
    return {path for path in glob.glob(pattern) if os.path.basename(path).isdigit()}


def strip_dir_mtimes(tree: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Directories' mtimes replaced by None.

    containerd's native snapshotter copies the parent snapshot without the
    directories' mtimes: only the top layer's directories keep theirs.
    """
    return {p: (n[:6] + (None,) + n[7:] if n[0] == "dir" else n) for p, n in tree.items()}


def chroot_report(root: str) -> tuple[int, str, str]:
    """busybox run inside the mounted rootfs: it is a usable root filesystem."""
    script = (
        "id -u; cat /etc/motd; ls /opq /opq/sub /data; readlink /data/rel-link; "
        "test -e /data/deleted.txt || echo deleted-is-gone; cat /data/dir-link/new1; "
        "stat -c '%a %u:%g %h' /data/hl-a /data/setuid /etc/shadow /home/user"
    )
    proc = subprocess.run(["chroot", root, "/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def tar_members(data: bytes) -> list[tuple[Any, ...]]:
    """(name, type, mode, uid, gid, size, linkname) of a (gzip) tar's members, in order."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.type, oct(m.mode), m.uid, m.gid, m.size, m.linkname) for m in tar.getmembers()]


class CtrCase(unittest.TestCase):
    """cdtwist and containerd (:attr:`shared`), one namespace name per scenario, no mounts left behind.

    Scenarios derive every name (keys, mount points) from the namespace so
    that both daemons see the same ones.
    """

    maxDiff = None
    #: the module's shared (cdtwist, containerd) daemons
    shared: tuple[SharedDaemon[CdtwistDaemon], SharedDaemon[ContainerdDaemon]]

    def setUp(self) -> None:
        require_image_tools()
        cdtwist, containerd = self.shared
        self.daemons: tuple[DaemonProcess, DaemonProcess] = (cdtwist.get(self), containerd.get(self))
        self.addCleanup(self.check_no_mounts)

    def check_no_mounts(self) -> None:
        """Fail (after unmounting them) if mounts were left under a daemon's dir."""
        left = mounts_under(*(d.tmpdir for d in self.daemons))
        for point in sorted(left, key=len, reverse=True):
            unmount_all(point)
        self.assertEqual(left, [], "mounts left behind")

    def tmpdir(self) -> str:
        """A fresh dir under the test's _trial_temp."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def target(self, daemon: DaemonProcess, name: str) -> str:
        """An empty mount point ``name`` under the daemon's dir (normalised to <TMPDIR>), unmounted at cleanup."""
        path = os.path.join(daemon.tmpdir, name)
        os.makedirs(path)
        self.addCleanup(unmount_all, path)
        return path

    def view(self, daemon: DaemonProcess, ns: str, snapshotter: str, key: str, parent: str) -> list[dict[str, Any]]:
        """A view labelled ``containerd.io/gc.root`` (over gRPC), its mounts as ``ctr ... --mounts`` prints them.

        ``ctr snapshots view`` sets no gc.root label and takes no lease: the
        GC may remove its view at any time, on containerd as on cdtwist.
        """
        channel = grpc.insecure_channel("unix:" + daemon.address)
        self.addCleanup(channel.close)
        request = sapi.ViewSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels={"containerd.io/gc.root": "cdtwist-tests"}
        )
        response = sapi_grpc.SnapshotsStub(channel).View(request, metadata=[("containerd-namespace", ns)], timeout=LONG)
        return [{"Type": m.type, "Source": m.source, "Options": list(m.options)} for m in response.mounts]

    def assert_tree(self, daemon: DaemonProcess, got: dict[str, Any], expected: dict[str, Any]) -> None:
        """``got == expected``, else a failure listing the paths that differ."""
        self.assertEqual(got, expected, f"{daemon.name}: the rootfs differs:\n" + tree_diff(expected, got))

    def compare(self, scenario: Callable[[DaemonProcess, str], Any]) -> Any:
        """``scenario(daemon, namespace)`` on both daemons (same namespace name): equal results, containerd's."""
        ns = unique("flow")
        results = [scenario(daemon, ns) for daemon in self.daemons]
        self.assertEqual(results[0], results[1], "cdtwist (first) differs from containerd (second)")
        return results[1]

    def c(self, daemon: DaemonProcess, ns: str, *args: str) -> tuple[int, str, str]:
        """``ctr args`` in ``ns``: exit status and normalised outputs, to compare."""
        return summary(run_ctr(daemon, *args, namespace=ns, timeout=LONG), daemon)

    def ok(self, daemon: DaemonProcess, ns: str, *args: str) -> Result:
        """``ctr args`` in ``ns``, which must succeed."""
        return run_ctr(daemon, *args, namespace=ns, timeout=LONG).ok()


def small_layout() -> str:
    """The small image as ``SMALL_NAMES``, an OCI layout tar in the cache."""
    return cached_layout("small", [(small_image(), SMALL_NAMES)])


def all_layout() -> str:
    """The small image as ``SMALL_NAMES`` and the big one as ``BIG_NAMES``, one OCI layout tar in the cache."""
    return cached_layout("all", [(small_image(), SMALL_NAMES), (big_image(), BIG_NAMES)])
