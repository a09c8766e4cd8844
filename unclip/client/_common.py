"""What the sync and async clients share: result types, the SDK error, request building, retry timing.

Nothing here does I/O, so both clients wrap the same logic around their own way of calling and
sleeping. Only grpcio, protobuf and pillow are imported: the SDK must stay free of torch and of the
server-side modules.
"""

from __future__ import annotations

import enum
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from PIL import Image

from unclip.options import sampler_to_proto
from unclip.v1 import images_pb2


class _Default(enum.Enum):
    """Type of the `DEFAULT` sentinel (an enum so type checkers can narrow it)."""

    TOKEN = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.TOKEN
"""Passed as a method's `timeout` (the default): use the timeout the client was created with."""

Timeout = float | None | _Default


class UnclipError(Exception):
    """A call to an unclip server failed.

    Attributes:
        code: the gRPC status (`grpc.StatusCode`) of the last attempt.
        details: the server's (or gRPC's) description of the failure.
        target: the address the client called.
        attempts: how many times the call was tried.
    """

    def __init__(self, message: str, *, code: grpc.StatusCode, details: str, target: str, attempts: int = 1):
        super().__init__(message)
        self.code = code
        self.details = details
        self.target = target
        self.attempts = attempts


@dataclass(frozen=True)
class StageProgress:
    """A pipeline stage finished (a `generate_stream` event).

    Attributes:
        stage: "encode", "prior", "decode" or "upsample".
        index: which upsampler, for "upsample" (0 = the first); 0 otherwise.
        completed: stages finished so far for this request, this one included.
        total: stages in total for this request.
        seconds: how long this stage took.
    """

    stage: str
    index: int
    completed: int
    total: int
    seconds: float


@dataclass(frozen=True, eq=False)
class GeneratedImage:
    """One generated image.

    Attributes:
        image: the decoded picture, already loaded.
        png: the PNG exactly as the server sent it, with the generation's metadata in text chunks.
        seed: the seed this image was generated from (reusing it reproduces the image).
        width, height: size in pixels.
        metadata: the PNG's text chunks; "prompt" (str), "seed" (int), and "parameters" and
            "models" (dicts decoded from JSON) when present, other chunks as strings.
    """

    image: Image.Image
    png: bytes = field(repr=False)
    seed: int
    width: int
    height: int
    metadata: dict[str, Any] = field(repr=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the PNG to `path` byte for byte, metadata included."""
        with open(path, "wb") as file:
            file.write(self.png)

    @classmethod
    def from_proto(cls, message: images_pb2.GeneratedImage) -> GeneratedImage:
        image = Image.open(io.BytesIO(message.png))
        image.load()
        return cls(
            image=image,
            png=message.png,
            seed=message.seed,
            width=message.width,
            height=message.height,
            metadata=_decode_metadata(dict(image.text)),
        )


def _decode_metadata(text: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(text)
    if "seed" in metadata:
        try:
            metadata["seed"] = int(metadata["seed"])
        except ValueError:
            pass  # not ours to reject: the image itself is fine, so keep the raw text
    for key in ("parameters", "models"):
        if key in metadata:
            try:
                metadata[key] = json.loads(metadata[key])
            except ValueError:
                pass
    return metadata


def images_from_response(response: images_pb2.GenerateResponse) -> list[GeneratedImage]:
    return [GeneratedImage.from_proto(image) for image in response.images]


def progress_from_proto(message: images_pb2.StageProgress) -> StageProgress:
    name = images_pb2.Stage.Name(message.stage) if message.stage in images_pb2.Stage.values() else "STAGE_UNKNOWN"
    return StageProgress(
        stage=name.removeprefix("STAGE_").lower(),
        index=message.stage_index,
        completed=message.completed_stages,
        total=message.total_stages,
        seconds=message.stage_seconds,
    )


def build_parameters(
    prompt: str,
    *,
    n: int,
    size: int | None,
    seed: int | None,
    prior_guidance_scale: float | None,
    decoder_guidance_scale: float | None,
    prior_steps: int | None,
    decoder_steps: int | None,
    upsampler_steps: int | None,
    sampler: str | None,
    prior_candidates: int | None,
) -> images_pb2.GenerationParameters:
    """The request's parameters; those left as None are not set, so the server's defaults apply.

    Raises ValueError or TypeError for values that cannot be sent at all (wrong type, negative,
    unknown sampler); ranges the models accept are for the server to check.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: must be a str, got {type(prompt).__name__}")
    if n < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    parameters = images_pb2.GenerationParameters(prompt=prompt, sampler=sampler_to_proto(sampler))
    given = {
        "n": n,
        "size": size,
        "seed": seed,
        "prior_guidance_scale": prior_guidance_scale,
        "decoder_guidance_scale": decoder_guidance_scale,
        "prior_steps": prior_steps,
        "decoder_steps": decoder_steps,
        "upsampler_steps": upsampler_steps,
        "prior_candidates": prior_candidates,
    }
    for name, value in given.items():
        if value is None:
            continue
        try:
            setattr(parameters, name, value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: cannot send {value!r}: {error}") from None
    return parameters


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries calls that fail with UNAVAILABLE."""

    retries: int
    backoff: float
    max_backoff: float

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoff and max_backoff: must be >= 0, got {self.backoff} and {self.max_backoff}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 = the first): "full jitter" backoff."""
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2**retry))


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout: must be > 0 seconds or None, got {timeout}")
    return timeout


class Attempts:
    """The attempts of one call: each one's time budget, whether and when to retry, the final error.

    Every attempt gets the time left until the call's deadline, so retries never stretch a call
    beyond the timeout its caller asked for.
    """

    def __init__(self, method: str, target: str, policy: RetryPolicy, timeout: float | None):
        self.method = method
        self.target = target
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.count = 0
        self._gave_up_at_deadline = False

    def start(self) -> float | None:
        """Count a new attempt and return its timeout: the time left, or None for no deadline."""
        self.count += 1
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def retry_delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to sleep before retrying after the attempt failed with `error`, or None to give up."""
        code, _ = _status_of(error)
        if code != grpc.StatusCode.UNAVAILABLE or self.count > self.policy.retries:
            return None
        delay = self.policy.delay(self.count - 1)
        # Sleeping past the deadline would only end in a timeout that hides the real failure.
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            self._gave_up_at_deadline = True
            return None
        return delay

    def error(self, rpc_error: grpc.RpcError) -> UnclipError:
        """The SDK error for the attempt that failed with `rpc_error` and was not retried."""
        code, details = _status_of(rpc_error)
        return self._error(code, details)

    def protocol_error(self, problem: str) -> UnclipError:
        """The SDK error for a server that answered, but not as the API says it must."""
        return self._error(grpc.StatusCode.INTERNAL, problem)

    def _error(self, code: grpc.StatusCode, details: str) -> UnclipError:
        message = f"{self.method} on {self.target} failed with {code.name}: {details or 'no details'}"
        if self._gave_up_at_deadline:
            message += f" (gave up after {self.count} attempts: the {self.timeout:g} s timeout would pass before the next attempt)"
        elif self.count > 1:
            message += f" (after {self.count} attempts)"
        return UnclipError(message, code=code, details=details, target=self.target, attempts=self.count)


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # grpc.RpcError itself promises nothing; the errors gRPC raises are also grpc.Call objects.
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return code or grpc.StatusCode.UNKNOWN, details or ""
