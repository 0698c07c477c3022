"""Generated protobuf and gRPC code for graphgrad.v1 (see proto/generate.py). Do not edit."""
