# -*- test-case-name: tests.test_runtime_binary -*-
"""The ``-publish-binary`` handed to shims: ``<binary> --address <addr> publish --topic T --namespace N``.

containerd passes its own executable; a shim that publishes through it
(runtime v1 shims, third-party v2 shims) execs it with containerd's global
``--address`` flag *before* the ``publish`` command and the event (a
marshalled ``Any``) on stdin.  :func:`main` accepts exactly that form (and
``cdtwist publish --address ...`` too) and hands over to ``cdtwist publish``.

cdtwist may run from a checkout without a ``cdtwist`` executable on PATH,
so :func:`write_publish_binary` writes a small executable script that runs
this module with the interpreter and import path of the running daemon.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

#: containerd's default socket, the default of ``--address``.
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"

_SCRIPT = """#!{python}
# Written by cdtwist: the publish binary handed to shims (-publish-binary).
import sys
sys.path.insert(0, {path!r})
from cdtwist.runtime.publish import main
sys.exit(main(sys.argv[1:]))
"""


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Global flags (``--address/-a``, others ignored) around a ``publish`` command."""
    parser = argparse.ArgumentParser(prog="cdtwist", add_help=False)
    parser.add_argument("--address", "-a", default=None)
    parser.add_argument("--namespace", "-n", default=None)
    parser.add_argument("--topic", "-t", default=None)
    # containerd's other global flags may be passed by some shims: accept and ignore them.
    for flag in ("--config", "-c", "--log-level", "-l", "--root", "--state"):
        parser.add_argument(flag, dest=f"ignored_{flag.strip('-').replace('-', '_')}", default=None)
    args, rest = parser.parse_known_args(list(argv))
    commands = [a for a in rest if not a.startswith("-")]
    if commands != ["publish"]:
        raise SystemExit(f"cdtwist: expected the publish command, got {' '.join(rest) or 'nothing'}")
    args.address = args.address or DEFAULT_ADDRESS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cdtwist.cli import cmd_publish

    args = parse(sys.argv[1:] if argv is None else argv)
    return int(cmd_publish(args))


def write_publish_binary(path: str) -> str:
    """Write (atomically) the executable script at ``path``; blocking."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = _SCRIPT.format(python=sys.executable, path=package_parent)
    os.makedirs(os.path.dirname(path), 0o711, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
