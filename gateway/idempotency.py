"""Requests with an idempotency key: generated once, whichever gateway replica they reach.

Replicas that share one bucket coordinate through it alone (`unclip.storage`):

1. A stored record answers the request (a retry, or a concurrent twin that finished first).
2. Otherwise the request takes the result's lease, an object created only if absent
   (`If-None-Match: *`), and generates; a lease whose holder stopped renewing it (a replica that
   died) expires after LEASE_TTL_SECONDS and is taken over (`If-Match` on the expired version).
   A request that finds the lease held waits for the record, polling, until its deadline.
3. The holder saves with its own writer id: its images under a folder no one else writes, its
   record created only if none exists. Should two writers still get there (a holder so slow that
   its lease was taken over), one record wins; the loser removes its own objects, never the
   winner's, and answers with the winner's result.

The lease only avoids generating twice; correctness rests on the conditional record, so a lease
lost to clock skew or a store that ignores conditional deletes costs work, never a mixed result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from unclip.errors import DeadlineExceeded, Unavailable

if TYPE_CHECKING:
    from unclip.storage import Lease, ResultStore, StoredResult

log = logging.getLogger("unclip.gateway")
T = TypeVar("T")

# A holder renews its lease every LEASE_RENEW_SECONDS for another LEASE_TTL_SECONDS, so a replica
# that dies holding one delays its key's retries by at most LEASE_TTL_SECONDS. Replicas' clocks
# must agree to well within LEASE_TTL_SECONDS - LEASE_RENEW_SECONDS (NTP keeps them to milliseconds).
LEASE_TTL_SECONDS = 30.0
LEASE_RENEW_SECONDS = 10.0
# How often a request waiting for another's result looks for its record: at first quickly, since
# most twins are retries of a request about to finish, then at most every POLL_MAX_SECONDS.
POLL_FIRST_SECONDS = 0.1
POLL_MAX_SECONDS = 1.0
# What the caller is told when the store fails before any work; the details (host, bucket) go to the log.
STORE_DOWN = "the object store is unavailable; a request with an idempotency key needs it: retry"


async def once(
    store: ResultStore,
    request_id: str,
    deadline: float | None,
    answer_stored: Callable[[StoredResult], T],
    generate: Callable[[str], Awaitable[T]],
) -> T:
    """The stored result of `request_id` (through `answer_stored`), or `generate(writer)`'s,
    generated under the result's lease; `generate` saves with `writer`. `deadline`: a
    time.monotonic() value past which waiting for another request's result is given up."""
    from unclip.storage import new_writer

    writer = new_writer()
    poll = POLL_FIRST_SECONDS
    while True:
        stored = await _store_call(request_id, store.load(request_id))
        if stored is not None:
            return answer_stored(stored)
        lease = await _store_call(request_id, store.acquire_lease(request_id, writer, LEASE_TTL_SECONDS))
        if lease is not None:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise DeadlineExceeded(
                "another request with this idempotency key is still generating its result; retry with the same key to get it"
            )
        await asyncio.sleep(poll if left is None else min(poll, left))
        poll = min(POLL_MAX_SECONDS, poll * 2)
    async with _held(store, lease) as held:
        # Its holder may have saved the record and let go between this request's load and its lease.
        stored = await _store_call(request_id, store.load(request_id))
        if stored is not None:
            return answer_stored(stored)
        log.info("result %s: generating under lease %s", request_id, held[0].etag)
        return await generate(writer)


async def _store_call(request_id: str, call: Awaitable[T]) -> T:
    """`call`'s result; a store failure becomes STORE_DOWN for the caller, logged with its details."""
    try:
        return await call
    except Unavailable as error:
        log.warning("idempotent request %s: %s", request_id, error)
        raise Unavailable(STORE_DOWN) from None


@contextlib.asynccontextmanager
async def _held(store: ResultStore, lease: Lease) -> AsyncIterator[list[Lease]]:
    """The lease, renewed in the background while the body runs and released after it. Yields
    a one-item list holding the lease's current version."""
    current = [lease]

    async def renew() -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            try:
                renewed = await store.renew_lease(current[0], LEASE_TTL_SECONDS)
            except Exception as error:  # noqa: BLE001 - a failed renewal is retried; the lease may yet expire
                log.warning("could not renew the lease %s: %s", current[0].key, error)
                continue
            if renewed is None:
                # Taken over: the other writer or this one saves first; the loser answers with the winner's result.
                log.warning("lost the lease %s to another writer", current[0].key)
                return
            current[0] = renewed

    renewing = asyncio.ensure_future(renew())
    try:
        yield current
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        # Shielded: a request cancelled by its caller still lets go, so a retry need not wait for expiry.
        await asyncio.shield(store.release_lease(current[0]))
