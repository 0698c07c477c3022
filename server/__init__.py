"""The gRPC server: servicers, runtime, limits, auth and the `graphgrad serve` CLI."""
