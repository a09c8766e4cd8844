"""Python SDK for an unclip gateway: text in, PNG images out, over gRPC.

    from unclip.client import Client

    with Client("localhost:50051") as client:
        for image in client.generate("a corgi playing a trumpet", n=2, seed=7):
            image.save(f"corgi-{image.seed}.png")

`AsyncClient` offers the same API for asyncio. Failed calls raise `UnclipError`; calls that fail
with UNAVAILABLE are retried with jittered exponential backoff within the call's timeout.

Needs only grpcio, protobuf, numpy and pillow: importing it never loads torch or the server side.
"""

from unclip.client._common import DEFAULT, GeneratedImage, StageProgress, UnclipError
from unclip.client.aio import AsyncClient
from unclip.client.sync import Client

__all__ = ["DEFAULT", "AsyncClient", "Client", "GeneratedImage", "StageProgress", "UnclipError"]
