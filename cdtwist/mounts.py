# -*- test-case-name: tests.test_mounts -*-
"""Mount table reading and unmounting, for what a crash leaves behind."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountpoints(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    with open(mountinfo) as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def unmount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def cleanup_temp_mounts(directory: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Unmount everything below ``directory``, deepest first (containerd's CleanupTempMounts)."""
    prefix = directory.rstrip("/") + "/"
    found = [m for m in mountpoints(mountinfo) if m.startswith(prefix)]
    found.sort(key=lambda m: m.count("/"), reverse=True)
    for target in found:
        unmount(target, MNT_DETACH)
    return found
