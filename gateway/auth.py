"""Who may call the gateway: API keys, stored as hashes in a keys file, checked on every request.

A key is `uk_<id>_<secret>`: `id` (12 hex digits) names the key without revealing it (logs,
`unclip keys list`), `secret` is 32 random bytes. The keys file (JSON, written by `unclip keys`,
or a Kubernetes Secret mounted as that file) holds, per key, its id, a name, the SHA-256 of the
whole key and optional per-key limits (`gateway.quotas`):

    {"version": 1, "keys": [{"id": "3f9c0a1b2c4d", "name": "team-a", "sha256": "…",
                             "created": "2026-01-01T00:00:00Z", "images_per_minute": 60}]}

Callers send `authorization: Bearer <key>` (gRPC metadata) or `Authorization: Bearer <key>`
(HTTP, what OpenAI's SDKs send as their api_key). A missing or wrong key gets UNAUTHENTICATED or
HTTP 401; health checks (gRPC health, GET /healthz) and GET /metrics stay open. The file is
read again whenever it changes (its size, mtime or inode: `unclip keys` replaces it atomically,
and Kubernetes swaps a mounted Secret's files the same way), so keys are added and revoked
without a restart; a file that stops parsing keeps the last good keys in force, with an error
in the log. Messages never carry key material.

With keys on, idempotency keys are scoped to the API key (`current_caller().key_id`), and the
quotas apply per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.page import OPEN_PAGE_ROUTES
from gateway.quotas import QuotaLimits, Quotas
from unclip.errors import Unauthenticated

log = logging.getLogger("unclip.gateway.auth")

KEY_PREFIX = "uk"
_KEY = re.compile(r"uk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
FILE_VERSION = 1
LIMIT_FIELDS = ("images_per_minute", "max_concurrent")
AUTHORIZATION = "authorization"
# Routes any caller may use: health checks and Prometheus scrapes carry no key.
# The playground's files too: a page must load before it can ask for a key (it holds no data).
OPEN_ROUTES = frozenset({("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/metrics"), ("HEAD", "/metrics")}) | OPEN_PAGE_ROUTES
MISSING_KEY = "missing API key: send it as 'authorization: Bearer <key>'"
INVALID_KEY = "invalid API key"
# How long the rest of a refused request's body is read and dropped (as http_api's 413s): a
# socket closed with unread data resets the connection and the caller would not see the 401.
_DRAIN_SECONDS = 10.0


class KeysFileError(ValueError):
    """The keys file cannot be read or is not a valid keys file; the message says which and why."""


def hash_key(key: str) -> str:
    """The stored form of a key. SHA-256, not a slow password hash (bcrypt, argon2): those make
    guessing a low-entropy password expensive, but a key holds 256 random bits, which no guessing
    reaches, and a fast hash keeps checking a key on every request cheap."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(id, key) of a new random key."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


@dataclass(frozen=True)
class ApiKey:
    """One key as the keys file stores it (without the key itself)."""

    id: str
    name: str
    sha256: str
    created: str = ""
    limits: QuotaLimits = QuotaLimits()

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id, "name": self.name, "sha256": self.sha256, "created": self.created}
        for name in LIMIT_FIELDS:
            value = getattr(self.limits, name)
            if value is not None:
                entry[name] = value
        return entry

    @classmethod
    def from_json(cls, entry: Any, where: str) -> ApiKey:
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: each key must be an object")
        unknown = set(entry) - {"id", "name", "sha256", "created", *LIMIT_FIELDS}
        if unknown:
            raise KeysFileError(f"{where}: unknown fields {sorted(unknown)}")
        key_id, name, digest = entry.get("id"), entry.get("name"), entry.get("sha256")
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{12}", key_id):
            raise KeysFileError(f"{where}: id must be 12 hex digits")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KeysFileError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 . _ @ -")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise KeysFileError(f"{where}: sha256 must be 64 lowercase hex digits")
        try:
            limits = QuotaLimits(**{field: entry.get(field) for field in LIMIT_FIELDS})
        except ValueError as error:
            raise KeysFileError(f"{where} ({name}): {error}") from None
        return cls(key_id, name, digest, str(entry.get("created", "")), limits)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: must be 1-64 characters of A-Z a-z 0-9 . _ @ -, starting with a letter or digit")
    return name


