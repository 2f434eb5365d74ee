"""The page for long videos and first-time users, in headless Chromium against the real service.

A 600-frame video's heat strip has a mark in every pixel column and seeks where it is clicked;
the demo-clip button leads to a correct answer from the trained demo model; a reload keeps the
video and the conversation; Ask does nothing with nothing attached; axe-core finds no serious or
critical violations at 1280x800 and 390x844. Screenshots for the README go to docs/screenshots/.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model.demo import RANDOM_TINY_NAME
from tests.serving import REPO, start_server
from tests.videos import write_video

pytestmark = pytest.mark.browser

DOCS = REPO / "docs" / "screenshots"
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
LONG_FRAMES = 600


@pytest.fixture(scope="module")
def random_service(browser, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny random model (fast; its answers are noise): enough for timelines and state."""
    cache = tmp_path_factory.mktemp("llamavid-cache")
    (cache / RANDOM_TINY_NAME).symlink_to(tiny_checkpoint, target_is_directory=True)
    server = start_server(tmp_path_factory.mktemp("serve-random"), cache / RANDOM_TINY_NAME, cache_dir=cache)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 s at 1 fps: 600 sampled frames; a bright block crosses the picture once."""
    n, height, width = LONG_FRAMES, 36, 64
    frames = np.full((n, height, width, 3), 40, np.uint8)
    for i in range(n):
        x = int((width - 8) * i / (n - 1))
        frames[i, 10:26, x:x + 8] = (230, 180, 40)
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames=frames, fps=1)


def shot(page, name: str) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS / name))


def wait_ready(page, frames: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status-text")).to_contain_text(f"Ready: {frames} / {frames}", timeout=120_000)


def ask(page, question: str) -> dict:
    page.fill("#question", question)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#ask")
    return sent.value.post_data_json


def answer(page, n: int):
    return page.locator("li.turn.assistant").nth(n)


def load_demo_clip(page) -> dict:
    """Click "Try a demo clip" and wait until its frames are ready; the clip's record, with its
    offered questions."""
    with page.expect_response("**/v1/demo/clip") as made:
        page.click("#demo-clip")
    clip = made.value.json()
    wait_ready(page, clip["frames_total"])
    return clip


def ask_first_example(page) -> None:
    from playwright.sync_api import expect

    page.locator("#example-list button").first.click()
    expect(answer(page, 0)).to_have_attribute("data-state", "done")


def empty_columns(page, selector: str) -> list[int]:
    """CSS-pixel columns of a heat strip's canvas with no painted pixel at all."""
    return page.eval_on_selector(selector, """c => {
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const scale = c.width / Number(c.dataset.bins), empty = [];
        for (let b = 0; b < Number(c.dataset.bins); b++) {
            const x = Math.min(c.width - 1, Math.floor((b + 0.5) * scale));
            let painted = false;
            for (let y = 0; y < c.height && !painted; y++) painted = data[(y * c.width + x) * 4 + 3] > 0;
            if (!painted) empty.push(b);
        }
        return empty; }""")


