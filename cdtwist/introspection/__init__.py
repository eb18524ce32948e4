"""Introspection: what plugins loaded, and this server's identity."""