class KeysFile:
    """The keys file at `path`: read it, and change it atomically (a new file renamed over the
    old one, so a gateway reading it never sees half of it)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> list[ApiKey]:
        try:
            text = self.path.read_text()
        except OSError as error:
            raise KeysFileError(f"cannot read the keys file {self.path}: {error.strerror or error}") from None
        return self.parse(text)

    def parse(self, text: str) -> list[ApiKey]:
        try:
            document = json.loads(text)
        except ValueError as error:
            raise KeysFileError(f"the keys file {self.path} is not JSON: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise KeysFileError(f'the keys file {self.path} must be an object with a "keys" list')
        if document.get("version", FILE_VERSION) != FILE_VERSION:
            raise KeysFileError(f"the keys file {self.path} has version {document.get('version')!r}; this gateway reads 1")
        keys = [ApiKey.from_json(entry, f"{self.path}: keys[{i}]") for i, entry in enumerate(document["keys"])]
        for attribute in ("id", "name"):
            values = [getattr(key, attribute) for key in keys]
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:
                raise KeysFileError(f"the keys file {self.path} repeats the {attribute} {', '.join(repeated)}")
        return keys

    def read_or_empty(self) -> list[ApiKey]:
        return self.read() if self.path.exists() else []

    def write(self, keys: list[ApiKey]) -> None:
        document = {"version": FILE_VERSION, "keys": [key.to_json() for key in keys]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as file:  # mkstemp's file is readable by its owner only ...
                json.dump(document, file, indent=2)
                file.write("\n")
            if self.path.exists():  # ... unless the file it replaces was shared on purpose (a gateway's group)
                os.chmod(temporary, self.path.stat().st_mode & 0o777)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def create(self, name: str, limits: QuotaLimits = QuotaLimits()) -> tuple[ApiKey, str]:
        """Add a key named `name`; returns its entry and the key, which is stored nowhere."""
        check_name(name)
        keys = self.read_or_empty()
        if any(key.name == name for key in keys):
            raise ValueError(f"the keys file {self.path} already has a key named {name!r}; revoke it first or pick another name")
        key_id, key = new_key()
        while any(existing.id == key_id for existing in keys):
            key_id, key = new_key()
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = ApiKey(key_id, name, hash_key(key), created, limits)
        self.write([*keys, entry])
        return entry, key

    def revoke(self, name: str) -> ApiKey:
        keys = self.read()
        revoked = next((key for key in keys if key.name == name), None)
        if revoked is None:
            raise ValueError(f"the keys file {self.path} has no key named {name!r}")
        self.write([key for key in keys if key is not revoked])
        return revoked


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: its key's id and name, and the limits that apply to it."""

    key_id: str
    name: str
    limits: QuotaLimits


_caller: ContextVar[Caller | None] = ContextVar("unclip_caller", default=None)


def current_caller() -> Caller | None:
    """The authenticated caller of the request being answered (None with keys off)."""
    return _caller.get()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (the scheme in any case)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyRing:
    """The keys of a keys file, read again whenever the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.file = KeysFile(path)
        self._by_id: dict[str, ApiKey] = {}
        self._seen: tuple[int, int, int] | None = None
        self._load(self._signature())  # at startup a bad file is an error, not a warning

    @property
    def path(self) -> Path:
        return self.file.path

    def _signature(self) -> tuple[int, int, int]:
        try:
            stat = self.file.path.stat()
        except OSError as error:
            raise KeysFileError(f"cannot read the keys file {self.file.path}: {error.strerror or error}") from None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _load(self, signature: tuple[int, int, int]) -> None:
        keys = self.file.read()
        self._by_id = {key.id: key for key in keys}
        self._seen = signature
        log.info("API keys from %s: %d (%s)", self.file.path, len(keys), ", ".join(key.name for key in keys) or "none")

    def refresh(self) -> None:
        """Read the file again if it changed since it was last read. A file that is gone or does
        not parse keeps the keys in force (logged once per change): refusing everyone, or letting
        everyone in, would both be worse than serving the last good keys a while longer."""
        try:
            signature = self._signature()
            if signature == self._seen:
                return
            self._load(signature)
        except KeysFileError as error:
            with contextlib.suppress(KeysFileError):
                self._seen = self._signature()  # don't parse (and log) the same broken file again
            log.error("keeping the %d API keys in force: %s", len(self._by_id), error)

    def keys(self) -> list[ApiKey]:
        return list(self._by_id.values())

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key `authorization` (the header's value) carries; Unauthenticated if none, or not
        one of the file's."""
        self.refresh()
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(MISSING_KEY)
        match = _KEY.fullmatch(token)
        key = self._by_id.get(match[1]) if match else None
        # Compared in constant time: how long a wrong key takes says nothing of the right one.
        if key is None or not hmac.compare_digest(hash_key(token), key.sha256):
            raise Unauthenticated(INVALID_KEY)
        return key


