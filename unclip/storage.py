"""Generation results in an S3-compatible bucket (SeaweedFS, MinIO, AWS S3) through the `minio` SDK.

A result is a folder of objects under `{prefix}{request_id}/`: `image-{i}.png`, any extras (e.g. an
animated GIF), and `record.json`, written last. The record's presence marks a complete result, so a
reader never sees a half-written one; a save that fails part-way deletes what it wrote, and when
the store cannot take that deletion either (it went down mid-save), the store tries again in the
background, with backoff, until it can (or gives up after a while).

Clients download through presigned URLs signed for the endpoint *they* reach (`public_endpoint`),
which may differ from the one the gateway writes to (e.g. a cluster-internal service name).

Results that several gateway replicas may write at once (idempotency keys: `gateway.idempotency`)
are saved with a `writer`: its images and extras go under `{request_id}/{writer}/`, keys no other
writer uses, and its record is created only if none exists (`If-None-Match: *`), so exactly one
writer's record wins, writes never interleave, and a writer that loses or fails removes only its
own objects. A lease (`lease.json`, created the same way, taken over with `If-Match` once it has
expired) lets one writer generate while the others wait for its record. These conditional
requests go through presigned URLs (minio's SDK signs them; it sends no conditional headers
itself) and need a store that honours them: AWS S3, MinIO and SeaweedFS do.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name
from opentelemetry.trace import SpanKind

from unclip import settings, tracing
from unclip.errors import Unavailable

log = logging.getLogger("unclip.storage")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IMAGE_NAME = re.compile(r"image-\d+\.png")
RECORD_NAME = "record.json"
LEASE_NAME = "lease.json"
_WRITER = re.compile(r"[0-9a-f]{8,32}")
# Keys the store adds to the caller's record to list the result's objects.
IMAGE_KEYS = "image_keys"
EXTRA_KEYS = "extra_keys"
WRITER_KEY = "writer"  # who wrote an exclusively saved result

# What a store failure looks like from minio: an S3 error answer, or a connection-level failure.
_STORE_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_MISSING = {"NoSuchKey", "NoSuchBucket"}
_BUCKET_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
_MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the S3 limit for a presigned URL
# Removing a failed save's objects again: the first retry after this many seconds, doubling up to
# the cap, at most this many tries (about 8 minutes in all: an outage longer than that leaves
# unreferenced objects, logged, never a visible result).
CLEANUP_FIRST_DELAY = 1.0
CLEANUP_MAX_DELAY = 60.0
CLEANUP_ATTEMPTS = 10
# A removal counts once a second one, this much later, also succeeds: a PUT that timed out on the
# client may still land after the first (a store that stalled answers its backlog when it resumes).
CLEANUP_SETTLE = 5.0
# How long closing the store waits for pending removals.
CLEANUP_DRAIN_SECONDS = 15.0


def _check_endpoint(name: str, endpoint: str) -> None:
    # minio wants bare host[:port]; a scheme or path here is the most common misconfiguration.
    if not endpoint or "://" in endpoint or "/" in endpoint:
        raise ValueError(f"{name} must be host:port without scheme or path, got {endpoint!r}")


def _check_name(what: str, name: str) -> None:
    # "." and ".." match the charset but would turn into path traversal in filer-backed stores.
    if not isinstance(name, str) or not _NAME.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ - (and not only dots), got {name!r}")


@dataclass(frozen=True)
class StorageConfig:
    endpoint: str  # host:port the gateway writes to, e.g. "seaweedfs:8333"
    access_key: str
    secret_key: str
    bucket: str = "unclip"
    secure: bool = False
    region: str = "us-east-1"
    public_endpoint: str | None = None  # host:port clients reach; presigned URLs are signed for it (default: endpoint)
    public_secure: bool | None = None  # default: secure
    url_expiry_seconds: int = 3600
    prefix: str = "results/"

    def __post_init__(self) -> None:
        _check_endpoint("endpoint", self.endpoint)
        if self.public_endpoint is not None:
            _check_endpoint("public_endpoint", self.public_endpoint)
        check_bucket_name(self.bucket, strict=True)  # what make_bucket would reject at the first save
        if not 1 <= self.url_expiry_seconds <= _MAX_PRESIGN_SECONDS:
            raise ValueError(f"url_expiry_seconds must be in 1..{_MAX_PRESIGN_SECONDS}, got {self.url_expiry_seconds}")
        if self.prefix.startswith("/"):
            raise ValueError(f"prefix must not start with '/', got {self.prefix!r}")

    @property
    def where(self) -> str:
        """How error messages name the store."""
        return f"object store at {self.endpoint} (bucket {self.bucket})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageConfig | None:
        """The config from the UNCLIP_S3_* variables (unclip.settings); None when storage is off."""
        kwargs = settings.s3_settings(environ)
        return None if kwargs is None else cls(**kwargs)


@dataclass
class StoredResult:
    request_id: str
    record: dict  # the JSON record as stored (the caller's record plus image_keys and extra_keys)
    images: list[bytes]  # PNG bytes in order
    keys: list[str]  # object keys of the images, same order
    extras: dict[str, bytes] = field(default_factory=dict)  # extra name -> bytes
    extra_keys: dict[str, str] = field(default_factory=dict)  # extra name -> object key


class ResultExists(Exception):  # an outcome, not a failure: the caller loads the winning result
    """An exclusive save found another writer's record already in place; it removed its own objects."""


