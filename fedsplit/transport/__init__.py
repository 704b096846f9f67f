"""The gRPC data plane: wire format, validation, server and client channel."""