def check_axe(page, axe_source: str, where: str) -> None:
    page.add_script_tag(content=axe_source)
    found = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
        .filter(v => v.impact === 'serious' || v.impact === 'critical')
        .map(v => `${v.id} (${v.impact}): ${v.nodes.map(n => n.target.join(' ')).join(', ')}`)""")
    assert found == [], f"axe at {where}: {found}"


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_long_video_timeline(random_service, open_page, long_video, viewport):
    """Every pixel column of the scrubber's strip is marked, hover names the frame, a click seeks there."""
    from playwright.sync_api import expect

    # reduced motion: a seek scrolls the player into view at once, so the strip's position is final
    page = open_page(random_service.url, reduced_motion="reduce", **(DESKTOP if viewport == "desktop" else PHONE))
    with page.expect_response(lambda r: r.url.endswith("/v1/videos") and r.request.method == "POST") as created:
        page.set_input_files("#file-input", str(long_video))
    video = created.value.json()
    wait_ready(page, LONG_FRAMES)
    times = page.evaluate("fetch(location.pathname.replace(/[^/]*$/, '') + 'v1/videos/' + "
                          "new URLSearchParams(location.search).get('video')).then(r => r.json())")["timestamps"]
    assert len(times) == LONG_FRAMES
    canvas = "#timeline-strip canvas"
    expect(page.locator(canvas)).to_be_visible()
    assert empty_columns(page, canvas) == [], "columns of the strip with no mark before any answer"

    ask(page, "Where is the yellow block?")
    expect(answer(page, 0)).to_have_attribute("data-state", "done", timeout=60_000)
    # The answer has a heat strip (600 bars would be invisible) and moments that seek.
    expect(answer(page, 0).locator(".bars")).to_have_count(0)
    expect(answer(page, 0).locator(".answer-heat canvas")).to_be_visible()
    bins = int(page.get_attribute(canvas, "data-bins"))
    assert bins == int(page.eval_on_selector(canvas, "c => Math.floor(c.parentElement.clientWidth)"))
    assert bins < LONG_FRAMES  # several frames per column: the binning, not a bar per frame, is tested
    assert empty_columns(page, canvas) == []
    assert empty_columns(page, ".answer-heat canvas") == []
    # The strip is coloured by relevance: not every column is painted the same.
    shades = page.eval_on_selector(canvas, """c => { const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data, s = new Set();
        for (let x = 0; x < c.width; x++) { let h = 0; for (let y = 0; y < c.height; y++) h += d[(y * c.width + x) * 4 + 3] > 0;
        s.add(h); } return s.size; }""")
    assert shades > 1

    duration = times[-1] + (times[-1] - times[-2])
    for fraction in (0.1, 0.5, 0.93):
        page.locator(canvas).scroll_into_view_if_needed()
        box = page.locator(canvas).bounding_box()  # a seek may scroll the player, and the strip, into view
        x = box["width"] * fraction
        page.mouse.move(box["x"] + x, box["y"] + box["height"] / 2)
        tip = page.locator("#timeline-strip .heat-tip")
        expect(tip).to_be_visible()
        expect(tip).to_contain_text(re.compile(r"frame \d+ of 600 · [\d.]+% of the attention"))
        page.wait_for_function("document.querySelector('#timeline-strip .heat-tip img').naturalWidth > 0")
        page.mouse.click(box["x"] + x, box["y"] + box["height"] / 2)
        seconds = page.evaluate("document.getElementById('player').currentTime")
        column = duration / bins  # the clicked column spans this much time; its frame lies in it
        assert seconds in [pytest.approx(t, abs=0.05) for t in times]
        assert abs(seconds - (int(x) + 0.5) * column) <= column + 1.0, (fraction, seconds)
    # The keyboard moves along the same slider, one frame per arrow key.
    page.focus(canvas)
    before = int(page.get_attribute(canvas, "aria-valuenow"))
    page.keyboard.press("ArrowRight")
    assert int(page.get_attribute(canvas, "aria-valuenow")) == before + 1
    assert page.evaluate("document.getElementById('player').currentTime") == pytest.approx(times[before + 1], abs=0.05)
    # A moment chip seeks to its frame.
    chip = answer(page, 0).locator(".top-frames .chip").first
    frame = int(chip.get_attribute("data-index"))
    chip.click()
    assert page.evaluate("document.getElementById('player').currentTime") == pytest.approx(times[frame], abs=0.05)
    if viewport == "phone":
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways"
    page.locator("#timeline").scroll_into_view_if_needed()
    shot(page, f"long-video-{viewport}.png")
    assert video["frames_total"] == LONG_FRAMES


def test_demo_clip_answer_and_reload(trained_service, open_page):
    """One click for a clip, one for a question: the trained demo's answer is the clip's; a reload keeps both."""
    from playwright.sync_api import expect

    page = open_page(trained_service.url, **DESKTOP)
    expect(page.locator("#demo-clip")).to_be_visible()
    shot(page, "first-load-desktop.png")
    clip = load_demo_clip(page)
    assert {q["type"] for q in clip["questions"]} >= {"binding", "counting"}
    examples = page.locator("#example-list button")
    expect(examples).to_have_count(len(clip["questions"]))
    expect(page.locator("#chooser")).to_be_hidden()  # the uploader folds away
    expect(page.locator("#replace")).to_be_visible()

    first = clip["questions"][0]
    with page.expect_request("**/v1/chat/completions") as sent:
        examples.nth(0).click()
    assert sent.value.post_data_json["messages"][0]["content"][1]["text"] == first["question"]
    expect(answer(page, 0)).to_have_attribute("data-state", "done")
    assert answer(page, 0).locator(".answer-text").text_content().strip().lower() == first["answer"]
    expect(answer(page, 0).locator(".answer-caveat")).to_have_text(
        f"This clip was made for this question: the right answer is “{first['answer']}”.")
    count = clip["questions"][-1]
    examples.nth(len(clip["questions"]) - 1).click()
    expect(answer(page, 1)).to_have_attribute("data-state", "done")
    assert answer(page, 1).locator(".answer-text").text_content().strip().lower() == count["answer"]
    assert f"video={clip['id']}" in page.url
    # The question box stays on screen after two turns (the log scrolls inside its panel).
    assert page.locator("#question").bounding_box()["y"] + 40 <= 800
    shot(page, "demo-conversation-desktop.png")

    # A reload keeps the video, the conversation and the example questions; the history goes on.
    page.reload()
    wait_ready(page, clip["frames_total"])
    expect(page.locator("li.turn.assistant")).to_have_count(2)
    assert answer(page, 0).locator(".answer-text").text_content().strip().lower() == first["answer"]
    expect(answer(page, 0).locator(".bars .bar")).to_have_count(clip["frames_total"])
    expect(examples).to_have_count(len(clip["questions"]))
    expect(page.locator("#timeline-note")).to_contain_text(f"Relevance to “{count['question']}”")
    body = ask(page, "Is there a triangle?")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert body["messages"][0]["content"][0]["video_url"]["url"] == clip["id"]
    expect(answer(page, 2)).to_have_attribute("data-state", "done")

    # A new clip would end this conversation: the page asks first, and "no" keeps it.
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#replace")
    page.click("#demo-clip")
    assert asked and "conversation" in asked[0]
    expect(page.locator("li.turn.assistant")).to_have_count(3)
    assert f"video={clip['id']}" in page.url


