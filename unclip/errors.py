"""Errors, each tied to the gRPC status code it stands for: one set for the server and the SDK.

A service raises them and answers with their status; the gateway turns a stage's status back
into the same error; the client SDK raises them for a failed call, with where and how often it
called. `status_name` is the grpc.StatusCode member's name, so this module imports no grpc.
"""

from __future__ import annotations

from typing import Any


class UnclipError(Exception):
    """A request failed. `status_name` names its gRPC status code ("INVALID_ARGUMENT", ...).

    Raised by the client SDK, an error also says where it went wrong:

    Attributes:
        details: the server's (or gRPC's) own description of the failure.
        target: the address the client called; None for an error raised in this process.
        attempts: how many times the call was tried.
        request_id: the id the server answered the failed call under (its `x-request-id`, the
            key to its log lines); None when it sent none.
    """

    status_name = "INTERNAL"

    def __init__(
        self,
        message: str = "",
        *,
        status_name: str | None = None,
        details: str | None = None,
        target: str | None = None,
        attempts: int = 1,
        request_id: str | None = None,
    ):
        super().__init__(message)
        if status_name is not None:
            self.status_name = status_name  # a status without a class of its own (NOT_FOUND, UNKNOWN, ...)
        self.details = message if details is None else details
        self.target = target
        self.attempts = attempts
        self.request_id = request_id

    @property
    def code(self) -> Any:
        """The `grpc.StatusCode` (grpc is imported only when this is read)."""
        import grpc

        return grpc.StatusCode[self.status_name]


class InvalidArgument(UnclipError, ValueError):
    """The request is malformed: wrong shape, dtype, range, or non-finite values."""

    status_name = "INVALID_ARGUMENT"


class FailedPrecondition(UnclipError):
    """The request is well formed but the deployed models cannot serve it (e.g. an image
    operation with weights that have no image encoder)."""

    status_name = "FAILED_PRECONDITION"


class ResourceExhausted(UnclipError):
    """Too much queued work; the caller should back off and retry.

    `retry_after`: the seconds the server suggests waiting (HTTP answers it as Retry-After);
    None when it suggests nothing."""

    status_name = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str = "", *, retry_after: float | None = None, **call: Any):
        super().__init__(message, **call)
        self.retry_after = retry_after


class DeadlineExceeded(UnclipError):
    """The request's deadline passed; the work was stopped."""

    status_name = "DEADLINE_EXCEEDED"


class Cancelled(UnclipError):
    """The caller went away; the work was stopped."""

    status_name = "CANCELLED"


class Unavailable(UnclipError):
    """A model is not loaded yet, or a downstream service or store cannot be reached."""

    status_name = "UNAVAILABLE"


class Unauthenticated(UnclipError):
    """The call carries no API key, or one the gateway does not know.

    Keys go in `authorization: Bearer <key>` metadata; `Client(api_key=...)` sends it."""

    status_name = "UNAUTHENTICATED"


_BY_STATUS: dict[str, type[UnclipError]] = {
    cls.status_name: cls
    for cls in (InvalidArgument, FailedPrecondition, ResourceExhausted, DeadlineExceeded, Cancelled, Unavailable, Unauthenticated)
}


def error_for_status(status_name: str, message: str, **call: Any) -> UnclipError:
    """The error for a status received from another service, so it propagates unchanged.

    `call`: the keyword attributes of `UnclipError` (details, target, attempts).
    """
    cls = _BY_STATUS.get(status_name)
    if cls is None:
        return UnclipError(message, status_name=status_name, **call)
    return cls(message, **call)
