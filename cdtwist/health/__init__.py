"""Standard gRPC health checking."""
