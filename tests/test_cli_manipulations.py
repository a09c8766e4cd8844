"""`unclip variations|interpolate|textdiff|edit`: in-process by default, through a gateway with --server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip.png import read_png_text

# Runs the `unclip` command in processes of its own.
pytestmark = pytest.mark.slow

SIZE = 32  # the base decoder's size: no upsampler runs, and inputs at this size are not resized
STEPS = ["--decoder-steps", "2", "--upsampler-steps", "1", "--size", str(SIZE)]
PRIOR_STEPS = ["--prior-steps", "2"]


def unclip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unclip", *args], capture_output=True, text=True, timeout=timeout)


def written(result: subprocess.CompletedProcess) -> list[Path]:
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A 32x32 RGB PNG of noise."""
    path = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def test_variations_write_n_pngs(tmp_path: Path, picture: Path):
    paths = written(unclip("variations", str(picture), "-n", "2", "--seed", "3", "--out", str(tmp_path / "out"), *STEPS))

    assert [path.name for path in paths] == ["variation-3.png", "variation-4.png"]
    for path, seed in zip(paths, (3, 4), strict=True):
        text = read_png_text(path.read_bytes())
        assert text["operation"] == "variation" and text["seed"] == str(seed)
        assert Image.open(path).size == (SIZE, SIZE)


def test_interpolate_prompts_writes_frames_and_a_gif(tmp_path: Path):
    result = unclip(
        "interpolate",
        "--prompts",
        "a red circle",
        "a blue square",
        "--frames",
        "3",
        "--gif",
        "--seed",
        "5",
        "--out",
        str(tmp_path),
        *STEPS,
        *PRIOR_STEPS,
    )
    *frames, gif = written(result)

    assert [path.name for path in frames] == [f"interpolation-5-frame{i}.png" for i in range(3)]
    for index, path in enumerate(frames):
        text = read_png_text(path.read_bytes())
        assert (text["operation"], text["frame"], text["seed"]) == ("interpolation", str(index), "5")
    assert gif.name == "interpolation-5.gif"
    with Image.open(gif) as animation:
        assert animation.format == "GIF" and animation.n_frames == 3


def test_textdiff_writes_frames(tmp_path: Path, picture: Path):
    result = unclip(
        "textdiff",
        str(picture),
        "--caption",
        "a red circle",
        "--target",
        "a blue square",
        "--frames",
        "2",
        "--max-rotation",
        "0.3",
        "--seed",
        "1",
        "--out",
        str(tmp_path),
        *STEPS,
    )
    paths = written(result)

    assert [path.name for path in paths] == ["textdiff-1-frame0.png", "textdiff-1-frame1.png"]
    assert {read_png_text(path.read_bytes())["operation"] for path in paths} == {"text_diff"}


def test_edit_keeps_the_pixels_outside_the_mask(tmp_path: Path, picture: Path):
    mask = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    mask[8:24, 8:24, 3] = 0  # the region to regenerate
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask, mode="RGBA").save(mask_path)

    result = unclip(
        "edit",
        str(picture),
        "--prompt",
        "a blue square",
        "--mask",
        str(mask_path),
        "--seed",
        "2",
        "--out",
        str(tmp_path / "out"),
        *STEPS,
        *PRIOR_STEPS,
    )
    (path,) = written(result)

    assert path.name == "edit-2.png" and read_png_text(path.read_bytes())["operation"] == "edit"
    before = np.asarray(Image.open(picture).convert("RGB"))
    after = np.asarray(Image.open(path).convert("RGB"))
    regenerated = mask[..., 3] == 0
    np.testing.assert_array_equal(after[~regenerated], before[~regenerated])
    assert (after[regenerated] != before[regenerated]).any()


def test_bad_image_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"

    result = unclip("variations", str(bad), "--out", str(out), *STEPS)

    assert result.returncode == 1
    assert result.stderr.startswith("unclip: image: not a readable image") and "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_file_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "missing.png"
    result = unclip("edit", str(missing), "--prompt", "a cat", "--out", str(tmp_path), "--server", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr == f"unclip: cannot read {missing}: No such file or directory\n"


def test_through_a_server(tmp_path: Path, picture: Path):
    from servers import BackgroundServer

    from gateway.api import ImageAPI
    from gateway.servicer import SERVICES, ImageServicer
    from unclip.local import LocalStages
    from unclip.serving import Server

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with BackgroundServer(lambda: Server(ImageServicer(ImageAPI(LocalStages.load())), SERVICES, port=0)) as server:
        diff = unclip(
            "textdiff",
            str(picture),
            "--caption",
            "a red circle",
            "--target",
            "a blue square",
            "--frames",
            "2",
            "--gif",
            "--seed",
            "4",
            "--server",
            server.address,
            "--out",
            str(tmp_path),
            *STEPS,
        )
        failed = unclip("variations", str(bad), "--server", server.address, "--out", str(tmp_path / "failed"))

    *frames, gif = written(diff)
    assert [path.name for path in frames] == ["textdiff-4-frame0.png", "textdiff-4-frame1.png"]
    assert Image.open(frames[0]).size == (SIZE, SIZE)
    with Image.open(gif) as animation:
        assert animation.n_frames == 2
    assert failed.returncode == 1
    assert "INVALID_ARGUMENT" in failed.stderr and "image: not a readable image" in failed.stderr
    assert "Traceback" not in failed.stderr
