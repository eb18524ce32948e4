"""cdtwist: a containerd 1.6 compatible daemon on Twisted."""

from __future__ import annotations

import os
import subprocess

__version__ = "0.1.0"

#: The containerd release whose API and behaviour cdtwist reproduces.
CONTAINERD_VERSION = "1.6.20"

#: What the Version RPC reports: semver-compatible with containerd's, so
#: clients that gate features on the containerd version keep working.
SERVER_VERSION = f"{CONTAINERD_VERSION}+cdtwist.{__version__}"


def revision() -> str:
    """The git revision of a source checkout, else the release name."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(here, ".git")):
        try:
            out = subprocess.run(
                ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0:
                return out.stdout.strip()
        except OSError:
            pass
    return f"cdtwist-{__version__}"
