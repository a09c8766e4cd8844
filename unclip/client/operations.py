"""The image operations every client offers, written once: each builds its request and hands it
to the client's own way of calling.

`Client` calls and returns the result, `AsyncClient` returns an awaitable of it, and
`unclip.local_client.LocalClient` answers the same requests in this process; the type
parameters say which: (images, animation, stream of events).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from unclip.client import requests
from unclip.client.requests import ImageInput, Rpc, takes_parameters
from unclip.client.retry import DEFAULT, Timeout
from unclip.v1 import images_pb2

ImagesT = TypeVar("ImagesT")
AnimationT = TypeVar("AnimationT")
StreamT = TypeVar("StreamT")


class Operations(Generic[ImagesT, AnimationT, StreamT]):
    """The ImageService operations; a client supplies `_unary` and `_stream`."""

    def _unary(self, rpc: Rpc[Any], timeout: Timeout) -> Any:
        """The parsed response of a unary call (or an awaitable of it)."""
        raise NotImplementedError

    def _stream(self, request: images_pb2.GenerateStreamRequest, timeout: Timeout) -> Any:
        """The events of a GenerateStream call, as the client iterates them."""
        raise NotImplementedError

    @takes_parameters("generate")
    def generate(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> ImagesT:
        """Generate images for `prompt`: `n` of them, image i from seed + i."""
        return self._unary(requests.generate(prompt, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("generate_stream")
    def generate_stream(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> StreamT:
        """Like `generate`, but yields events as the work goes on, then the images.

        Yields a `StageProgress` as each stage finishes and, when `preview_every` > 0, a
        `Preview` of the decoder's current estimate every `preview_every` decoder steps (and
        after its last); the last item is the list of `GeneratedImage`s.

        The arguments are checked now; the call starts when iteration does, and its timeout covers
        the whole stream. A call that fails before the first event is retried like `generate`;
        once an event has arrived, a failure raises `UnclipError`. Stopping the iteration early
        (with `AsyncClient`: closing the iterator) cancels the call.
        """
        return self._stream(requests.generate_stream(prompt, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("variations")
    def variations(
        self,
        image: ImageInput,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> ImagesT:
        """`n` variations of `image`: its CLIP image embedding decoded again, image i with seed + i.

        An image the server cannot decode is INVALID_ARGUMENT.
        """
        return self._unary(requests.variations(image, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("edit")
    def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        mask: ImageInput | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> ImagesT:
        """Inpainting: regenerate part of `image` so that the whole matches `prompt`.

        `image` may have any size (it is centre-cropped and resized to `size`); `prompt`
        describes the whole edited image, not only the new part. `mask`: an image of the same
        size whose fully transparent pixels (alpha 0) mark the region to regenerate; None to use
        `image`'s own alpha channel. Pixels outside the region are kept. A mask without
        transparent pixels, or of another size, is INVALID_ARGUMENT.
        """
        return self._unary(requests.edit(image, prompt, mask, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("interpolate")
    def interpolate(
        self,
        *,
        images: tuple[ImageInput, ImageInput] | None = None,
        prompts: tuple[str, str] | None = None,
        frames: int = 5,
        animated_gif: bool = False,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> AnimationT:
        """Frames between two images or two prompts (give exactly one pair): their image
        embeddings slerped, the prompts' from the prior. `frames` counts both ends (at least 2);
        `animated_gif` also returns them as a GIF. Every frame shares the seed, so only the
        embedding changes."""
        rpc = requests.interpolate(images, prompts, frames, animated_gif, parameters, response_format, idempotency_key)
        return self._unary(rpc, timeout)

    @takes_parameters("text_diff")
    def text_diff(
        self,
        image: ImageInput,
        caption: str,
        target_caption: str,
        *,
        frames: int = 5,
        max_rotation: float | None = None,
        animated_gif: bool = False,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> AnimationT:
        """A text diff (DALL-E 2): frames moving `image` from `caption` (what it shows) toward
        `target_caption`. `frames` counts the unchanged start (at least 2); `max_rotation`, in
        (0, 1], is how far the last frame moves along the arc toward the text-diff direction
        (None: the server's default, 0.5); `animated_gif` also returns a GIF. Every frame shares
        the seed."""
        rpc = requests.text_diff(
            image, caption, target_caption, frames, max_rotation, animated_gif, parameters, response_format, idempotency_key
        )
        return self._unary(rpc, timeout)
