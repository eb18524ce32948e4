"""The event exchange and its gRPC/ttrpc service."""
