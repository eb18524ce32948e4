"""The gRPC face of cdtwist: grpcio in its own thread pool."""
