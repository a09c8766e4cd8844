"""The `unclip` command: in-process generation by default, through a gateway with --server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servers import BackgroundServer

from unclip.png import read_png_text
from unclip.serving import Server

# Runs the `unclip` command in processes of its own.
pytestmark = pytest.mark.slow

STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--upsampler-steps", "2"]


def unclip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unclip", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_in_process_writes_pngs(tmp_path: Path):
    result = unclip("generate", "a red circle in the top left corner", "-n", "2", "--seed", "7", "--out", str(tmp_path), *STEPS)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == ["a-red-circle-in-the-top-left-corner-7.png", "a-red-circle-in-the-top-left-corner-8.png"]
    for path, seed in zip(paths, (7, 8), strict=True):
        assert Image.open(path).size == (128, 128)
        text = read_png_text(path.read_bytes())
        assert text["prompt"] == "a red circle in the top left corner" and text["seed"] == str(seed)
    assert result.stderr == ""  # no progress bar and no warnings when not on a terminal


def test_generate_reports_bad_input_without_a_traceback(tmp_path: Path):
    result = unclip("generate", "circle " * 40, "--out", str(tmp_path), *STEPS)
    assert result.returncode == 1
    assert "context length" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_generate_through_a_server_matches_in_process(tmp_path: Path):
    from gateway.api import ImageAPI
    from gateway.servicer import SERVICES, ImageServicer
    from unclip.local import LocalStages

    # A gateway whose backend is the in-process engines: the CLI's --server path end to end.
    settings = [*STEPS, "--decoder-text-guidance", "3"]
    with BackgroundServer(lambda: Server(ImageServicer(ImageAPI(LocalStages.load())), SERVICES, port=0)) as server:
        remote = unclip(
            "generate", "a blue square", "--seed", "3", "--server", server.address, "--out", str(tmp_path / "remote"), *settings
        )
    assert remote.returncode == 0, remote.stderr
    local = unclip("generate", "a blue square", "--seed", "3", "--out", str(tmp_path / "local"), *settings)
    assert local.returncode == 0, local.stderr
    remote_pixels = np.asarray(Image.open(remote.stdout.split()[0]))
    local_pixels = np.asarray(Image.open(local.stdout.split()[0]))
    np.testing.assert_array_equal(remote_pixels, local_pixels)
    for result in (remote, local):
        parameters = json.loads(read_png_text(Path(result.stdout.split()[0]).read_bytes())["parameters"])
        assert parameters["decoder_text_guidance_scale"] == 3.0


def test_generate_server_unreachable_is_a_clear_error(tmp_path: Path):
    result = unclip("generate", "a blue square", "--server", "127.0.0.1:1", "--timeout", "3", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr


def test_bench_throughput_measures_row_by_row_beside_a_compute_batch(tmp_path: Path):
    """In-process and through `serve all`: every (mode, compute batch, load, concurrency) point,
    row by row first, with images per second, latencies and each process's peak memory."""
    out = tmp_path / "throughput.json"
    result = unclip(
        "bench", "throughput", "--mode", "inprocess", "--mode", "services", "--load", "pipeline", "--load", "decoder",
        "--compute-batch", "decoder=4", "--concurrency", "1,2", "--requests", "2", "--steps", "1", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "x row" in result.stdout and "p95 s" in result.stdout
    points = json.loads(out.read_text())["points"]
    keys = [(p["mode"], p["compute_batch"], p["load"], p["concurrency"]) for p in points]
    assert keys == [
        (mode, spec, load, concurrency)
        for mode in ("inprocess", "services")
        for spec in ("1", "decoder=4")
        for load in ("pipeline", "decoder")
        for concurrency in (1, 2)
    ]
    for point in points:
        assert point["requests"] == 2 and point["images_per_second"] > 0 and point["p95_s"] >= point["p50_s"] > 0
        expected = {"inprocess"} if point["mode"] == "inprocess" else {"encoder", "prior", "decoder", "upsampler", "gateway"}
        assert set(point["peak_rss_mb"]) == expected and all(mb > 50 for mb in point["peak_rss_mb"].values())


def test_bench_throughput_refuses_a_bad_compute_batch():
    result = unclip("bench", "throughput", "--compute-batch", "decoder=0")
    assert result.returncode == 2 and "compute batch must be a positive integer, got '0'" in result.stderr
