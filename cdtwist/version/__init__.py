"""The Version service."""
