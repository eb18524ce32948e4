#!/usr/bin/env python3
"""Re-vendor the containerd .proto files into protos/cdtwist/api/.

Usage: python protos/vendor.py [CONTAINERD_SRC]

CONTAINERD_SRC defaults to the Debian golang-github-containerd-containerd-dev
tree (containerd 1.6.20).  Each file is copied to the location given in
MAPPING, with:

* ``import weak "gogoproto/gogo.proto"`` and
  ``import weak "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto"``
  removed,
* every ``(gogoproto.*)`` / ``(containerd.plugin.*)`` option removed (file,
  message, enum, enum value and field options),
* imports of other containerd protos rewritten to their new location.

Packages, messages, fields, numbers and types are untouched, so the wire
format is unchanged.  ttrpc's request.proto is hand-written (ttrpc 1.1.1 does
not ship one) and is not handled here.  After vendoring run
``python protos/generate.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DEFAULT_SRC = "/usr/share/gocode/src/github.com/containerd/containerd"
GO_PREFIX = "github.com/containerd/containerd/"
PROTOS = Path(__file__).resolve().parent

# upstream path (relative to the containerd repo) -> path under protos/
MAPPING: dict[str, str] = {}
for _name in ("container", "content", "image", "namespace", "snapshot", "task"):
    MAPPING[f"api/events/{_name}.proto"] = f"cdtwist/api/events/{_name}.proto"
for _svc in (
    "containers/v1/containers",
    "content/v1/content",
    "diff/v1/diff",
    "events/v1/events",
    "images/v1/images",
    "introspection/v1/introspection",
    "leases/v1/leases",
    "namespaces/v1/namespace",
    "snapshots/v1/snapshots",
    "tasks/v1/tasks",
    "ttrpc/events/v1/events",
    "version/v1/version",
):
    MAPPING[f"api/services/{_svc}.proto"] = f"cdtwist/api/services/{_svc}.proto"
for _name in ("descriptor", "metrics", "mount", "platform", "task/task"):
    MAPPING[f"api/types/{_name}.proto"] = f"cdtwist/api/types/{_name}.proto"
MAPPING["runtime/v2/task/shim.proto"] = "cdtwist/api/runtime/task/v2/shim.proto"
MAPPING["runtime/v2/runc/options/oci.proto"] = "cdtwist/api/runtime/runc/options/oci.proto"

_DROP_LINE = re.compile(
    r"""^\s*(import\s+weak\s+"(gogoproto/gogo\.proto|github\.com/containerd/containerd/protobuf/plugin/fieldpath\.proto)"\s*;"""
    r"""|option\s+\((gogoproto|containerd\.plugin)\.[A-Za-z_]+\)\s*=\s*[^;]*;)\s*$"""
)
_IMPORT = re.compile(r'^(\s*import\s+(?:public\s+)?")([^"]+)(";.*)$')
_BRACKET = re.compile(r"\s*\[([^\]]*)\]\s*;")


def _strip_options(line: str) -> str:
    def repl(m: re.Match[str]) -> str:
        opts = [o.strip() for o in m.group(1).split(",")]
        keep = [o for o in opts if not re.match(r"\((gogoproto|containerd\.plugin)\.", o)]
        return f" [{', '.join(keep)}];" if keep else ";"

    return _BRACKET.sub(repl, line)


def convert(text: str, upstream: str) -> str:
    out: list[str] = []
    dropped_prev = False
    for line in text.splitlines():
        if _DROP_LINE.match(line):
            dropped_prev = True
            continue
        m = _IMPORT.match(line)
        if m and m.group(2).startswith(GO_PREFIX):
            target = MAPPING[m.group(2)[len(GO_PREFIX) :]]
            line = f"{m.group(1)}{target}{m.group(3)}"
        line = _strip_options(line)
        # avoid leaving double blank lines where an import/option block was removed
        if dropped_prev and not line.strip() and out and not out[-1].strip():
            continue
        dropped_prev = False
        if line.strip().startswith("syntax"):
            out.append(f"// Vendored from containerd v1.6.20 {upstream}; gogoproto and fieldpath")
            out.append("// imports/options removed, import paths rewritten (see protos/README.md).")
        out.append(line)
    result = "\n".join(out) + "\n"
    code = "\n".join(ln.split("//", 1)[0] for ln in out)
    leftover = re.search(r"gogoproto|containerd\.plugin|fieldpath\.proto", code)
    if leftover:
        raise SystemExit(f"{upstream}: unhandled gogoproto/fieldpath use: {leftover.group(0)}")
    return result


def main(argv: list[str]) -> int:
    src = Path(argv[1] if len(argv) > 1 else DEFAULT_SRC)
    for upstream, dest in sorted(MAPPING.items()):
        text = (src / upstream).read_text()
        out = PROTOS / dest
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(convert(text, upstream))
        print(f"{upstream} -> protos/{dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
