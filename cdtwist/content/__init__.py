"""Content storage: containerd's digest-addressed blob store (``content/``)."""
