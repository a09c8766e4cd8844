"""Every UNCLIP_* environment variable, defined once: its name, default, meaning and parsing.

Code reads a variable only through its `Setting` here, and docs/configuration.md's table is
generated from `SETTINGS` (`python tools/gen_docs.py`; a test fails when it is stale).
Torch-free and server-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("must be a positive integer")
    return int(text)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("is not a boolean (use true/false, 1/0, yes/no, on/off)")


@dataclass(frozen=True)
class Setting:
    """One environment variable. `default` is as written in the environment; None: unset."""

    name: str
    help: str
    read_by: str
    default: str | None = None
    parse: Callable[[str], Any] = str

    def get(self, environ: Mapping[str, str] | None = None) -> Any:
        """The parsed value (None when unset without a default); ValueError naming the variable
        and its value when it cannot be parsed. An empty value counts as unset."""
        raw = (os.environ if environ is None else environ).get(self.name) or self.default
        if raw is None:
            return None
        try:
            return self.parse(raw)
        except ValueError as error:
            raise ValueError(f"{self.name}={raw!r} {error}") from None


TORCH_THREADS = Setting(
    "UNCLIP_TORCH_THREADS",
    "Intra-op threads of every engine. CPU kernels round differently with another count, so every process "
    "that must give the same pixels for a seed uses the same value.",
    "engines (in-process, stage services, Ray replicas)",
    "2",
    _positive_int,
)
DEVICE = Setting(
    "UNCLIP_DEVICE", "Where engines run: `cpu`, `cuda`, `cuda:1`, ... Unset: CUDA when present, else the CPU.", "engines"
)
S3_ENDPOINT = Setting(
    "UNCLIP_S3_ENDPOINT",
    "host:port of the S3-compatible object store results go to. Unset: results are not stored, and URLs and "
    "idempotency keys are refused.",
    "gateway",
)
S3_ACCESS_KEY = Setting("UNCLIP_S3_ACCESS_KEY", "The store's access key; required with UNCLIP_S3_ENDPOINT.", "gateway")
S3_SECRET_KEY = Setting("UNCLIP_S3_SECRET_KEY", "The store's secret key; required with UNCLIP_S3_ENDPOINT.", "gateway")
S3_BUCKET = Setting("UNCLIP_S3_BUCKET", "Bucket of the results (created when missing).", "gateway", "unclip")
S3_SECURE = Setting("UNCLIP_S3_SECURE", "Talk to the store over TLS.", "gateway", "false", _boolean)
S3_PUBLIC_ENDPOINT = Setting(
    "UNCLIP_S3_PUBLIC_ENDPOINT",
    "host:port clients reach the store at; presigned URLs are signed for it. Unset: UNCLIP_S3_ENDPOINT.",
    "gateway",
)
S3_PUBLIC_SECURE = Setting(
    "UNCLIP_S3_PUBLIC_SECURE", "Presigned URLs use https. Unset: as UNCLIP_S3_SECURE.", "gateway", None, _boolean
)
S3_URL_EXPIRY = Setting(
    "UNCLIP_S3_URL_EXPIRY", "Seconds a presigned URL stays valid (at most 7 days).", "gateway", "3600", _positive_int
)
API_KEYS_FILE = Setting(
    "UNCLIP_API_KEYS_FILE",
    "The API keys file (`unclip keys create`; docs/security.md): callers must send one of its keys. Read again "
    "when it changes. `--api-keys` takes precedence. Unset: no keys, and the gateway serves loopback only unless "
    "`--insecure-no-auth`.",
    "gateway (`unclip serve gateway|all|ray`, Ray Serve's gateway app)",
)
API_KEY = Setting(
    "UNCLIP_API_KEY",
    "The API key `unclip generate|variations|... --server` sends (`--api-key` takes precedence).",
    "CLI",
)
KIND_TEST = Setting(
    "UNCLIP_KIND_TEST", "`1` runs the chart end to end on a kind cluster (`make test-kind` sets it).", "tests/kind"
)
KIND_CLUSTER = Setting("UNCLIP_KIND_CLUSTER", "Name of the kind cluster the kind test creates.", "tests/kind", "unclip-e2e")
KIND_KEEP = Setting("UNCLIP_KIND_KEEP", "`1` keeps the kind cluster after the test.", "tests/kind")
KUBERAY_CHART = Setting(
    "UNCLIP_KUBERAY_CHART",
    "KubeRay operator chart: a repository chart name or a local .tgz. Unset: "
    "kuberay/kuberay-operator from the KubeRay Helm repository.",
    "tests/kind",
)
KUBERAY_VERSION = Setting("UNCLIP_KUBERAY_VERSION", "KubeRay operator chart version.", "tests/kind", "1.7.0")
IMAGE = Setting("UNCLIP_IMAGE", "An image already built to load into kind instead of building one.", "tests/kind", "unclip:0.1.0")

SETTINGS: tuple[Setting, ...] = tuple(value for value in globals().values() if isinstance(value, Setting))


def s3_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """unclip.storage.StorageConfig's keyword arguments from UNCLIP_S3_*; None when
    UNCLIP_S3_ENDPOINT is unset (storage off). ValueError for an incomplete or bad setting."""
    endpoint = S3_ENDPOINT.get(environ)
    if not endpoint:
        return None
    missing = [s.name for s in (S3_ACCESS_KEY, S3_SECRET_KEY) if not s.get(environ)]
    if missing:
        raise ValueError(f"UNCLIP_S3_ENDPOINT is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not")
    return {
        "endpoint": endpoint,
        "access_key": S3_ACCESS_KEY.get(environ),
        "secret_key": S3_SECRET_KEY.get(environ),
        "bucket": S3_BUCKET.get(environ),
        "secure": S3_SECURE.get(environ),
        "public_endpoint": S3_PUBLIC_ENDPOINT.get(environ),
        "public_secure": S3_PUBLIC_SECURE.get(environ),
        "url_expiry_seconds": S3_URL_EXPIRY.get(environ),
    }


def markdown_table() -> str:
    """The table of docs/configuration.md."""
    rows = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        default = "unset" if setting.default is None else f"`{setting.default}`"
        rows.append(f"| `{setting.name}` | {default} | {setting.read_by} | {setting.help} |")
    return "\n".join(rows) + "\n"
