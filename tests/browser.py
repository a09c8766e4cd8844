"""A real browser for the playground's tests: Debian's Chromium driven by Playwright's Python
package through `executable_path` (Playwright's own browser download is never used).

Skipped, saying why, where Chromium or Playwright is missing: `make test` installs Chromium with
apt-get where apt is available and it runs as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# This machine's network is closed: without these, Chromium keeps trying to reach Google's hosts.
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
]  # fmt: skip
TIMEOUT_MS = 120_000  # a generation on two CPU cores, plus a page action's own time


@contextlib.contextmanager
def browser_page(screenshots: Path) -> Iterator[Any]:
    """A fresh page in headless Chromium; `shot(page, name)` saves screenshots under `screenshots`."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium with apt-get (root, where apt is available)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    screenshots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 1400})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # Console errors too (a CSP refusal is one), but not an HTTP error answer: the page shows those.
            page.on(
                "console",
                lambda message: (
                    errors.append(message.text)
                    if message.type == "error" and not message.text.startswith("Failed to load resource")
                    else None
                ),
            )
            page.script_errors = errors
            yield page
        finally:
            browser.close()


def shot(page: Any, screenshots: Path, name: str) -> Path:
    path = screenshots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_for_results(page: Any, count: int) -> None:
    """Until the gallery holds `count` results and the page is no longer busy. (Locators, not
    wait_for_function: the page's Content-Security-Policy forbids the eval that one needs.)"""
    page.locator("#gallery .result").nth(count - 1).wait_for(state="attached")
    page.locator("main[aria-busy]").wait_for(state="detached")


def playground_flow(page: Any, base: str, screenshots: Path) -> None:
    """What a person does first in the playground, checked as they would see it: generate with
    live previews, make a variation, scrub an interpolation, edit with a painted mask, and read
    the API's own message for a bad request. A screenshot of each state goes to `screenshots`."""
    page.goto(base + "/")
    page.wait_for_selector("#size option", state="attached")
    page.get_by_label("Prompt", exact=True).fill("a red circle in the top left corner")
    page.get_by_label("Seed", exact=True).fill("3")
    page.get_by_label("Size").select_option("128x128")
    page.get_by_label("Partial images").fill("2")
    page.get_by_role("button", name="Generate").click()
    wait_for_results(page, 1)
    # Previews came while it ran: the decoder's last estimate (32 px, partial image 2 of 2) is still shown.
    previews = page.eval_on_selector_all("#previews img", "els => els.map(e => [e.naturalWidth, e.dataset.partial])")
    assert previews == [[32, "1"]], previews
    assert page.locator("#stages li").count() == 4  # encode, prior, decode, upsample0
    first = page.locator("#gallery .result").first
    assert first.locator("img").evaluate("img => img.naturalWidth") == 128
    assert "seed 3 · 128x128" in first.locator("figcaption").inner_text()
    with page.expect_download() as download:
        first.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "unclip-seed-3.png"
    assert Path(download.value.path()).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    shot(page, screenshots, "1-generated")

    page.get_by_label("Images", exact=True).fill("1")
    first.get_by_role("button", name="Variations of this").click()
    wait_for_results(page, 2)
    variation = page.locator("#gallery .result").first
    assert "variation of seed 3" in variation.locator("figcaption").inner_text()
    assert variation.locator("img").evaluate("img => img.naturalWidth") == 128
    shot(page, screenshots, "2-variation")

    for item in page.locator("#gallery .result").all():
        item.get_by_role("checkbox").check()
    page.get_by_label("Frames").fill("3")
    page.get_by_role("button", name="Interpolate").click()
    page.wait_for_selector("#interpolation:not([hidden])")
    frame = page.locator("#interpolation-frame")
    start = frame.get_attribute("src")
    assert page.locator("#interpolation-position").inner_text() == "1 / 3"
    slider = page.get_by_label("Position")
    slider.focus()
    page.keyboard.press("End")  # the slider by keyboard: to the last frame
    assert page.locator("#interpolation-position").inner_text() == "3 / 3"
    assert frame.get_attribute("src") != start
    shot(page, screenshots, "3-interpolation")
    page.get_by_label("two prompts").check()  # between two prompts instead of two results
    page.get_by_role("button", name="Interpolate").click()
    page.locator("main[aria-busy]").wait_for(state="detached")
    assert page.locator("#interpolation-position").inner_text() == "1 / 3"
    assert frame.get_attribute("src") != start
    assert page.get_by_role("alert").is_hidden()

    original = page.locator("#gallery .result").last
    original.get_by_role("button", name="Edit").click()
    page.wait_for_selector("#edit-section:not([hidden])")
    canvas = page.locator("#edit-canvas")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    for step in range(1, 11):  # a brush stroke down the left side
        page.mouse.move(box["x"] + 20 + step * 6, box["y"] + 20 + step * 20)
    page.mouse.up()
    # The stroke shows red over the image where it will be redrawn; the right side is untouched.
    painted = canvas.evaluate("c => Array.from(c.getContext('2d').getImageData(50, 120, 1, 1).data)")
    untouched = canvas.evaluate("c => Array.from(c.getContext('2d').getImageData(240, 240, 1, 1).data)")
    assert painted[0] > 150 and painted[0] - painted[2] > 60, painted
    assert untouched[0] - untouched[2] < 40, untouched
    page.get_by_label("Prompt for the edited image").fill("a blue square at the bottom")
    shot(page, screenshots, "4-mask")
    page.get_by_role("button", name="Apply edit").click()
    wait_for_results(page, 3)
    edited = page.locator("#gallery .result").first
    assert "edit of seed 3" in edited.locator("figcaption").inner_text()
    assert edited.locator("img").get_attribute("src") != original.locator("img").get_attribute("src")
    shot(page, screenshots, "5-edited")

    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_role("button", name="Generate").click()
    error = page.get_by_role("alert")
    error.wait_for(state="visible")
    assert error.inner_text() == "prompt: must not be empty"  # the API's message, as it gave it
    shot(page, screenshots, "6-error")
    assert page.locator("#gallery .result").count() == 3
    assert not page.script_errors, page.script_errors
