# -*- test-case-name: tests.test_runtime_bundle -*-
"""OCI bundles for v2 shims, laid out as containerd's ``runtime/v2/bundle.go``.

A task's bundle is ``<state>/<namespace>/<id>`` (``config.json``, ``rootfs``,
the shim's ``address``/``log``/pid files) and its persistent work dir is
``<root>/<namespace>/<id>``, linked from the bundle as ``work``.  The shim
mounts the rootfs itself; deleting a bundle unmounts whatever is left there
and removes both dirs through a hidden rename, so a crash never leaves a
half-deleted bundle that looks alive.

Every function blocks (disk, mount(2)): call them from a pool thread.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from cdtwist.errors import CdtwistError
from cdtwist.grpc.context import validate_identifier
from cdtwist.mount import unmount_all

CONFIG_FILENAME = "config.json"
ADDRESS_FILENAME = "address"
SHIM_BINARY_PATH_FILENAME = "shim-binary-path"
LOG_FILENAME = "log"


@dataclass(frozen=True)
class Bundle:
    """Where one task's shim lives."""

    id: str
    path: str
    namespace: str

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def delete(self) -> None:
        """Go's ``Bundle.Delete``: unmount the rootfs, then remove bundle and work dir."""
        try:
            work: str | None = os.readlink(os.path.join(self.path, "work"))
        except OSError:
            work = None
        rootfs = self.rootfs
        try:
            unmount_all(rootfs)
        except OSError as e:
            raise CdtwistError(f"unmount rootfs {rootfs}: {e.strerror or e}") from None
        try:
            os.rmdir(rootfs)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CdtwistError(f"failed to remove bundle rootfs: remove {rootfs}: {e.strerror}") from None
        try:
            atomic_delete(self.path)
        except OSError as e:
            # still attempt removing the work dir
            if work is not None:
                try:
                    atomic_delete(work)
                except OSError as e2:
                    raise CdtwistError(
                        f"failed to remove both bundle and workdir locations: {e2}: {e}"
                    ) from None
            raise CdtwistError(str(e)) from None
        if work is not None:
            atomic_delete(work)


def atomic_delete(path: str) -> None:
    """Rename to a hidden sibling, then remove it: a crash leaves only a hidden dir."""
    hidden = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    try:
        shutil.rmtree(hidden)
    except FileNotFoundError:
        pass


def load_bundle(state: str, namespace: str, id: str) -> Bundle:
    """An existing bundle (nothing is checked: recovery looks inside)."""
    return Bundle(id=id, path=os.path.join(state, namespace, id), namespace=namespace)


def new_bundle(root: str, state: str, namespace: str, id: str, spec: bytes) -> Bundle:
    """Go's ``NewBundle``: bundle dir 0700, rootfs 0711, fresh work dir, ``work`` link, ``config.json``."""
    try:
        validate_identifier(id)
    except CdtwistError as e:
        raise type(e)(f"invalid task id {id}: {e.context}") from None
    work = os.path.join(root, namespace, id)
    bundle = Bundle(id=id, path=os.path.join(state, namespace, id), namespace=namespace)
    created: list[str] = []
    try:
        os.makedirs(os.path.dirname(bundle.path), 0o711, exist_ok=True)
        _go_os_error("mkdir", bundle.path, os.mkdir, bundle.path, 0o700)
        created.append(bundle.path)
        gid = remapped_gid(spec)
        if gid:
            os.chown(bundle.path, -1, gid)
            os.chmod(bundle.path, 0o710)
        os.makedirs(os.path.dirname(work), 0o711, exist_ok=True)
        os.makedirs(bundle.rootfs, 0o711, exist_ok=True)
        created.append(bundle.rootfs)
        try:
            os.mkdir(work, 0o711)
        except FileExistsError:
            shutil.rmtree(work, ignore_errors=True)
            _go_os_error("mkdir", work, os.mkdir, work, 0o711)
        created.append(work)
        os.symlink(work, os.path.join(bundle.path, "work"))
        with open(bundle.file(CONFIG_FILENAME), "wb") as f:
            f.write(spec)
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return bundle


def _go_os_error(op: str, path: str, fn: object, *args: object) -> None:
    """Run ``fn``; an OSError reads as Go's ``*PathError`` (``mkdir /x: file exists``)."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        raise CdtwistError(f"{op} {path}: {(e.strerror or str(e)).lower()}") from None


def remapped_gid(spec: bytes) -> int:
    """The host gid of container gid 0 when the spec maps user namespaces, else 0."""
    try:
        doc = json.loads(spec or b"null")
    except ValueError as e:
        raise CdtwistError(f"invalid OCI spec: {e}") from None
    linux = doc.get("linux") if isinstance(doc, dict) else None
    mappings = (linux or {}).get("gidMappings") or []
    for mapping in mappings:
        if mapping.get("containerID", 0) == 0:
            return int(mapping.get("hostID", 0))
    return 0


def read_address(bundle: Bundle) -> str:
    """The shim's address file (``ReadAddress``): empty means no address."""
    with open(bundle.file(ADDRESS_FILENAME)) as f:
        data = f.read()
    if not data:
        raise CdtwistError("no shim address")
    return data


def socket_path(address: str) -> str:
    """The path to dial for a shim address: ``unix://`` stripped, else an abstract socket."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return "\0" + address
