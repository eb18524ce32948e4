# -*- test-case-name: tests.test_sockets -*-
"""UNIX socket paths prepared the way containerd's ``GetLocalListener`` does.

The parent directory is created 0770 and owned by the configured uid/gid
before anything binds, so the window between bind and chmod never exposes
the socket to other users.  A socket file left by a dead daemon is removed;
one a live daemon still answers on is refused, never stolen.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from cdtwist.errors import AlreadyExists, InvalidArgument

#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_PATH = 107


def prepare_unix_path(path: str, uid: int = 0, gid: int = 0) -> None:
    """Blocking: run it off the reactor thread."""
    if len(path.encode()) > MAX_PATH:
        raise InvalidArgument(f"unix socket path {path!r} is longer than {MAX_PATH} bytes")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, 0o770, exist_ok=True)
        os.chmod(parent, 0o770)  # makedirs honours the umask
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(parent, uid, gid)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyExists(f"{path} exists and is not a socket")
    if socket_is_live(path):
        raise AlreadyExists(f"{path}: another daemon is serving on this socket")
    os.unlink(path)


def socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def secure_socket(path: str, uid: int = 0, gid: int = 0, mode: int = 0o660) -> None:
    os.chmod(path, mode)
    if (uid, gid) != (os.geteuid(), os.getegid()):
        os.chown(path, uid, gid)


def remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