def test_demo_conversation_on_a_phone(trained_service, open_page):
    from playwright.sync_api import expect

    page = open_page(trained_service.url, **PHONE)
    shot(page, "first-load-phone.png")
    # The banner is one short line that goes away when dismissed, and stays away.
    assert page.locator("#demo-banner").bounding_box()["height"] < 0.15 * 844
    page.click("#banner-dismiss")
    expect(page.locator("#demo-banner")).to_be_hidden()
    clip = load_demo_clip(page)
    ask_first_example(page)
    assert answer(page, 0).locator(".answer-text").text_content().strip().lower() == clip["questions"][0]["answer"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # Tapping a moment under the answer, far below the player, brings the player back into view.
    chip = answer(page, 0).locator(".top-frames .chip").first
    chip.scroll_into_view_if_needed()
    expect(page.locator("#player")).not_to_be_in_viewport(ratio=1)
    chip.click()
    expect(page.locator("#player")).to_be_in_viewport(ratio=1)
    answer(page, 0).scroll_into_view_if_needed()
    shot(page, "demo-conversation-phone.png")
    page.reload()
    expect(page.locator("li.turn.assistant")).to_have_count(1)
    expect(page.locator("#demo-banner")).to_be_hidden()


def test_ask_needs_something_attached(random_service, open_page):
    """With nothing loaded, or after a failed load, Ask is disabled, says why, and Enter sends nothing."""
    from playwright.sync_api import expect

    page = open_page(random_service.url, **DESKTOP)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/v1/chat/completions" in r.url else None)
    expect(page.locator("#ask")).to_be_disabled()
    expect(page.locator("#no-media")).to_be_visible()
    page.fill("#question", "What happens?")
    page.press("#question", "Enter")
    page.fill("#media-url", random_service.url + "/style.css")  # not a video: the load fails
    page.press("#media-url", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#ask")).to_be_disabled()
    expect(page.locator("#no-media")).to_be_visible()
    page.fill("#question", "What happens?")
    page.press("#question", "Enter")
    assert sent == []
    expect(page.locator("li.turn")).to_have_count(0)


def test_settings_persist_and_are_checked(random_service, open_page):
    from playwright.sync_api import expect

    page = open_page(random_service.url, **DESKTOP)
    expect(page.locator("#max-tokens-hint")).to_contain_text("up to")
    page.click("#settings > summary")
    page.fill("#fps", "50")  # above the service's max_fps (8)
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#settings-saved")).to_contain_text("Not saved")
    expect(page.locator("#fps")).to_have_attribute("aria-invalid", "true")
    page.fill("#fps", "2")
    page.fill("#max-tokens", "77")
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#settings-saved")).to_contain_text("Saved")
    page.reload()
    expect(page.locator("#max-tokens")).to_have_value("77")
    expect(page.locator("#fps")).to_have_value("2")


def test_rejected_api_key_is_named(browser, open_page, tiny_checkpoint, tmp_path_factory):
    from playwright.sync_api import expect

    server = start_server(tmp_path_factory.mktemp("serve-keyed"), tiny_checkpoint, api_keys="secret")
    try:
        page = open_page(server.url, **DESKTOP)
        page.evaluate("localStorage.setItem('llamavid.apiKey', 'wrong')")
        page.reload()
        expect(page.locator("#model-info")).to_contain_text("rejected the API key")
        expect(page.locator("#error .error-headline")).to_contain_text("did not accept the API key")
        expect(page.locator("#settings")).to_have_attribute("open", "")
    finally:
        server.stop()


def test_file_picker_opens_with_enter_and_space(random_service, open_page):
    for key in ("Enter", " "):
        page = open_page(random_service.url, **DESKTOP)  # a fresh page: one picker may be open at a time
        choosers = []
        # listen before anything else: the interception of the picker must be on before the key press
        page.on("filechooser", lambda chooser: choosers.append(chooser))
        page.focus("#choose-file")
        page.keyboard.press(key)
        for _ in range(50):
            if choosers:
                break
            page.wait_for_timeout(100)
        assert len(choosers) == 1, f"{key!r} on 'Choose a file' opened no file picker"


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_axe_finds_no_serious_violations(trained_service, open_page, axe_source, viewport):
    from playwright.sync_api import expect

    page = open_page(trained_service.url, **(DESKTOP if viewport == "desktop" else PHONE))
    expect(page.locator("#demo-clip")).to_be_visible()
    check_axe(page, axe_source, f"{viewport}, first load")
    load_demo_clip(page)
    ask_first_example(page)
    page.click("#settings > summary")
    check_axe(page, axe_source, f"{viewport}, a demo conversation")
    # and the focus ring: at least 3:1 against the page behind it
    ratio = page.evaluate(r"""() => {
        const rgb = s => s.match(/\d+(\.\d+)?/g).slice(0, 3).map(Number);
        const lum = c => { const [r, g, b] = c.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
                           return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const q = document.getElementById('question'); q.focus();
        const ring = lum(rgb(getComputedStyle(q).outlineColor));
        const behind = lum(rgb(getComputedStyle(q.closest('.panel')).backgroundColor));
        const [hi, lo] = ring > behind ? [ring, behind] : [behind, ring];
        return (hi + 0.05) / (lo + 0.05); }""")
    assert ratio >= 3, ratio


def test_thinned_frames_and_other_footage_are_flagged(trained_service, open_page, tmp_path):
    """More frames than the demo's 512-token context: the answer says how many it used, and that this
    footage is not what the demo model knows."""
    from playwright.sync_api import expect

    n = 300
    frames = np.zeros((n, 48, 64, 3), np.uint8)
    frames[:, :, :, 1] = np.linspace(30, 220, n, dtype=np.uint8)[:, None, None]
    clip = write_video(tmp_path / "green.mp4", frames=frames, fps=1)
    page = open_page(trained_service.url, **DESKTOP)
    page.set_input_files("#file-input", str(clip))
    wait_ready(page, n)
    ask(page, "What colour is the circle?")
    expect(answer(page, 0)).to_have_attribute("data-state", "done")
    meta = answer(page, 0).locator(".answer-meta").text_content()
    used = re.search(r"used (\d+) of 300 frames \(thinned to fit the context\)", meta)
    assert used and 0 < int(used.group(1)) < n, meta
    expect(answer(page, 0).locator(".answer-caveat")).to_contain_text("about any other footage this answer is a guess")
    # The scrubber's strip shows this answer's relevance, over all 300 frames (those left out in grey).
    expect(page.locator("#timeline-note")).to_contain_text("Relevance to")
    assert empty_columns(page, "#timeline-strip canvas") == []


def test_the_videos_subtitles_are_a_track_on_the_player(random_service, open_page, tmp_path):
    """A video with a text track (mov_text in an MP4) plays with its subtitles on; one without has none."""
    from playwright.sync_api import expect

    from tests.model.media import write_media

    cues = [(0.2, 1.5, "Hello there."), (2.2, 3.6, "Goodbye now.")]
    subtitled = write_media(tmp_path / "subtitled.mp4", seconds=4.0, cues=cues, subtitle_codec="mov_text")
    page = open_page(random_service.url, **DESKTOP)
    page.set_input_files("#file-input", str(subtitled))
    wait_ready(page, 4)
    expect(page.locator("#player track")).to_have_count(1)
    texts = page.wait_for_function("""() => {
        const track = document.querySelector('#player').textTracks[0];
        return track && track.mode === 'showing' && track.cues && track.cues.length
            ? Array.from(track.cues, (cue) => cue.text) : null;
    }""", timeout=30_000).json_value()
    assert texts == [text for _, _, text in cues]

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#replace")
    page.set_input_files("#file-input", str(write_media(tmp_path / "plain.mp4", seconds=4.0)))
    wait_ready(page, 4)
    expect(page.locator("#player track")).to_have_count(0)
