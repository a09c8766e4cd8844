"""Python SDK for an unclip gateway: text in, PNG images out, over gRPC.

    from unclip.client import Client

    with Client("localhost:50051") as client:
        for image in client.generate("a corgi playing a trumpet", n=2, seed=7):
            image.save(f"corgi-{image.seed}.png")
        for image in client.variations("corgi-7.png", n=2):
            image.save(f"variation-{image.seed}.png")
        animation = client.interpolate(prompts=("a red circle", "a blue square"), frames=5, animated_gif=True)
        animation.save_gif("circle-to-square.gif")

Besides `generate` and `generate_stream` (stage progress and decoder `Preview`s, then the images),
clients offer `variations`, `edit` (inpainting), `interpolate` and `text_diff` (both return an
`Animation`). Generation parameters (`n`, `seed`, `size`, guidance scales, steps, ...) are keyword
arguments, defined once in `unclip.parameters`. With `response_format="url"` images come as
presigned URLs that the SDK leaves to you to download. `AsyncClient` offers the same API for
asyncio. Failed calls raise `UnclipError` (the `unclip.errors` class of the status code: an
`InvalidArgument`, `Unavailable`, ...); calls that fail with UNAVAILABLE are retried with
jittered exponential backoff within the call's timeout.

Needs only grpcio, protobuf, numpy and pillow: importing it never loads torch or the server side.
"""

from unclip.client.aio import AsyncClient
from unclip.client.retry import DEFAULT
from unclip.client.sync import Client
from unclip.client.types import Animation, GeneratedImage, Preview, StageProgress
from unclip.errors import UnclipError

__all__ = [
    "DEFAULT",
    "Animation",
    "AsyncClient",
    "Client",
    "GeneratedImage",
    "Preview",
    "StageProgress",
    "UnclipError",
]
