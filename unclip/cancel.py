"""Cooperative cancellation for long-running model calls (no torch, so the gateway can use it)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from unclip.errors import Cancelled, DeadlineExceeded

T = TypeVar("T")


@dataclass
class CancelToken:
    """Checked by samplers between steps; set by the service when the caller goes away."""

    deadline: float | None = None  # time.monotonic() value
    event: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def with_timeout(cls, seconds: float | None) -> CancelToken:
        return cls(deadline=None if seconds is None else time.monotonic() + seconds)

    def cancel(self) -> None:
        self.event.set()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.event.is_set():
            raise Cancelled("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the deadline passed before sampling finished")


async def run_cancellable(call: Callable[[CancelToken], T], cancel: CancelToken, executor: Executor | None = None) -> T:
    """Run `call(cancel)` on a worker thread. A thread cannot be interrupted, so when the awaiting
    task is cancelled (the caller went away) the token is set and the sampler stops at its next step."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, call, cancel)
    except asyncio.CancelledError:
        cancel.cancel()
        raise
