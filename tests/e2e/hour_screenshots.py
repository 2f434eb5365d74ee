"""Screenshots of an hour-long video's timeline for the README (``docs/screenshots/long-video-1h-*.png``).

Not a test (the 600-frame test in ``test_page_flows.py`` checks the same strip); an hour of frames
takes a minute to extract on a CPU, so this runs by hand:

    .venv/bin/python -m tests.e2e.hour_screenshots
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from model.tools.tiny import make_tiny
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.serving import REPO, start_server
from tests.videos import write_video

FRAMES = 3600
VIEWPORTS = {"desktop": {"viewport": {"width": 1280, "height": 800}},
             "phone": {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True}}


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="llamavid-shots-"))
    frames = np.full((FRAMES, 36, 64, 3), 40, np.uint8)
    for i in range(FRAMES):  # a block that crosses the picture once, brighter in the second quarter
        x = int(56 * i / (FRAMES - 1))
        frames[i, 10:26, x:x + 8] = (230, 180, 40) if FRAMES // 4 <= i < FRAMES // 2 else (120, 120, 140)
    video = write_video(tmp / "hour.mp4", frames=frames, fps=1)
    server = start_server(tmp, make_tiny(tmp / "tiny", "tiny"))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            for name, options in VIEWPORTS.items():
                page = browser.new_context(**options).new_page()
                page.goto(server.url + "/")
                page.set_input_files("#file-input", str(video))
                expect(page.locator("#status-text")).to_contain_text(f"Ready: {FRAMES} / {FRAMES}", timeout=600_000)
                page.fill("#question", "When is the block yellow?")
                page.click("#ask")
                expect(page.locator("li.turn.assistant")).to_have_attribute("data-state", "done", timeout=300_000)
                page.locator("#timeline").scroll_into_view_if_needed()
                page.screenshot(path=str(REPO / "docs" / "screenshots" / f"long-video-1h-{name}.png"))
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