@dataclass(frozen=True)
class Lease:
    """The right to generate a result, held by `owner` (object `key`, at version `etag`)."""

    key: str
    owner: str
    etag: str


@dataclass
class _Orphans:
    """Objects of a failed save that are still to be removed."""

    request_id: str
    keys: list[str]
    record: tuple[str, str] | None = None  # (record key, writer): keep them if that writer's record landed after all
    attempts: int = 0  # failed tries
    removed: bool = False  # the last try removed them; the next one, after CLEANUP_SETTLE, confirms it
    due: float = 0.0  # time.monotonic() of the next try


class _DeferredRemovals:
    """A thread of the store's that retries removals the store could not take when a save failed
    (`_Orphans`), so that an outage mid-save leaves no objects without a record once the store is
    back. It runs only while some are pending."""

    def __init__(self, attempt: Callable[[_Orphans, bool], bool]):
        self._attempt = attempt  # one try; True when the orphans are done with (removed, kept or given up)
        self._pending: list[_Orphans] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    def add(self, orphans: _Orphans) -> None:
        with self._lock:
            self._pending.append(orphans)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="unclip-storage-cleanup", daemon=True)
                self._thread.start()
        self._wake.set()

    def pending(self) -> list[_Orphans]:
        with self._lock:
            return list(self._pending)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                closing, now = self._closing, time.monotonic()
                # Closing: what waits for a retry is tried once more now; a confirmation still waits its settle.
                ready = [o for o in self._pending if o.due <= now or (closing and not o.removed)]
                wait = None if ready else min(o.due for o in self._pending) - now
            if wait is not None:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            for orphans in ready:
                if self._attempt(orphans, closing):
                    with self._lock:
                        self._pending.remove(orphans)

    def drain(self, timeout: float) -> list[_Orphans]:
        """Try what is pending once more (confirmations included) for up to `timeout` seconds;
        what is still pending then."""
        with self._lock:
            self._closing = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
        return self.pending()


def new_writer() -> str:
    """A writer id: unique to one attempt at saving a result."""
    return uuid.uuid4().hex[:16]


def _http_client() -> urllib3.PoolManager:
    # minio's default waits 5 minutes and retries 5 times; an outage must surface in seconds.
    # One read retry stays so that a pooled keep-alive connection the server closed is re-dialled.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=2.0, read=10.0),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=2,
            connect=1,
            read=1,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            respect_retry_after_header=False,
        ),
    )


