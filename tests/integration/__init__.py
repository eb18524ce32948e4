"""Integration tests: the real cdtwist daemon (and real containerd) driven by the real ``ctr``."""