class Access:
    """The gateway's policy on callers: the keys (None: no keys, everyone may call), the quota
    defaults, and the per-key usage. `ImageAPI` holds one; the gRPC servicer and the HTTP app
    authenticate each request through it."""

    def __init__(self, keys: KeyRing | None = None, defaults: QuotaLimits = QuotaLimits(), quotas: Quotas | None = None):
        self.keys = keys
        self.defaults = defaults
        self.quotas = quotas or Quotas()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None, defaults: QuotaLimits = QuotaLimits()) -> Access:
        """Keys from `path` (KeysFileError if it cannot be read or parsed); None: keys off."""
        if path is None:
            if defaults != QuotaLimits():
                raise ValueError("quotas are per API key: give a keys file (--api-keys or UNCLIP_API_KEYS_FILE) with them")
            return cls()
        return cls(KeyRing(path), defaults)

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def identify(self, headers: Mapping[str, str]) -> Caller | None:
        """The caller of a request with these headers (gRPC metadata or HTTP headers); None with
        keys off. Unauthenticated for a missing or wrong key."""
        if self.keys is None:
            return None
        key = self.keys.authenticate(headers.get(AUTHORIZATION))
        return Caller(key.id, key.name, key.limits.over(self.defaults))

    def authenticate(self, headers: Mapping[str, str]) -> Caller | None:
        """`identify`, and the caller remembered as `current_caller()` for the rest of this
        context (an RPC's task: each call has its own)."""
        caller = self.identify(headers)
        _caller.set(caller)
        return caller

    @contextlib.contextmanager
    def admitted(self, images: int) -> Iterator[None]:
        """The current caller's quotas for a request that makes `images` images (none without a caller)."""
        caller = current_caller()
        if caller is None:
            yield
            return
        with self.quotas.admitted(caller.key_id, caller.limits, images):
            yield


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server to this machine (a name other than localhost might
    resolve anywhere, so it does not count)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys_file: object, insecure_no_auth: bool) -> None:
    """ValueError when a gateway would listen beyond this machine without API keys."""
    if keys_file is None and not insecure_no_auth and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without API keys: anyone who reaches it could use it. Give --api-keys FILE "
            "(unclip keys create NAME --file FILE writes one) or UNCLIP_API_KEYS_FILE, or --insecure-no-auth to serve "
            "without keys anyway"
        )


class HTTPAuthMiddleware:
    """Every HTTP request but OPEN_ROUTES needs a key: without a good one it is answered 401 in
    OpenAI's error shape (`invalid_api_key`, as OpenAI answers a bad api_key), before its body
    is read or any route runs."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.access.enabled or (scope["method"], _route_path(scope)) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        try:
            caller = self.access.identify(Headers(scope=scope))
        except Unauthenticated as error:
            await _drain(receive)
            body = {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
            headers = {"WWW-Authenticate": 'Bearer realm="unclip"'}
            await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)
            return
        token = _caller.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            _caller.reset(token)


def _route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (Ray Serve mounts an app at its route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


async def _drain(receive: Receive) -> None:
    """Read and drop the request's body (for up to _DRAIN_SECONDS), so that the answer arrives."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