class ResultStore:
    def __init__(self, config: StorageConfig):
        self.config = config
        self._http = _http_client()
        self._client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,  # explicit, so minio never asks the server for the bucket's location
            http_client=self._http,
        )
        # A separate client only for signing: the URL's host is part of the signature. Presigning with an
        # explicit region is pure computation, so this client never opens a connection.
        public_secure = config.secure if config.public_secure is None else config.public_secure
        self._signer = Minio(
            config.public_endpoint or config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=public_secure,
            region=config.region,
            http_client=self._http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        self._deferred = _DeferredRemovals(self._retry_removal)

    def _folder(self, request_id: str) -> str:
        _check_name("request_id", request_id)
        return f"{self.config.prefix}{request_id}/"

    def _unavailable(self, error: Exception) -> Unavailable:
        where = self.config.where
        if isinstance(error, S3Error) and error.code in _DENIED:
            return Unavailable(f"{where} denied access ({error.code}: {error.message}); check the access key and secret key")
        if isinstance(error, S3Error):
            return Unavailable(f"{where} failed: {error.code}: {error.message}")
        if isinstance(error, MinioException):
            return Unavailable(f"{where} failed: {error}")
        if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
            error = error.reason
        return Unavailable(f"{where} is unreachable: {error}")

    def _ensure_bucket(self) -> None:
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.config.bucket):
                try:
                    self._client.make_bucket(self.config.bucket)
                except S3Error as error:
                    # Another store (or gateway replica) may have created it since bucket_exists.
                    if error.code not in _BUCKET_EXISTS:
                        raise
            self._bucket_ready = True

    async def save(
        self,
        request_id: str,
        images: list[bytes],
        record: dict,
        extras: dict[str, tuple[bytes, str]] | None = None,
        *,
        writer: str | None = None,
    ) -> list[str]:
        """Store the images, extras and record; return the image keys. Raises Unavailable on a store failure.

        With `writer` (`new_writer()`), exclusively: images and extras go under the writer's own
        folder and the record is created only if the result has none yet; ResultExists when
        another writer's record is there (this save's objects are removed, never the other's)."""
        folder = self._folder(request_id)
        if writer is not None and not _WRITER.fullmatch(writer):
            raise ValueError(f"writer must be 8-32 lowercase hex digits, got {writer!r}")
        extras = extras or {}
        for name in extras:
            _check_name("extra name", name)
            if name in (RECORD_NAME, LEASE_NAME) or _IMAGE_NAME.fullmatch(name):
                raise ValueError(f"extra name {name!r} collides with the result's own objects")
        reserved = (IMAGE_KEYS, EXTRA_KEYS, WRITER_KEY)
        if not isinstance(record, dict) or any(key in record for key in reserved):
            raise ValueError(f"record must be a dict without the reserved keys {', '.join(map(repr, reserved))}")
        for i, image in enumerate(images):
            if not isinstance(image, (bytes, bytearray)):
                raise TypeError(f"images[{i}] must be PNG bytes, got {type(image).__name__}")
        data_folder = folder if writer is None else f"{folder}{writer}/"
        objects = [(f"{data_folder}image-{i}.png", image, "image/png") for i, image in enumerate(images)]
        objects += [(data_folder + name, data, content_type) for name, (data, content_type) in extras.items()]
        image_keys = [key for key, _, _ in objects[: len(images)]]
        stored = {**record, IMAGE_KEYS: image_keys, EXTRA_KEYS: {name: data_folder + name for name in extras}}
        if writer is not None:
            stored[WRITER_KEY] = writer
        # Serialised before anything is written, so an unserialisable record leaves nothing behind.
        objects.append((folder + RECORD_NAME, json.dumps(stored).encode(), "application/json"))
        size = sum(len(data) for _, data, _ in objects)
        with tracing.span("storage.save", SpanKind.CLIENT, unclip__objects=len(objects), unclip__bytes=size):
            if writer is None:
                await asyncio.to_thread(self._save_sync, request_id, objects)
            else:
                await asyncio.to_thread(self._save_exclusive_sync, request_id, objects, writer)
        return image_keys

    def _save_sync(self, request_id: str, objects: list[tuple[str, bytes, str]]) -> None:
        try:
            self._ensure_bucket()
        except _STORE_ERRORS as error:
            raise self._unavailable(error) from error
        attempted: list[str] = []
        try:
            for key, data, content_type in objects:
                # Counted before the call: a put that times out may still have landed.
                attempted.append(key)
                self._client.put_object(self.config.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        except BaseException as error:
            # Without an answer from the store, a put that timed out may still land after the
            # removal: a removal that fails, or one that may have come too early, is tried again later.
            removed = self._remove(attempted)
            unanswered = isinstance(error, _STORE_ERRORS) and not isinstance(error, S3Error)
            if not removed or unanswered:
                self._defer(_Orphans(request_id, attempted, removed=removed))
            if isinstance(error, _STORE_ERRORS):
                raise self._unavailable(error) from error
            raise

    def _save_exclusive_sync(self, request_id: str, objects: list[tuple[str, bytes, str]], writer: str) -> None:
        """The writer's objects, then its record if the result has none. Every object but the
        record is the writer's own, so removing them on failure touches nobody else's."""
        *own, (record_key, record_data, _) = objects
        self._save_sync(request_id, own)  # removes what it wrote if it fails
        failure: Exception | None = None
        try:
            self._ensure_bucket()
            if self._put_conditional(record_key, record_data, {"If-None-Match": "*"}, "application/json")[0]:
                return
            # 412: a record is there: another writer's, or this one's if a retried PUT had landed.
        except (*_STORE_ERRORS, Unavailable) as error:
            failure = error  # the record may or may not have landed
        try:
            existing = self._read_json(record_key)
        except (*_STORE_ERRORS, Unavailable) as error:
            # Whether this writer's record landed cannot be told: its objects stay, since a
            # record may point at them (unreferenced ones are garbage, never a visible result).
            raise self._as_unavailable(failure or error) from error
        if existing is not None and existing[0].get(WRITER_KEY) == writer:
            return  # the record that landed is this writer's
        own_keys = [key for key, _, _ in own]
        if not self._remove(own_keys):
            # Retried later, unless this writer's record turns up by then (a PUT that timed out
            # can still land): then they are its result.
            self._defer(_Orphans(request_id, own_keys, record=(record_key, writer)))
        if existing is not None:
            raise ResultExists(record_key)
        raise self._as_unavailable(failure or Unavailable(f"{self.config.where} lost the record {record_key}"))

    def _as_unavailable(self, error: Exception) -> Unavailable:
        return error if isinstance(error, Unavailable) else self._unavailable(error)

    # -- conditional requests: minio signs them as presigned URLs, urllib3 sends them ----------

    def _put_conditional(self, key: str, data: bytes, conditions: dict[str, str], content_type: str) -> tuple[bool, str]:
        """PUT `key` if `conditions` (If-None-Match / If-Match) hold: (True, new ETag), or
        (False, "") when the store answers 412 Precondition Failed."""
        url = self._client.presigned_put_object(self.config.bucket, key, expires=timedelta(minutes=5))
        response = self._http.request("PUT", url, body=data, headers={**conditions, "Content-Type": content_type})
        if response.status == 412:
            return False, ""
        self._check(response, "PUT", key)
        return True, response.headers.get("ETag", "")

    def _delete_conditional(self, key: str, etag: str) -> bool:
        """DELETE `key` if it still has `etag`; False when it changed (or is gone)."""
        url = self._client.get_presigned_url("DELETE", self.config.bucket, key, expires=timedelta(minutes=5))
        response = self._http.request("DELETE", url, headers={"If-Match": etag})
        if response.status in (404, 412):
            return False
        self._check(response, "DELETE", key)
        return True

    def _check(self, response: urllib3.BaseHTTPResponse, method: str, key: str) -> None:
        if not 200 <= response.status < 300:
            code = re.search(rb"<Code>([A-Za-z]+)</Code>", response.data or b"")
            what = code[1].decode() if code else f"HTTP {response.status}"
            if what in _DENIED:
                raise Unavailable(f"{self.config.where} denied access ({what}); check the access key and secret key")
            raise Unavailable(f"{self.config.where} failed: {method} {key}: {what}")

    def _read_json(self, key: str) -> tuple[dict, str] | None:
        """The JSON object stored at `key` and its ETag; None when there is none."""
        try:
            response = self._client.get_object(self.config.bucket, key)
        except S3Error as error:
            if error.code in _MISSING:
                return None
            raise
        try:
            data, etag = response.read(), response.headers.get("ETag", "")
        finally:
            response.close()
            response.release_conn()
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        return (value if isinstance(value, dict) else {}), etag

    # -- leases ------------------------------------------------------------------------------

    async def acquire_lease(self, request_id: str, owner: str, ttl_seconds: float) -> Lease | None:
        """The lease on generating `request_id` for `owner`, for `ttl_seconds` (renew it to keep
        it): created if there is none, or taken over from a holder whose lease expired. None:
        another owner holds it. Expiry is a wall-clock time: replicas' clocks must agree to
        well within the ttl."""
        key = self._folder(request_id) + LEASE_NAME
        try:
            return await asyncio.to_thread(self._acquire_sync, key, owner, ttl_seconds)
        except _STORE_ERRORS as error:
            raise self._unavailable(error) from error

    def _acquire_sync(self, key: str, owner: str, ttl_seconds: float) -> Lease | None:
        self._ensure_bucket()
        body = json.dumps({"owner": owner, "expires": time.time() + ttl_seconds}).encode()
        for _ in range(4):  # each round ends in a lease, or in someone else's change: a few are plenty
            created, etag = self._put_conditional(key, body, {"If-None-Match": "*"}, "application/json")
            if created:
                return Lease(key, owner, etag)
            current = self._read_json(key)
            if current is None:
                continue  # released in between: try to create it again
            held, held_etag = current
            if held.get("owner") == owner:
                return Lease(key, owner, held_etag)  # a PUT of ours that was retried had landed
            expires = held.get("expires")
            if isinstance(expires, (int, float)) and expires > time.time():
                return None
            taken, etag = self._put_conditional(key, body, {"If-Match": held_etag}, "application/json")
            if taken:
                log.info("took over the expired lease %s of %s", key, held.get("owner"))
                return Lease(key, owner, etag)
        return None

    async def renew_lease(self, lease: Lease, ttl_seconds: float) -> Lease | None:
        """The lease for another `ttl_seconds`; None when it was lost (another owner took it over)."""
        body = json.dumps({"owner": lease.owner, "expires": time.time() + ttl_seconds}).encode()
        try:
            renewed, etag = await asyncio.to_thread(
                self._put_conditional, lease.key, body, {"If-Match": lease.etag}, "application/json"
            )
        except _STORE_ERRORS as error:
            raise self._unavailable(error) from error
        return Lease(lease.key, lease.owner, etag) if renewed else None

    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up, if it is still this owner's (a taken-over lease is left alone). Best
        effort: a lease left behind expires."""
        try:
            await asyncio.to_thread(self._delete_conditional, lease.key, lease.etag)
        except (*_STORE_ERRORS, Unavailable) as error:
            log.warning("could not release the lease %s: %s", lease.key, error)

    def _remove(self, keys: list[str]) -> bool:
        """Whether all `keys` are removed (or were never there); a failure is logged, not raised:
        the save's own error is what its caller gets."""
        try:
            self._client_remove(keys)
        except Exception as error:  # noqa: BLE001 - best effort, and retried later (_defer)
            log.warning("could not remove %d objects of a failed save from %s: %s", len(keys), self.config.where, error)
            return False
        return True

    def _defer(self, orphans: _Orphans) -> None:
        orphans.due = time.monotonic() + (CLEANUP_SETTLE if orphans.removed else CLEANUP_FIRST_DELAY)
        if not orphans.removed:
            log.warning(
                "result %s: %d objects of its failed save are left in %s; removing them again in the background",
                orphans.request_id, len(orphans.keys), self.config.where,
            )  # fmt: skip
        self._deferred.add(orphans)

    def _retry_removal(self, orphans: _Orphans, closing: bool) -> bool:
        """One more try at removing `orphans` (on the cleanup thread); True when they are done with."""
        try:
            if orphans.record is not None:
                record_key, writer = orphans.record
                existing = self._read_json(record_key)
                if existing is not None and existing[0].get(WRITER_KEY) == writer:
                    log.info("result %s: the record of its failed save landed after all; its objects stay", orphans.request_id)
                    return True
            self._client_remove(orphans.keys)
        except (*_STORE_ERRORS, Unavailable) as error:
            orphans.attempts += 1
            orphans.removed = False
            if closing or orphans.attempts >= CLEANUP_ATTEMPTS:
                log.error(
                    "result %s: gave up removing the %d objects of its failed save from %s after %d tries (%s); "
                    "they stay, unreferenced (no record points at them): %s",
                    orphans.request_id, len(orphans.keys), self.config.where, orphans.attempts, error,
                    ", ".join(orphans.keys),
                )  # fmt: skip
                return True
            delay = min(CLEANUP_FIRST_DELAY * 2 ** (orphans.attempts - 1), CLEANUP_MAX_DELAY)
            orphans.due = time.monotonic() + delay
            log.info("result %s: removing its failed save's objects failed (%s); again in %g s", orphans.request_id, error, delay)
            return False
        if orphans.removed:
            log.info("result %s: removed the objects its failed save left in %s", orphans.request_id, self.config.where)
            return True
        orphans.removed = True
        orphans.due = time.monotonic() + CLEANUP_SETTLE
        return False

    def _client_remove(self, keys: list[str]) -> None:
        """Remove `keys` in one batch request (so cleanup during an outage costs one timeout, not
        one per key); Unavailable naming every key the store refused."""
        refused = [
            f"{failure.name}: {failure.code}: {failure.message}"
            for failure in self._client.remove_objects(self.config.bucket, [DeleteObject(key) for key in keys])
        ]
        if refused:
            raise Unavailable(f"{self.config.where} failed: could not remove {'; '.join(refused)}")

    async def load(self, request_id: str) -> StoredResult | None:
        """The complete result, or None when its record does not exist (never saved, or a save that failed)."""
        folder = self._folder(request_id)
        with tracing.span("storage.load", SpanKind.CLIENT):
            try:
                return await asyncio.to_thread(self._load_sync, request_id, folder)
            except _STORE_ERRORS as error:
                raise self._unavailable(error) from error

    def _load_sync(self, request_id: str, folder: str) -> StoredResult | None:
        try:
            raw = self._get(folder + RECORD_NAME)
        except S3Error as error:
            if error.code in _MISSING:
                return None
            raise
        try:
            record = json.loads(raw)
            keys = [str(key) for key in record[IMAGE_KEYS]]
        except (ValueError, KeyError, TypeError) as error:
            raise Unavailable(f"{self.config.where} holds a corrupt record for {request_id!r}: {error}") from error
        images = []
        for key in keys:
            try:
                images.append(self._get(key))
            except S3Error as error:
                if error.code in _MISSING:
                    raise Unavailable(
                        f"{self.config.where} holds an incomplete result {request_id!r}: {key} is missing"
                    ) from error
                raise
        try:
            extras = {str(name): self._get(str(key)) for name, key in record.get(EXTRA_KEYS, {}).items()}
        except S3Error as error:
            if error.code in _MISSING:
                raise Unavailable(
                    f"{self.config.where} holds an incomplete result {request_id!r}: an extra is missing"
                ) from error
            raise
        extra_keys = {str(name): str(key) for name, key in record.get(EXTRA_KEYS, {}).items()}
        return StoredResult(request_id=request_id, record=record, images=images, keys=keys, extras=extras, extra_keys=extra_keys)

    def _get(self, key: str) -> bytes:
        response = self._client.get_object(self.config.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def key(self, request_id: str, name: str, writer: str | None = None) -> str:
        """The object key of `name` (an image or extra) in a result's folder (the `writer`'s, for
        a result saved with one)."""
        return self._folder(request_id) + ("" if writer is None else f"{writer}/") + name

    def presigned_url(self, key: str) -> str:
        """A GET URL for `key` on the public endpoint, valid for url_expiry_seconds. No network round trip."""
        return self._signer.presigned_get_object(
            self.config.bucket, key, expires=timedelta(seconds=self.config.url_expiry_seconds)
        )

    async def close(self) -> None:
        """Try pending removals of failed saves once more (waiting at most CLEANUP_DRAIN_SECONDS),
        then close pooled connections."""
        if self._deferred.pending():
            left = await asyncio.to_thread(self._deferred.drain, CLEANUP_DRAIN_SECONDS)
            for orphans in left:
                log.error(
                    "result %s: %d objects of its failed save stay in %s, unreferenced: %s",
                    orphans.request_id, len(orphans.keys), self.config.where, ", ".join(orphans.keys),
                )  # fmt: skip
        self._http.clear()
