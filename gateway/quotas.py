"""Per-API-key quotas in the gateway: images per minute and concurrent requests.

Each key's limits come from the keys file (`gateway.auth`), or else from the gateway's defaults
(`unclip serve --images-per-minute/--max-concurrent-per-key`). The counts live in this process:
with several gateway replicas each replica counts on its own, so a key gets up to the limit
from each replica it reaches (docs/security.md, "Quotas with several replicas").

- Concurrent requests: a key's request past its limit is refused at once.
- Images per minute: a token bucket per key that holds at most the per-minute limit and refills
  at limit/60 images a second, so a key may spend a minute's images in one burst and then gets
  them back steadily. A request takes all its images (n, or the frames of an interpolation or
  text diff) when it starts generating (`charge_current`), so a retry that an idempotency key
  answers from storage costs none, and can fetch its result even when the key's minute is spent.

Over a limit: RESOURCE_EXHAUSTED (HTTP 429) with how long to wait (gRPC: a RetryInfo detail;
HTTP: Retry-After). A request that asks for more images than the key may make in a minute could
never be admitted: INVALID_ARGUMENT (HTTP 400).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from unclip.errors import InvalidArgument, ResourceExhausted

# What a caller over its concurrency limit is told to wait: a slot frees as soon as one of its
# requests ends, which the gateway cannot foresee.
CONCURRENCY_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class QuotaLimits:
    """A key's limits; None: no limit."""

    images_per_minute: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("images_per_minute", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be a positive integer or unset, got {value!r}")

    def over(self, defaults: QuotaLimits) -> QuotaLimits:
        """These limits, with `defaults` where these have none."""
        return QuotaLimits(
            self.images_per_minute if self.images_per_minute is not None else defaults.images_per_minute,
            self.max_concurrent if self.max_concurrent is not None else defaults.max_concurrent,
        )


@dataclass
class _KeyUsage:
    in_flight: int = 0
    tokens: float = 0.0  # images the key may still start now
    refilled_at: float = 0.0  # time.monotonic() of the last refill
    started: bool = False  # a new key starts with a full bucket


@dataclass
class _Charge:
    """The images an admitted request will take from its key's bucket once it generates."""

    quotas: Quotas
    usage: _KeyUsage
    per_minute: int
    images: int
    taken: bool = False

    def take(self) -> None:
        if not self.taken:
            self.quotas._take(self.usage, self.per_minute, self.images)
            self.taken = True


_current_charge: ContextVar[_Charge | None] = ContextVar("unclip_quota_charge", default=None)


def charge_current() -> None:
    """Take the images of the request being answered in this context from its key's bucket, as it
    starts to generate; ResourceExhausted when they are not there. Does nothing outside an
    admitted request, or for a key without an images-per-minute limit."""
    charge = _current_charge.get()
    if charge is not None:
        charge.take()


@dataclass
class Quotas:
    """Every key's usage in this process. Everything runs on one event loop, so plain counters
    need no lock. `clock` is for tests."""

    clock: Callable[[], float] = time.monotonic
    _usage: dict[str, _KeyUsage] = field(default_factory=dict)

    @contextlib.contextmanager
    def admitted(self, key_id: str, limits: QuotaLimits, images: int) -> Iterator[None]:
        """Hold one of the key's concurrent slots for as long as the request runs, and let it take
        `images` from the key's bucket when it generates (`charge_current`); ResourceExhausted
        (with retry_after) when the slots are used up. A request for more images than the key
        may make in a minute is InvalidArgument at once: no wait would let it through."""
        usage = self._usage.setdefault(key_id, _KeyUsage())
        if limits.max_concurrent is not None and usage.in_flight >= limits.max_concurrent:
            raise ResourceExhausted(
                f"this API key has its limit of {limits.max_concurrent} concurrent requests in flight; "
                f"retry in {CONCURRENCY_RETRY_SECONDS:g} s",
                retry_after=CONCURRENCY_RETRY_SECONDS,
            )
        charge = None
        if limits.images_per_minute is not None:
            if images > limits.images_per_minute:
                raise InvalidArgument(
                    f"the request makes {images} images, more than this API key may make in a minute "
                    f"({limits.images_per_minute}); ask for fewer"
                )
            charge = _Charge(self, usage, limits.images_per_minute, images)
        usage.in_flight += 1
        token = _current_charge.set(charge)
        try:
            yield
        finally:
            usage.in_flight -= 1
            with contextlib.suppress(ValueError):  # reset from another context: it ends anyway
                _current_charge.reset(token)

    def _take(self, usage: _KeyUsage, per_minute: int, images: int) -> None:
        now = self.clock()
        if not usage.started:
            usage.started, usage.tokens = True, float(per_minute)
        else:
            usage.tokens = min(float(per_minute), usage.tokens + (now - usage.refilled_at) * per_minute / 60.0)
        usage.refilled_at = now
        if usage.tokens < images:
            wait = (images - usage.tokens) * 60.0 / per_minute
            raise ResourceExhausted(
                f"this API key has used its {per_minute} images per minute; retry in {math.ceil(wait)} s",
                retry_after=wait,
            )
        usage.tokens -= images
