"""What both clients hold: the target, the default timeout, the retry policy, the metadata (routing, API key)."""

from __future__ import annotations

import grpc

from unclip.client.retry import DEFAULT, RetryPolicy, Timeout, check_timeout


class ClientBase:
    """The settings `Client` and `AsyncClient` share; see `Client` for the arguments."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 300.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        application: str | None = None,
        api_key: str | None = None,
    ):
        self.target = target
        self.timeout = check_timeout(timeout)
        self._policy = RetryPolicy(retries, backoff, max_backoff)
        metadata = [("application", application)] if application else []
        if api_key:
            if not api_key.isascii() or any(c.isspace() or not c.isprintable() for c in api_key):
                raise ValueError("api_key: must be printable ASCII without spaces")  # the message never echoes the key
            metadata.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(metadata) or None
        self._credentials = credentials
        self._connect()

    def _connect(self) -> None:
        """Open the channel (or prepare to, for a channel that belongs to an event loop)."""
        raise NotImplementedError

    def _resolve(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT else check_timeout(timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout})"
