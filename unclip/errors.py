"""Errors raised by the core library, each tied to the gRPC status code a service answers with.

The core never imports grpc; `status_name` is the grpc.StatusCode member's name, looked up by
the serving layer, so one mapping serves every service.
"""


class UnclipError(Exception):
    status_name = "INTERNAL"


class InvalidArgument(UnclipError, ValueError):
    """The request is malformed: wrong shape, dtype, range, or non-finite values."""

    status_name = "INVALID_ARGUMENT"


class ResourceExhausted(UnclipError):
    """Too much queued work; the caller should back off and retry."""

    status_name = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(UnclipError):
    """The request's deadline passed; the work was stopped."""

    status_name = "DEADLINE_EXCEEDED"


class Cancelled(UnclipError):
    """The caller went away; the work was stopped."""

    status_name = "CANCELLED"


class Unavailable(UnclipError):
    """A model is not loaded yet, or a downstream service or store cannot be reached."""

    status_name = "UNAVAILABLE"


_BY_STATUS = {cls.status_name: cls for cls in (InvalidArgument, ResourceExhausted, DeadlineExceeded, Cancelled, Unavailable)}


def error_for_status(status_name: str, message: str) -> UnclipError:
    """The error for a gRPC status received from another service, so it propagates unchanged."""
    return _BY_STATUS.get(status_name, UnclipError)(message)
