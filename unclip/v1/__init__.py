"""Generated protobuf and gRPC code for the unclip.v1 API (see protos/; regenerate with tools/gen_protos.py)."""
