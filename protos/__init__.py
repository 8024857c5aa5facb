"""Generated gRPC/protobuf code for the oobleck.v1 API (see scripts/gen_protos.py)."""
