"""ResultStore against a real S3 server (SeaweedFS on loopback): layout, round trip, presigned URLs,
atomicity of a failed save, outages and bad credentials."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace

import pytest
from PIL import Image
from s3server import S3Server, free_ports, running_s3_server, s3_server_fixture

from unclip import storage
from unclip.errors import Unavailable
from unclip.storage import ResultStore, StorageConfig

# Starts a SeaweedFS server.
pytestmark = pytest.mark.slow

s3_server = s3_server_fixture(scope="module")


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png("red"), png("green"), png("blue"), png("white")]
GIF = b"GIF89a" + bytes(range(32))


def config_for(server: S3Server, **overrides) -> StorageConfig:
    return StorageConfig(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key, **overrides)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_save_creates_bucket_and_load_round_trips(s3_server: S3Server):
    config = config_for(s3_server, bucket="fresh-bucket")
    client = s3_server.client()
    assert not client.bucket_exists("fresh-bucket")
    record = {"prompt": "a red circle", "seed": 7, "params": {"steps": [3, 3, 2]}}

    async def scenario():
        store = ResultStore(config)
        try:
            keys = await store.save("req-1", IMAGES[:3], record, extras={"animation.gif": (GIF, "image/gif")})
            return keys, await store.load("req-1")
        finally:
            await store.close()

    keys, loaded = asyncio.run(scenario())
    assert client.bucket_exists("fresh-bucket")
    assert keys == [f"results/req-1/image-{i}.png" for i in range(3)]
    assert loaded.request_id == "req-1"
    assert loaded.keys == keys
    assert loaded.images == IMAGES[:3]
    assert loaded.record == {**record, "image_keys": keys, "extra_keys": {"animation.gif": "results/req-1/animation.gif"}}
    content_types = {obj.object_name: client.stat_object("fresh-bucket", obj.object_name).content_type
                     for obj in client.list_objects("fresh-bucket", prefix="results/req-1/", recursive=True)}  # fmt: skip
    assert content_types == {
        **{key: "image/png" for key in keys},
        "results/req-1/animation.gif": "image/gif",
        "results/req-1/record.json": "application/json",
    }
    assert client.get_object("fresh-bucket", "results/req-1/animation.gif").read() == GIF


def test_concurrent_stores_share_a_new_bucket(s3_server: S3Server):
    config = config_for(s3_server, bucket="raced-bucket", prefix="p/")

    async def scenario():
        stores = [ResultStore(config) for _ in range(3)]
        try:
            await asyncio.gather(*(store.save(f"r{i}", IMAGES[i : i + 1], {"i": i}) for i, store in enumerate(stores)))
            return [await stores[0].load(f"r{i}") for i in range(3)]
        finally:
            for store in stores:
                await store.close()

    loaded = asyncio.run(scenario())
    assert [result.images for result in loaded] == [[IMAGES[0]], [IMAGES[1]], [IMAGES[2]]]
    assert [result.keys for result in loaded] == [[f"p/r{i}/image-0.png"] for i in range(3)]


def test_presigned_urls_fetch_sign_for_the_public_host_and_expire(s3_server: S3Server):
    async def save(store: ResultStore) -> list[str]:
        try:
            return await store.save("presign", IMAGES[:2], {})
        finally:
            await store.close()

    store = ResultStore(config_for(s3_server))
    keys = asyncio.run(save(store))
    assert fetch(store.presigned_url(keys[1])) == IMAGES[1]

    public = f"localhost:{s3_server.port}"
    url = ResultStore(config_for(s3_server, public_endpoint=public)).presigned_url(keys[0])
    assert urllib.parse.urlsplit(url).netloc == public
    assert urllib.parse.urlsplit(url).scheme == "http"
    assert fetch(url) == IMAGES[0]
    # The host is signed: the same URL sent to another name for the same server is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(url.replace(public, s3_server.endpoint))
    assert refused.value.code == 403

    short = ResultStore(config_for(s3_server, url_expiry_seconds=1)).presigned_url(keys[0])
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as expired:
        fetch(short)
    assert expired.value.code == 403


class FailingBytes(bytes):
    """PNG bytes that fail when the store measures them, i.e. in the middle of the save's uploads."""

    def __len__(self) -> int:
        raise RuntimeError("image 2 could not be read")


