"""Idempotency keys across gateway replicas that share one bucket (gateway.idempotency,
unclip.storage's leases and exclusive saves), against a real S3 server (SeaweedFS) on loopback:
each "replica" is an ImageAPI with its own ResultStore and its own stage backend without models
(tests/fake_stages.py), so the bucket is all they share."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
import urllib3
from fake_stages import FakeStages
from s3server import s3_server_fixture

from gateway import idempotency
from gateway.api import ImageAPI, RequestOptions
from gateway.auth import Access
from gateway.quotas import QuotaLimits
from unclip.calls import DecodeCall
from unclip.errors import DeadlineExceeded, Unavailable
from unclip.parameters import GenerationParameters
from unclip.storage import LEASE_NAME, RECORD_NAME, ResultExists, ResultStore, StorageConfig, new_writer

# Starts a SeaweedFS server.
pytestmark = pytest.mark.slow

s3_server = s3_server_fixture("module")
BUCKET = "shared-results"


def store_of(server) -> ResultStore:
    return ResultStore(StorageConfig(server.endpoint, server.access_key, server.secret_key, bucket=BUCKET))


def objects_under(server, prefix: str) -> list[str]:
    return sorted(o.object_name for o in server.client().list_objects(BUCKET, prefix=prefix, recursive=True))


def decodes(stages: FakeStages) -> int:
    return sum(isinstance(call, DecodeCall) for call in stages.calls)


def params(seed: int = 1) -> GenerationParameters:
    return GenerationParameters(prompt="a red circle", n=2, size=32, seed=seed)


def test_s3_server_honours_conditional_writes(s3_server):
    """What the scheme rests on: a create with If-None-Match: * succeeds once, even when many race."""
    store = store_of(s3_server)
    store._ensure_bucket()
    key = "probe/conditional"
    assert store._put_conditional(key, b"one", {"If-None-Match": "*"}, "text/plain")[0]
    assert not store._put_conditional(key, b"two", {"If-None-Match": "*"}, "text/plain")[0]
    assert s3_server.client().get_object(BUCKET, key).read() == b"one"

    async def race(name: str) -> list[bool]:
        return await asyncio.gather(
            *(asyncio.to_thread(store._put_conditional, name, b"%d" % i, {"If-None-Match": "*"}, "text/plain") for i in range(8))
        )

    for round_ in range(3):
        created = [ok for ok, _ in asyncio.run(race(f"probe/race-{round_}"))]
        assert created.count(True) == 1


def test_two_replicas_generate_once_and_both_answer_with_the_stored_result(s3_server):
    stages = [FakeStages(), FakeStages()]

    async def scenario():
        replicas = [ImageAPI(backend, store_of(s3_server)) for backend in stages]
        for backend in stages:
            backend.hold()  # whichever replica takes the lease waits in its stages; the other must wait for it
        options = RequestOptions(idempotency_key="same-key")
        calls = [asyncio.ensure_future(api.generate(params(), options)) for api in replicas]
        await asyncio.sleep(1.0)  # both have looked: one holds the lease, the other polls for the record
        assert sum(decodes(backend) for backend in stages) == 0 and not any(call.done() for call in calls)
        for backend in stages:
            backend.release()
        return await asyncio.gather(*calls)

    first, second = asyncio.run(scenario())
    assert sum(decodes(backend) for backend in stages) == 1  # generated once, by one replica
    assert first.request_id == second.request_id
    assert [i.png for i in first.images] == [i.png for i in second.images]
    names = objects_under(s3_server, f"results/{first.request_id}/")
    assert len(names) == 3 and names[-1].endswith(RECORD_NAME)  # two images and the record: no lease left
    assert not any(name.endswith(LEASE_NAME) for name in names)


def test_idempotency_keys_are_scoped_to_the_api_key(s3_server, tmp_path):
    from gateway.auth import KeysFile

    keys_file = KeysFile(tmp_path / "keys.json")
    _, key_a = keys_file.create("a")
    _, key_b = keys_file.create("b", QuotaLimits(images_per_minute=2))
    access = Access.from_file(keys_file.path)
    stages = FakeStages()
    api = ImageAPI(stages, store_of(s3_server), access=access)
    options = RequestOptions(idempotency_key="shared-key")

    async def as_caller(key: str, seed: int):
        access.authenticate({"authorization": f"Bearer {key}"})  # in this task's context only, as a request's
        return await api.generate(params(seed), options)

    async def scenario():
        a = await asyncio.ensure_future(as_caller(key_a, 1))
        b = await asyncio.ensure_future(as_caller(key_b, 2))  # another key, other parameters: no conflict
        b_again = await asyncio.ensure_future(as_caller(key_b, 2))  # a retry answered from storage ...
        b_third = await asyncio.ensure_future(as_caller(key_b, 2))  # ... gives its images back to the quota
        return a, b, b_again, b_third

    a, b, b_again, b_third = asyncio.run(scenario())
    assert a.request_id != b.request_id and [i.png for i in a.images] != [i.png for i in b.images]
    assert b_again.request_id == b_third.request_id == b.request_id
    assert decodes(stages) == 2


def test_a_writer_that_loses_removes_only_its_own_objects(s3_server):
    winner, loser = store_of(s3_server), store_of(s3_server)
    request_id = "idem-exclusive-1"

    async def save(store, writer, png):
        return await store.save(request_id, [png, png], {"fingerprint": "f"}, writer=writer)

    winner_keys = asyncio.run(save(winner, new_writer(), b"winner"))
    with pytest.raises(ResultExists):
        asyncio.run(save(loser, new_writer(), b"loser"))
    assert objects_under(s3_server, f"results/{request_id}/") == sorted([*winner_keys, f"results/{request_id}/{RECORD_NAME}"])
    stored = asyncio.run(loser.load(request_id))
    assert stored is not None and stored.images == [b"winner", b"winner"]


def test_a_failed_record_write_never_deletes_the_winners_objects(s3_server, monkeypatch):
    """The loser's record PUT fails without an answer (it may or may not have landed): it finds
    the winner's record, removes its own objects, and the winner's result stays whole."""
    winner, loser = store_of(s3_server), store_of(s3_server)
    request_id = "idem-exclusive-2"
    winner_keys = asyncio.run(winner.save(request_id, [b"winner"], {"fingerprint": "f"}, writer=new_writer()))
    put = loser._put_conditional

    def reset_on_the_record(key, data, conditions, content_type):
        if key.endswith(RECORD_NAME):
            raise urllib3.exceptions.ProtocolError("connection reset while writing the record")
        return put(key, data, conditions, content_type)

    monkeypatch.setattr(loser, "_put_conditional", reset_on_the_record)
    with pytest.raises(ResultExists):
        asyncio.run(loser.save(request_id, [b"loser"], {"fingerprint": "f"}, writer=new_writer()))
    assert objects_under(s3_server, f"results/{request_id}/") == sorted([*winner_keys, f"results/{request_id}/{RECORD_NAME}"])

    # With no winner, the failed writer leaves nothing behind and says the store failed.
    with pytest.raises(Unavailable):
        asyncio.run(loser.save("idem-exclusive-3", [b"loser"], {"fingerprint": "f"}, writer=new_writer()))
    assert objects_under(s3_server, "results/idem-exclusive-3/") == []


def test_leases_expire_and_are_taken_over_once(s3_server):
    a, b, c = store_of(s3_server), store_of(s3_server), store_of(s3_server)

    async def scenario():
        held = await a.acquire_lease("idem-lease-1", "aaaa", 1.0)
        assert held is not None
        assert await b.acquire_lease("idem-lease-1", "bbbb", 30.0) is None  # live: not taken
        await asyncio.sleep(1.2)
        # Expired: two replicas try to take it over at once; one gets it.
        taken = await asyncio.gather(b.acquire_lease("idem-lease-1", "bbbb", 30.0), c.acquire_lease("idem-lease-1", "cccc", 30.0))
        assert sum(lease is not None for lease in taken) == 1
        assert await a.renew_lease(held, 30.0) is None  # the old holder learns it lost the lease
        await a.release_lease(held)  # and cannot release the new holder's
        owner = json.loads(s3_server.client().get_object(BUCKET, "results/idem-lease-1/" + LEASE_NAME).read())["owner"]
        new = next(lease for lease in taken if lease is not None)
        assert owner == new.owner
        await (b if new.owner == "bbbb" else c).release_lease(new)
        assert objects_under(s3_server, "results/idem-lease-1/") == []

    asyncio.run(scenario())


def test_a_lease_left_by_a_dead_replica_delays_a_retry_by_at_most_its_ttl(s3_server):
    stages = FakeStages()

    async def scenario():
        api = ImageAPI(stages, store_of(s3_server))
        dead = store_of(s3_server)
        request_id = "idem-" + hashlib.sha256(b"orphaned-key").hexdigest()[:40]
        assert await dead.acquire_lease(request_id, "dead0000", 1.5) is not None  # then it "dies": no renewal
        started = asyncio.get_running_loop().time()
        result = await api.generate(params(), RequestOptions(idempotency_key="orphaned-key"))
        return result, asyncio.get_running_loop().time() - started

    result, waited = asyncio.run(scenario())
    assert decodes(stages) == 1 and len(result.images) == 2
    assert 1.0 <= waited < 1.5 + idempotency.POLL_MAX_SECONDS + 5


def test_a_waiter_gives_up_at_its_deadline(s3_server):
    async def scenario():
        api = ImageAPI(FakeStages(), store_of(s3_server))
        holder = store_of(s3_server)
        request_id = "idem-" + hashlib.sha256(b"busy-key").hexdigest()[:40]
        assert await holder.acquire_lease(request_id, "busy0000", 30.0) is not None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 0.5
        started = loop.time()
        with pytest.raises(DeadlineExceeded, match="still generating") as info:
            await api.generate(params(), RequestOptions(idempotency_key="busy-key", deadline=deadline))
        return info.value, loop.time() - started

    _, waited = asyncio.run(scenario())
    assert waited < 3


def test_the_store_down_is_unavailable_before_any_work():
    stages = FakeStages()
    dead = ResultStore(StorageConfig("127.0.0.1:9", "ak", "sk", bucket=BUCKET))
    with pytest.raises(Unavailable) as info:
        asyncio.run(ImageAPI(stages, dead).generate(params(), RequestOptions(idempotency_key="k")))
    assert "127.0.0.1:9" not in str(info.value) and BUCKET not in str(info.value)  # the details go to the log
    assert decodes(stages) == 0
