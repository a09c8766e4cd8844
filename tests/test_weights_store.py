"""Weights directories pushed to and pulled from a real S3 server (SeaweedFS on loopback), as the
Helm chart's init container pulls them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import S3Server, s3_server_fixture

from unclip.storage import StorageConfig
from unclip.weights_store import MARKER, WeightsStoreError, pull, push

s3_server = s3_server_fixture(scope="module")


def store(s3: S3Server, bucket: str = "weights") -> StorageConfig:
    return StorageConfig(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, bucket=bucket)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != MARKER}


def test_a_pushed_directory_pulls_back_byte_for_byte_and_serves(s3_server, karlo, tmp_path):
    config = store(s3_server)
    assert push(karlo["weights"], config, "weights/karlo") == len(files(karlo["weights"]))
    target = tmp_path / "models"
    assert pull(config, "weights/karlo", target) is True
    assert files(target) == files(karlo["weights"])
    assert pull(config, "weights/karlo", target) is False  # a restarted pod downloads nothing
    (target / "prior" / "model.safetensors").write_bytes(b"truncated")  # e.g. a pull cut short by hand
    (target / MARKER).unlink()
    assert pull(config, "weights/karlo", target) is True
    assert files(target) == files(karlo["weights"])

    from unclip.stages import load_engine

    assert load_engine("prior", target / "prior").version == karlo["stages"].prior.version


def test_pull_into_an_existing_mount_point_replaces_what_was_there(s3_server, karlo, tmp_path):
    config = store(s3_server)
    push(karlo["weights"], config, "weights/again")
    target = tmp_path / "mount"
    (target / "leftover").mkdir(parents=True)
    (target / "leftover" / "x").write_text("old")
    pull(config, "weights/again", target)
    assert not (target / "leftover").exists() and (target / "decoder" / "config.json").is_file()


def test_bad_prefixes_and_unreachable_stores_say_what_is_wrong(s3_server, tmp_path):
    config = store(s3_server)
    with pytest.raises(WeightsStoreError, match="holds no weights directory"):
        pull(config, "weights/nothing-here", tmp_path / "a")
    with pytest.raises(WeightsStoreError, match="must name a folder"):
        pull(config, "/", tmp_path / "b")
    with pytest.raises(WeightsStoreError, match="not a weights directory"):
        push(tmp_path, config, "weights/empty")
    dead = StorageConfig(endpoint="127.0.0.1:1", access_key="a", secret_key="b", bucket="weights")
    with pytest.raises(WeightsStoreError, match="cannot list"):
        pull(dead, "weights/karlo", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_the_cli_pushes_and_pulls_with_the_store_settings(s3_server, karlo, tmp_path):
    env = {
        **os.environ, "UNCLIP_S3_ENDPOINT": s3_server.endpoint, "UNCLIP_S3_ACCESS_KEY": s3_server.access_key,
        "UNCLIP_S3_SECRET_KEY": s3_server.secret_key,
    }  # fmt: skip

    def unclip(*args: str, environ: dict = env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "unclip", *args], capture_output=True, text=True, env=environ, timeout=120)

    pushed = unclip("weights", "push", str(karlo["weights"]), "--prefix", "cli/karlo", "--bucket", "models")
    assert pushed.returncode == 0, pushed.stderr
    pulled = unclip("weights", "pull", str(tmp_path / "out"), "--prefix", "cli/karlo", "--bucket", "models")
    assert pulled.returncode == 0 and "pulled" in pulled.stdout
    assert files(tmp_path / "out") == files(karlo["weights"])
    unset = unclip("weights", "pull", str(tmp_path / "x"), "--prefix", "p", environ={"PATH": os.environ["PATH"]})
    assert unset.returncode == 1 and "UNCLIP_S3_ENDPOINT" in unset.stderr and "Traceback" not in unset.stderr
