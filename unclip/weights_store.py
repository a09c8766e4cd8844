"""Weights directories in S3: `push` a directory's files under a prefix, `pull` them back.

A Kubernetes pod can then start from weights in a bucket (the Helm chart's `weights.s3`: an init
container pulls into an emptyDir) instead of a shared volume. A pull writes into a staging
directory and moves it into place, then writes `PULLED` (the prefix and every object's ETag) last:
a target holding PULLED for the same objects is left as it is (a restarted pod pulls nothing),
and anything else found there, such as a pull cut short, is replaced.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from unclip.checkpoint import CONFIG_FILE
from unclip.storage import StorageConfig

MARKER = "PULLED"


class WeightsStoreError(RuntimeError):
    """A push or pull cannot be done; the message says what and where."""


def _client(config: StorageConfig) -> Any:
    from minio import Minio

    return Minio(
        config.endpoint, access_key=config.access_key, secret_key=config.secret_key, secure=config.secure,
        region=config.region,
    )  # fmt: skip


def _prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        raise WeightsStoreError("prefix: must name a folder in the bucket, e.g. weights/karlo")
    return prefix + "/"


def push(directory: str | Path, config: StorageConfig, prefix: str) -> int:
    """Upload every file under `directory` to <bucket>/<prefix>/<relative path>; the file count."""
    root = Path(directory)
    if not any((root / kind / CONFIG_FILE).is_file() for kind in _kinds(root)):
        raise WeightsStoreError(f"{root}: not a weights directory (no <stage>/{CONFIG_FILE})")
    client, base = _client(config), _prefix(prefix)
    if not client.bucket_exists(config.bucket):
        client.make_bucket(config.bucket)
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.name != MARKER)
    for path in files:
        client.fput_object(config.bucket, base + path.relative_to(root).as_posix(), str(path))
    return len(files)


def _kinds(root: Path) -> list[str]:
    return [entry.name for entry in root.iterdir() if entry.is_dir()] if root.is_dir() else []


def pull(config: StorageConfig, prefix: str, directory: str | Path) -> bool:
    """Download <bucket>/<prefix>/ into `directory` (created, or emptied unless it already holds
    this exact pull). Whether anything was downloaded."""
    client, base = _client(config), _prefix(prefix)
    target = Path(directory)
    try:
        objects = [o for o in client.list_objects(config.bucket, prefix=base, recursive=True) if not o.is_dir]
    except Exception as error:
        raise WeightsStoreError(f"cannot list s3://{config.bucket}/{base} at {config.endpoint}: {error}") from error
    names = {o.object_name[len(base) :] for o in objects}
    if not any(name.endswith(f"/{CONFIG_FILE}") for name in names):
        raise WeightsStoreError(f"s3://{config.bucket}/{base} holds no weights directory (no <stage>/{CONFIG_FILE})")
    manifest = {"bucket": config.bucket, "prefix": base, "objects": {o.object_name[len(base) :]: o.etag for o in objects}}
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return False
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pulling.", dir=target))
    try:
        for name in sorted(names):
            path = (staging / name).resolve()
            if staging.resolve() not in path.parents:
                raise WeightsStoreError(f"s3://{config.bucket}/{base}{name}: the object name leaves the directory")
            client.fget_object(config.bucket, base + name, str(path))
        # The target may be a mount point (an emptyDir), so its entries are replaced, not it.
        marker.unlink(missing_ok=True)
        for entry in target.iterdir():
            if entry != staging:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in staging.iterdir():
            entry.rename(target / entry.name)
        staging.rmdir()
        marker.write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True