def test_a_failed_save_leaves_nothing_behind(s3_server: S3Server):
    async def scenario():
        store = ResultStore(config_for(s3_server))
        try:
            with pytest.raises(RuntimeError, match="image 2"):
                await store.save("half", [IMAGES[0], IMAGES[1], FailingBytes(IMAGES[2]), IMAGES[3]], {"x": 1})
            return await store.load("half")
        finally:
            await store.close()

    assert asyncio.run(scenario()) is None
    assert list(s3_server.client().list_objects("unclip", prefix="results/half/", recursive=True)) == []


class Link:
    """A TCP proxy on loopback in front of the S3 server whose link can be cut: then it closes every
    connection, and each new one at once, so the store's requests fail without an answer (and
    never reach the server). `cut_at(marker)` cuts it when a request naming `marker` comes
    through, before that request is passed on."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._cut, self._stopped = threading.Event(), threading.Event()
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def cut_at(self, marker: bytes) -> None:
        self._marker = marker

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            self._shut(sock)

    def restore(self) -> None:
        self._marker = None
        self._cut.clear()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()
        self.cut()

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv, which close alone would not
        sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            if self._cut.is_set():
                self._shut(client)
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink, requests in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, requests), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if requests and self._marker is not None and self._marker in chunk:
                    self.cut()
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            self._open -= {source, sink}
        self._shut(source)
        self._shut(sink)


@pytest.fixture
def link(s3_server: S3Server):
    proxy = Link(s3_server.endpoint)
    yield proxy
    proxy.close()


def _objects(server: S3Server, bucket: str, prefix: str) -> list[str]:
    return sorted(o.object_name for o in server.client().list_objects(bucket, prefix=prefix, recursive=True))


def _wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


async def _save_cut_at_second_image(store: ResultStore, link: Link, request_id: str) -> None:
    """A save whose first image lands and whose second finds the store gone; its cleanup, too."""
    link.cut_at(f"{request_id}/image-1.png".encode())
    with pytest.raises(Unavailable, match="unreachable"):
        await store.save(request_id, IMAGES[:3], {"x": 1})


def test_a_cleanup_the_store_could_not_take_is_retried_until_it_can(s3_server: S3Server, link: Link, caplog):
    caplog.set_level(logging.INFO, logger="unclip.storage")
    config = replace(config_for(s3_server, bucket="cut-retried"), endpoint=link.endpoint)

    async def scenario():
        store = ResultStore(config)
        try:
            await store.save("before-cut", IMAGES[:1], {})  # makes the bucket
            await _save_cut_at_second_image(store, link, "cut-1")
            # The store is down: its first image stays for now, without a record.
            assert _objects(s3_server, "cut-retried", "results/cut-1/") == ["results/cut-1/image-0.png"]
            await asyncio.sleep(2.5)  # a retry or two fail meanwhile
            assert _objects(s3_server, "cut-retried", "results/cut-1/") == ["results/cut-1/image-0.png"]
            link.restore()
            # Back: removed by the store's own retries, while it stays open.
            await asyncio.to_thread(
                _wait_for, lambda: not _objects(s3_server, "cut-retried", "results/cut-1/"), "the orphan removed", 30
            )
            assert await store.load("cut-1") is None
        finally:
            await store.close()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "unclip.storage"]
    assert any("result cut-1" in m and "removing them again in the background" in m for m in messages)
    assert any("result cut-1" in m and "again in" in m for m in messages)  # a retry that failed
    assert any("result cut-1: removed the objects" in m for m in messages)


def test_closing_the_store_finishes_a_pending_cleanup(s3_server: S3Server, link: Link):
    config = replace(config_for(s3_server, bucket="cut-closed"), endpoint=link.endpoint)

    async def scenario():
        store = ResultStore(config)
        await store.save("before-cut", IMAGES[:1], {})
        await _save_cut_at_second_image(store, link, "cut-2")
        assert _objects(s3_server, "cut-closed", "results/cut-2/") == ["results/cut-2/image-0.png"]
        link.restore()
        started = time.monotonic()
        await store.close()
        return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    assert _objects(s3_server, "cut-closed", "results/cut-2/") == []  # gone when close returns
    assert elapsed < storage.CLEANUP_DRAIN_SECONDS + 1


def test_a_cleanup_gives_up_after_its_tries(s3_server: S3Server, link: Link, caplog, monkeypatch):
    monkeypatch.setattr(storage, "CLEANUP_FIRST_DELAY", 0.05)
    monkeypatch.setattr(storage, "CLEANUP_ATTEMPTS", 3)
    caplog.set_level(logging.INFO, logger="unclip.storage")
    config = replace(config_for(s3_server, bucket="cut-given-up"), endpoint=link.endpoint)

    def gave_up() -> bool:
        return any("result cut-3: gave up" in r.getMessage() for r in caplog.records)

    async def scenario():
        store = ResultStore(config)
        try:
            await store.save("before-cut", IMAGES[:1], {})
            await _save_cut_at_second_image(store, link, "cut-3")
            await asyncio.to_thread(_wait_for, gave_up, "giving up", 30)
            link.restore()
            await asyncio.sleep(1.0)
        finally:
            await store.close()  # nothing pending any more: returns at once

    asyncio.run(scenario())
    message = next(r.getMessage() for r in caplog.records if "result cut-3: gave up" in r.getMessage())
    assert "after 3 tries" in message and "results/cut-3/image-0.png" in message
    # Left as it was: an unreferenced object, never a visible result.
    assert _objects(s3_server, "cut-given-up", "results/cut-3/") == ["results/cut-3/image-0.png"]


def test_load_of_an_unknown_result_is_none(s3_server: S3Server):
    async def scenario():
        missing_bucket, store = ResultStore(config_for(s3_server, bucket="never-created")), ResultStore(config_for(s3_server))
        try:
            await store.save("known", IMAGES[:1], {})
            return await missing_bucket.load("nope"), await store.load("nope")
        finally:
            await missing_bucket.close()
            await store.close()

    assert asyncio.run(scenario()) == (None, None)


def test_an_unreachable_store_is_unavailable_within_seconds():
    (port,) = free_ports(1)
    endpoint = f"127.0.0.1:{port}"
    store = ResultStore(StorageConfig(endpoint=endpoint, access_key="ak", secret_key="sk", bucket="b-1"))

    async def attempt(call):
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            await call
        return time.monotonic() - started, str(raised.value)

    for call in (lambda: store.save("r", IMAGES[:1], {}), lambda: store.load("r")):
        elapsed, message = asyncio.run(attempt(call()))
        assert elapsed < 5
        assert endpoint in message and "bucket b-1" in message and "unreachable" in message

    # Signing never touches the network, so it works while the store is down.
    started = time.monotonic()
    assert store.presigned_url("results/r/image-0.png").startswith(f"http://{endpoint}/b-1/results/r/image-0.png?")
    assert time.monotonic() - started < 0.5


def test_a_store_whose_server_stops_is_unavailable_within_seconds():
    with running_s3_server() as server:
        store = ResultStore(config_for(server))
        asyncio.run(store.save("before", IMAGES[:1], {}))  # leaves a pooled keep-alive connection behind
        server.stop()
        assert not server.data_dir.exists() and not any(path.exists() for path in server.sockets)

        async def attempt(call):
            started = time.monotonic()
            with pytest.raises(Unavailable, match="unreachable") as raised:
                await call
            assert time.monotonic() - started < 5
            assert server.endpoint in str(raised.value)

        asyncio.run(attempt(store.load("before")))
        asyncio.run(attempt(store.save("after", IMAGES[:1], {})))


@pytest.mark.parametrize("which", ["secret_key", "access_key"])
def test_wrong_credentials_say_access_was_denied(s3_server: S3Server, which: str):
    config = replace(config_for(s3_server), **{which: "wrong-" + which})

    async def scenario():
        store = ResultStore(config)
        try:
            for call in (store.save("r", IMAGES[:1], {}), store.load("r")):
                with pytest.raises(Unavailable, match="denied access") as raised:
                    await call
                assert s3_server.endpoint in str(raised.value)
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("request_id", ["", "a/b", "..", ".", "a b", "x" * 129, "é", "../etc"])
def test_invalid_request_ids_are_rejected_before_any_request(request_id: str):
    store = ResultStore(StorageConfig(endpoint="127.0.0.1:1", access_key="ak", secret_key="sk"))
    with pytest.raises(ValueError, match="request_id"):
        asyncio.run(store.save(request_id, IMAGES[:1], {}))
    with pytest.raises(ValueError, match="request_id"):
        asyncio.run(store.load(request_id))


def test_invalid_save_arguments_are_rejected():
    store = ResultStore(StorageConfig(endpoint="127.0.0.1:1", access_key="ak", secret_key="sk"))
    assert store.config.bucket == "unclip"
    for extras in ({"record.json": (b"{}", "application/json")}, {"image-0.png": (b"", "image/png")}, {"a/b": (b"", "x/y")}):
        with pytest.raises(ValueError, match="extra name"):
            asyncio.run(store.save("ok", IMAGES[:1], {}, extras=extras))
    with pytest.raises(ValueError, match="reserved"):
        asyncio.run(store.save("ok", IMAGES[:1], {"image_keys": []}))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        asyncio.run(store.save("ok", [IMAGES[0], "not bytes"], {}))


def test_config_from_env():
    assert StorageConfig.from_env({}) is None
    base = {"UNCLIP_S3_ENDPOINT": "seaweedfs:8333", "UNCLIP_S3_ACCESS_KEY": "ak", "UNCLIP_S3_SECRET_KEY": "sk"}
    assert StorageConfig.from_env(base) == StorageConfig(endpoint="seaweedfs:8333", access_key="ak", secret_key="sk")
    full = StorageConfig.from_env(
        {
            **base,
            "UNCLIP_S3_BUCKET": "images",
            "UNCLIP_S3_SECURE": "true",
            "UNCLIP_S3_PUBLIC_ENDPOINT": "images.example.com",
            "UNCLIP_S3_PUBLIC_SECURE": "0",
            "UNCLIP_S3_URL_EXPIRY": "600",
        }
    )
    assert (full.bucket, full.secure, full.public_endpoint, full.public_secure, full.url_expiry_seconds) == (
        "images", True, "images.example.com", False, 600,
    )  # fmt: skip
    assert ResultStore(full).presigned_url("k").startswith("http://images.example.com/images/k?")

    with pytest.raises(ValueError, match="UNCLIP_S3_SECRET_KEY"):
        StorageConfig.from_env({"UNCLIP_S3_ENDPOINT": "s3:8333", "UNCLIP_S3_ACCESS_KEY": "ak"})
    with pytest.raises(ValueError, match="UNCLIP_S3_ACCESS_KEY and UNCLIP_S3_SECRET_KEY"):
        StorageConfig.from_env({"UNCLIP_S3_ENDPOINT": "s3:8333"})
    with pytest.raises(ValueError, match="UNCLIP_S3_SECURE"):
        StorageConfig.from_env({**base, "UNCLIP_S3_SECURE": "maybe"})
    with pytest.raises(ValueError, match="UNCLIP_S3_URL_EXPIRY"):
        StorageConfig.from_env({**base, "UNCLIP_S3_URL_EXPIRY": "1h"})
    with pytest.raises(ValueError, match="UNCLIP_S3_URL_EXPIRY='0' must be a positive integer"):
        StorageConfig.from_env({**base, "UNCLIP_S3_URL_EXPIRY": "0"})
    with pytest.raises(ValueError, match="url_expiry_seconds"):  # the store's own bound: 7 days
        StorageConfig.from_env({**base, "UNCLIP_S3_URL_EXPIRY": str(8 * 24 * 3600)})
    with pytest.raises(ValueError, match="invalid bucket name"):
        StorageConfig.from_env({**base, "UNCLIP_S3_BUCKET": "Not_A_Bucket"})
    with pytest.raises(ValueError, match="without scheme"):
        StorageConfig.from_env({**base, "UNCLIP_S3_ENDPOINT": "http://s3:8333"})
