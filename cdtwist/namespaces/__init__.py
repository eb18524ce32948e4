"""Namespaces: the tenant boundary every other object lives in."""
