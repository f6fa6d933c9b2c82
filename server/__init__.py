"""The gRPC server: servicers, interceptors, health, config and the process entry point."""
