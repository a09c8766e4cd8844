"""The playground in a real browser (tests/browser.py) against a gateway in this process: the
whole flow, the API-key prompt, keyboard use and labels. `tests/test_e2e.py` runs the same flow
against `unclip serve all`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from browser import browser_page, playground_flow, shot, wait_for_results
from servers import ServerThread

from gateway.api import ImageAPI
from gateway.auth import INVALID_KEY, MISSING_KEY, Access, KeyRing, KeysFile
from gateway.http_api import create_http_app


@pytest.fixture(scope="module")
def keyed(local_stages, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A gateway with API keys on, and its one key."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    _, key = KeysFile(keys).create("playground")
    with ServerThread(create_http_app(ImageAPI(local_stages, access=Access(KeyRing(keys))))) as server:
        yield f"http://127.0.0.1:{server.port}", key


def test_the_playground_flow(local_stages, tmp_path):
    with ServerThread(create_http_app(ImageAPI(local_stages))) as server, browser_page(tmp_path) as page:
        playground_flow(page, f"http://127.0.0.1:{server.port}", tmp_path)


def test_with_api_keys_the_page_asks_for_one_and_sends_it(keyed, tmp_path):
    base, key = keyed
    with browser_page(tmp_path) as page:
        page.goto(base + "/")
        field = page.get_by_role("textbox", name="API key")
        field.wait_for(state="visible")
        assert page.evaluate("document.activeElement.id") == "api-key"  # focus goes where the person must act
        assert page.locator("#status").inner_text() == MISSING_KEY  # the API's own message
        shot(page, tmp_path, "key-asked")
        field.fill("unclip-wrong")
        page.get_by_role("button", name="Use this key").click()
        page.locator("#status").filter(has_text=INVALID_KEY).wait_for()
        assert page.locator("#size option").count() == 0  # nothing loaded with a wrong key
        field.fill(key)
        page.get_by_role("button", name="Use this key").click()
        page.locator("#size option").first.wait_for(state="attached")
        assert page.locator("#key-section").is_hidden()
        assert page.evaluate("sessionStorage.getItem('unclip-api-key')") == key
        page.get_by_label("Size").select_option("32x32")
        page.get_by_label("Decoder steps").fill("4")
        page.get_by_role("button", name="Generate").click()
        wait_for_results(page, 1)
        assert page.get_by_role("alert").is_hidden()
        # A reload keeps the key for this tab: the page loads without asking again.
        page.reload()
        page.locator("#size option").first.wait_for(state="attached")
        assert page.locator("#key-section").is_hidden()
        assert not page.script_errors, page.script_errors


def test_every_control_is_labelled_and_keyboard_focus_is_visible(keyed, tmp_path):
    base, key = keyed
    with browser_page(tmp_path) as page:
        page.goto(base + "/")
        page.evaluate("key => sessionStorage.setItem('unclip-api-key', key)", key)
        page.reload()
        page.locator("#size option").first.wait_for(state="attached")
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
                .map(el => el.id || el.outerHTML)"""
        )
        assert unlabelled == []
        # Tab walks the generate form in order, each stop with a visible outline.
        page.locator("body").focus()
        seen = []
        for _ in range(8):
            page.keyboard.press("Tab")
            seen.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline not in ("none", ""), (seen[-1], outline)
        assert seen[:8] == ["prompt", "n", "seed", "size", "steps", "guidance", "partial-images", "generate"], seen
        # Generate from the keyboard alone.
        page.get_by_label("Prompt", exact=True).fill("a blue square")
        page.get_by_label("Size").select_option("32x32")
        page.get_by_label("Decoder steps").fill("4")
        page.get_by_role("button", name="Generate").focus()
        page.keyboard.press("Enter")
        wait_for_results(page, 1)
        shot(page, tmp_path, "keyboard")


def test_the_page_works_below_a_route_prefix(local_stages, tmp_path):
    """Mounted below a prefix (as a Ray Serve route prefix mounts it), the page loads its files
    and calls the API there."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/unclip", create_http_app(ImageAPI(local_stages)))])
    with ServerThread(app) as server, browser_page(tmp_path) as page:
        page.goto(f"http://127.0.0.1:{server.port}/unclip/")
        page.locator("#size option").first.wait_for(state="attached")  # GET /unclip/v1/unclip/info answered
        page.get_by_label("Size").select_option("32x32")
        page.get_by_label("Decoder steps").fill("4")
        page.get_by_role("button", name="Generate").click()
        wait_for_results(page, 1)
        assert page.get_by_role("alert").is_hidden()
        assert not page.script_errors, page.script_errors
