"""gRPC channel and server options shared by every client and server, so limits agree."""

from __future__ import annotations

# Eight 1024x1024 RGB images are 25 MB raw; leave room for tensors and PNG overhead.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# The metadata key (and HTTP header) of a request's id: sent by callers, answered by servers.
REQUEST_ID_HEADER = "x-request-id"

# How long a stopping server lets requests in flight finish (`unclip serve --shutdown-grace`).
SHUTDOWN_GRACE_SECONDS = 30.0
