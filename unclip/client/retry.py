"""Timeouts and retries: how long each attempt of a call may take, and when to try again.

Nothing here talks to the network, so the sync and async clients wrap the same logic around
their own way of calling and sleeping.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc

from unclip.errors import UnclipError, error_for_status
from unclip.transport import REQUEST_ID_HEADER


class _Default(enum.Enum):
    """Type of the `DEFAULT` sentinel (an enum so type checkers can narrow it)."""

    TOKEN = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.TOKEN
"""Passed as a method's `timeout` (the default): use the timeout the client was created with."""

Timeout = float | None | _Default


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
        self._retried: str | None = None  # the details of the last failure that was retried

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
        self._retried = error.details() if callable(getattr(error, "details", None)) else str(error)
        return delay

    def failed(self, error: grpc.RpcError, *, retryable: bool = True) -> float:
        """Seconds to sleep before the next attempt; raises the call's UnclipError instead when
        the failure is not retried (or `retryable` is False: a stream that has sent events)."""
        delay = self.retry_delay(error) if retryable else None
        if delay is None:
            raise self.error(error) from error
        return delay

    def error(self, rpc_error: grpc.RpcError) -> UnclipError:
        """The error for the attempt that failed with `rpc_error` and was not retried: the
        `unclip.errors` class of its status code."""
        code, details = _status_of(rpc_error)
        return self._error(code, details, _request_id_of(rpc_error))

    def protocol_error(self, problem: str) -> UnclipError:
        """The error for a server that answered, but not as the API says it must."""
        return self._error(grpc.StatusCode.INTERNAL, problem)

    def _error(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> UnclipError:
        message = f"{self.method} on {self.target} failed with {code.name}: {details or 'no details'}"
        if request_id:
            message += f" [request id {request_id}]"
        if self._gave_up_at_deadline:
            message += (
                f" (gave up after {self.count} attempts: the {self.timeout:g} s timeout would pass before the next attempt)"
            )
        elif self.count > 1:
            message += f" (after {self.count} attempts)"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._retried is not None:
                # The deadline passed during a retry: the failure that caused the retries is the news.
                message += f"; the earlier attempts failed with UNAVAILABLE: {self._retried or 'no details'}"
        return error_for_status(
            code.name, message, details=details, target=self.target, attempts=self.count, request_id=request_id
        )


def _request_id_of(error: grpc.RpcError) -> str | None:
    """The request id the server put in the failed call's trailing metadata, if any."""
    trailing: Any = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    return next((value for key, value in trailing or () if key == REQUEST_ID_HEADER and isinstance(value, str)), None)


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # grpc.RpcError itself promises nothing; the errors gRPC raises are also grpc.Call objects.
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return code or grpc.StatusCode.UNKNOWN, details or ""
