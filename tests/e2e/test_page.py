"""The web page at ``/``, driven in headless Chromium against the real service (tiny random model).

The random model's answers are noise, so these tests check streaming and structure: text that
grows while it streams, one relevance bar per sampled frame, a bar that seeks the player, a stop
that the server counts as an abort, errors in plain words, keyboard use, a phone-sized layout and
the API key. Screenshots go to ``artifacts/screenshots/``.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.demo import RANDOM_TINY_NAME
from tests.serving import REPO, start_server
from tests.videos import write_video

pytestmark = pytest.mark.browser

SHOTS = REPO / "artifacts" / "screenshots"
SECONDS, FPS = 6, 10  # the clip: 6 s at 10 fps, sampled at the default 1 fps -> 6 frames
ABORTS = re.compile(r'^llamavid_request_success_total\{finished_reason="abort"\} (\S+)$', re.M)


# -- fixtures (browser, open_page and trained_service live in conftest.py) ---------------------------
@pytest.fixture(scope="module")
def demo_cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder whose random demo model is the tiny checkpoint, so /v1/models says demo="random"."""
    cache = tmp_path_factory.mktemp("llamavid-cache")
    (cache / RANDOM_TINY_NAME).symlink_to(tiny_checkpoint, target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def servers(browser, demo_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """The service twice, started side by side (each takes seconds to load): open, and with API key "secret".

    Asks for the browser first, so that a machine without Chromium skips before starting anything.
    """
    model = demo_cache / RANDOM_TINY_NAME
    settings = {"open": {}, "keyed": {"api_keys": "secret"}}
    with ThreadPoolExecutor(len(settings)) as pool:
        futures = {name: pool.submit(start_server, tmp_path_factory.mktemp(f"serve-{name}"), model,
                                     cache_dir=demo_cache, **extra) for name, extra in settings.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for server in started.values():
            server.stop()
        raise failed[0]
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def service(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def keyed_service(servers):
    return servers["keyed"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each second has its own background colour, with a white square moving left to right."""
    n, height, width = SECONDS * FPS, 180, 320
    palette = np.array([[214, 69, 65], [230, 150, 40], [235, 205, 60], [70, 160, 90], [60, 120, 200],
                        [140, 90, 190]], np.uint8)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = palette[(i // FPS) % len(palette)]
        x = int((width - 48) * i / (n - 1))
        frames[i, 66:114, x:x + 48] = 255
    return write_video(tmp_path_factory.mktemp("clip") / "shapes.mp4", frames=frames, fps=FPS)


# -- helpers ---------------------------------------------------------------------------------------
def shot(page, name: str, **options) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), **options)


def upload(page, clip: Path) -> dict:
    """Choose the clip in the file picker; returns the service's VideoObject once the page says ready."""
    from playwright.sync_api import expect

    with page.expect_response(lambda r: r.url.endswith("/v1/videos") and r.request.method == "POST") as created:
        page.set_input_files("#file-input", str(clip))
    video = created.value.json()
    expect(page.locator("#status-text")).to_contain_text(f"Ready: {video['frames_total']} / {video['frames_total']}")
    return video


def ask(page, question: str) -> dict:
    """Type a question and send it; returns the JSON body the page posted."""
    page.fill("#question", question)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#ask")
    return sent.value.post_data_json


def max_tokens(page, value: int) -> None:
    """Set the longest-answer setting, opening the settings panel when it is closed."""
    if not page.eval_on_selector("#settings", "d => d.open"):
        page.click("#settings > summary")
    page.fill("#max-tokens", str(value))


def answer(page, n: int):
    return page.locator("li.turn.assistant").nth(n)


def sample_while_streaming(page, n: int, timeout: float = 30.0) -> list[int]:
    """The answer's text length, read every few milliseconds until it stops streaming."""
    lengths, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, length = page.evaluate(
            """n => { const item = document.querySelectorAll('li.turn.assistant')[n];
                      return [item.dataset.state, item.querySelector('.answer-text').textContent.length]; }""", n)
        lengths.append(length)
        if state != "streaming":
            return lengths
        time.sleep(0.01)
    raise AssertionError(f"answer {n} still streaming after {timeout}s")


def player_time(page) -> float:
    return page.evaluate("document.getElementById('player').currentTime")


def aborted(service) -> float:
    return float(ABORTS.search(httpx.get(service.url + "/metrics").text).group(1))


# -- tests -----------------------------------------------------------------------------------------
def test_upload_stream_relevance_seek_and_stop(service, open_page, clip):
    from playwright.sync_api import expect

    page = open_page(service.url)
    expect(page.locator("#demo-banner")).to_contain_text("random weights")
    expect(page.locator("#model-info")).to_contain_text(RANDOM_TINY_NAME)
    page.evaluate("""() => { const el = document.getElementById('status-text'); window.statuses = [];
        new MutationObserver(() => window.statuses.push(el.textContent))
            .observe(el, {childList: true, characterData: true, subtree: true}); }""")

    video = upload(page, clip)
    total = video["frames_total"]
    assert total == SECONDS and len(video["timestamps"]) == total
    progress = page.evaluate("window.statuses")
    assert any(re.search(rf"(Waiting to extract|Extracting) frames: \d+ / {total}", s) for s in progress), progress
    assert page.eval_on_selector("#progress", "p => [p.hidden, p.value]") == [False, 1]
    expect(page.locator("#frame-strip .thumb")).to_have_count(total)
    page.wait_for_function("[...document.querySelectorAll('#frame-strip img')].every(i => i.naturalWidth > 0)")

    # First question: the text grows while it streams, then one relevance bar per frame.
    max_tokens(page, 400)
    body = ask(page, "What colour is the background when the square is in the middle?")
    assert body["stream"] is True and body["relevance"] is True and body["max_tokens"] == 400
    assert body["messages"][0]["content"][0] == {"type": "video_url", "video_url": {"url": video["id"]}}
    lengths = sample_while_streaming(page, 0)
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 3, f"the answer did not visibly stream: {lengths}"
    assert lengths == sorted(lengths), f"the answer shrank while streaming: {lengths}"
    first = answer(page, 0)
    expect(first).to_have_attribute("data-state", "done")
    expect(first.locator(".answer-meta")).to_contain_text("tokens")
    bars = first.locator(".bars .bar")
    expect(bars).to_have_count(total)
    assert "% of the attention" in bars.nth(0).get_attribute("aria-label")

    # A bar seeks the player to its frame.
    bars.nth(3).click()
    assert abs(player_time(page) - video["timestamps"][3]) <= 0.1
    expect(page.locator('#frame-strip .thumb[data-index="3"]')).to_have_attribute("aria-current", "true")
    page.locator("#frame-strip .thumb").nth(1).click()
    assert abs(player_time(page) - video["timestamps"][1]) <= 0.1
    # The moments under the bars: a chip per span, which seeks the player to its best frame.
    expect(first.locator(".top-frames")).to_contain_text("Moments:")
    moment = first.locator(".top-frames .chip").first
    frame = int(moment.get_attribute("data-index"))
    moment.click()
    assert abs(player_time(page) - video["timestamps"][frame]) <= 0.1
    shot(page, "desktop-answer.png", full_page=True)

    # Second question: the whole conversation goes back to the service.
    max_tokens(page, 200)
    body = ask(page, "And at the end?")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == first.locator(".answer-text").text_content()
    assert len(set(sample_while_streaming(page, 1))) >= 2
    expect(answer(page, 1).locator(".bars .bar")).to_have_count(total)

    # Stop mid-answer: the page says so and the service counts an aborted request.
    page.click("#new-chat")
    expect(page.locator("li.turn")).to_have_count(0)
    before = aborted(service)
    max_tokens(page, 2000)
    ask(page, "Describe every frame in detail.")
    page.wait_for_function(
        "document.querySelector('li.turn.assistant .answer-text').textContent.length > 20")
    assert answer(page, 0).get_attribute("data-state") == "streaming"
    page.click("#stop")
    expect(answer(page, 0)).to_have_attribute("data-state", "stopped")
    expect(answer(page, 0).locator(".answer-meta")).to_contain_text("Stopped by you")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#question")).to_be_focused()
    deadline = time.monotonic() + 15
    while aborted(service) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted(service) == before + 1, "the server did not cancel the generation"


def test_errors_in_plain_words(service, open_page):
    from playwright.sync_api import expect

    page = open_page(service.url, color_scheme="dark")
    page.fill("#media-url", "http://127.0.0.2/x.mp4")  # loopback, not allow-listed
    page.press("#media-url", "Enter")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error.locator(".error-headline")).to_have_text(
        "The service will not fetch that link: it points to a private or local network address.")
    expect(error.locator(".error-detail")).to_contain_text("forbidden_address")
    expect(page.locator("#status-text")).to_contain_text("Nothing loaded")
    shot(page, "error-private-url.png")

    # A link to something that is not a video: the page itself, served by the same service.
    page.fill("#media-url", service.url + "/style.css")
    page.press("#media-url", "Enter")
    expect(error.locator(".error-headline")).to_have_text(
        re.compile(r"not a video|could not read that file as a video"))
    shot(page, "error-not-a-video-dark.png")


def test_keyboard_only(service, open_page, clip):
    """Load a video by link, ask, and seek from the relevance timeline without touching the mouse."""
    from playwright.sync_api import expect

    with open(clip, "rb") as f:
        video = httpx.post(service.url + "/v1/videos", files={"file": ("shapes.mp4", f, "video/mp4")}).json()
    page = open_page(service.url)
    expect(page.locator("#demo-banner")).to_be_visible()

    def tab_to(selector: str, key: str = "Tab", limit: int = 30) -> None:
        for _ in range(limit):
            page.keyboard.press(key)
            tag, visible = page.evaluate("[document.activeElement.tagName, document.activeElement.matches(':focus-visible')]")
            assert visible or tag == "VIDEO", f"{tag} has no visible focus"
            if page.evaluate("s => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"{selector} is not reachable with {key}")

    tab_to(".skip-link")
    tab_to("#media-url")
    page.keyboard.type(f"{service.url}/v1/videos/{video['id']}/content")
    page.keyboard.press("Enter")
    expect(page.locator("#status-text")).to_contain_text(f"Ready: {SECONDS} / {SECONDS}")
    tab_to("#question")
    page.keyboard.type("What moves across the screen?")
    page.keyboard.press("Enter")
    expect(answer(page, 0)).to_have_attribute("data-state", "done", timeout=30_000)
    expect(page.locator("#question")).to_be_focused()

    # Back up to the timeline: one tab stop, moved with the arrow keys.
    tab_to(".bar", key="Shift+Tab", limit=8)
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.index") == "2"
    page.keyboard.press("Enter")
    assert abs(player_time(page) - video["timestamps"][2]) <= 0.1
    page.keyboard.press("End")
    page.keyboard.press(" ")
    assert abs(player_time(page) - video["timestamps"][-1]) <= 0.1
    shot(page, "keyboard-focus.png")

    # The skip link jumps straight to the question box.
    page.keyboard.press("Escape")
    page.reload()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#question")).to_be_focused()


def test_phone_layout(service, open_page, clip):
    from playwright.sync_api import expect

    page = open_page(service.url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                     has_touch=True)
    expect(page.locator("#demo-banner")).to_be_visible()
    shot(page, "phone-390x844-start.png")
    upload(page, clip)
    max_tokens(page, 150)
    ask(page, "What happens?")
    expect(answer(page, 0)).to_have_attribute("data-state", "done", timeout=30_000)
    expect(answer(page, 0).locator(".bars .bar")).to_have_count(SECONDS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
    answer(page, 0).scroll_into_view_if_needed()
    shot(page, "phone-390x844.png")
    shot(page, "phone-390x844-full.png", full_page=True)


def test_api_key(keyed_service, open_page, clip):
    from playwright.sync_api import expect

    page = open_page(keyed_service.url)
    expect(page.locator("#model-info")).to_contain_text("Enter the API key")
    page.set_input_files("#file-input", str(clip))
    expect(page.locator("#error .error-headline")).to_contain_text("needs an API key")
    expect(page.locator("#settings")).to_have_attribute("open", "")
    shot(page, "api-key-missing.png")

    page.fill("#api-key", "secret")
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#model-info")).to_contain_text(RANDOM_TINY_NAME)
    expect(page.locator("#demo-banner")).to_be_visible()
    video = upload(page, clip)
    page.wait_for_function("[...document.querySelectorAll('#frame-strip img')].every(i => i.naturalWidth > 0)")
    assert page.eval_on_selector("#frame-strip img", "i => i.src").startswith("blob:")
    max_tokens(page, 60)
    ask(page, "What is it?")
    expect(answer(page, 0)).to_have_attribute("data-state", "done", timeout=30_000)
    expect(answer(page, 0).locator(".bars .bar")).to_have_count(video["frames_total"])

    page.reload()
    expect(page.locator("#api-key")).to_have_value("secret")


def test_dropped_image(service, open_page):
    """An image dropped on the page goes inline as a data: URL; no frame strip and no timeline for it."""
    import base64
    import io

    from PIL import Image
    from playwright.sync_api import expect

    png = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 160, 90)).save(png, format="PNG")
    page = open_page(service.url)
    dropped = page.evaluate_handle(
        """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const data = new DataTransfer();
                    data.items.add(new File([bytes], 'square.png', {type: 'image/png'}));
                    return data; }""", base64.b64encode(png.getvalue()).decode())
    page.dispatch_event("#drop-zone", "dragover", {"dataTransfer": dropped})
    expect(page.locator("#drop-zone")).to_have_class(re.compile("dragging"))
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
    expect(page.locator("#drop-zone")).not_to_have_class(re.compile("dragging"))
    expect(page.locator("#status-text")).to_contain_text("Image ready")
    expect(page.locator("#image-preview")).to_be_visible()
    expect(page.locator("#frames")).to_be_hidden()
    max_tokens(page, 20)
    body = ask(page, "What colour is it?")
    part = body["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    assert "relevance" not in body
    expect(answer(page, 0)).to_have_attribute("data-state", "done")
    expect(answer(page, 0).locator(".relevance")).to_be_hidden()


def test_trained_demo_banner(service, open_page):
    """The bundled trained demo model gets its own banner (the model list is stubbed: none ships yet)."""
    from playwright.sync_api import expect

    model = {"id": "llamavid-demo-shapes", "object": "model", "max_model_len": 2048,
             "llamavid": {"tokens_per_frame": 2, "device": "cpu", "dtype": "float32", "demo": "trained"}}
    page = open_page(service.url, routes={"**/v1/models": lambda route: route.fulfill(
        json={"object": "list", "data": [model]})})
    expect(page.locator("#demo-banner")).to_contain_text("synthetic videos of coloured shapes")
    expect(page.locator("#model-info")).to_contain_text("llamavid-demo-shapes")
