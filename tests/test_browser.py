"""Real-browser journeys: Debian's Chromium driven by Playwright against the running app."""

import re
import shutil
import time
from pathlib import Path

import pytest

from fusion.render import SCALE_WIDTH

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def url(shipped_app):
    return shipped_app


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                  "--no-first-run", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


def test_upload_type_and_see_the_answer_and_heatmaps(url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1800}, locale="en-US")
    page.goto(url)
    page.wait_for_selector("#image-input input[type=file]", state="attached")
    page.wait_for_timeout(2000)  # the sketchpad's canvas starts after its input exists
    page.locator("#image-input input[type=file]").first.set_input_files(str(EXAMPLES / "digit-7.png"))
    page.locator("#image-input canvas").first.wait_for(timeout=30_000)
    page.locator("#audio-input input[type=file]").first.set_input_files(str(EXAMPLES / "spoken-7.wav"))
    page.locator("#text-input textarea").fill("sieben")
    page.locator("#audio-input audio, #audio-input canvas, #audio-input wave").first.wait_for(state="attached", timeout=30_000)
    page.wait_for_timeout(1500)  # let both uploads finish
    started = time.perf_counter()
    page.locator("#predict").click()
    page.get_by_text("from image + text + audio, explained by relevance").wait_for(timeout=60_000)
    for element in ("#image-heatmap img", "#audio-heatmap img", "#attention img"):
        page.wait_for_selector(element, state="attached", timeout=60_000)
    page.wait_for_function(
        "() => ['#image-heatmap img', '#audio-heatmap img'].every(s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; })",
        timeout=60_000)
    elapsed = time.perf_counter() - started
    assert "7" in page.locator("#prediction").inner_text()
    assert "from image + text + audio" in page.locator("#notice").inner_text()
    assert "sieben" in page.locator("#text-heatmap").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    (ARTIFACTS / "submit-to-heatmaps-seconds.txt").write_text(f"{elapsed:.2f}\n")
    print(f"submit to rendered heatmaps: {elapsed:.2f} s")
    page.locator("#export").click()  # the zip is built when asked for
    page.locator("#download a[download='explanation.zip']").wait_for(timeout=30_000)
    page.locator("#trust").get_by_text("audio").wait_for(timeout=30_000)  # the maps' check follows the answer

    # Token-level attention: a word, then a place on the image; every view redraws around the chosen token.
    page.locator("#text-heatmap").get_by_text("sieben").click()
    page.locator("#focus").get_by_text("the word “sieben” attends to").wait_for(timeout=30_000)
    page.wait_for_selector("#token-matrix img", state="attached", timeout=30_000)
    # The focus view redraws the image's picture too; read its size once the new one has loaded (a picture still
    # loading reports a natural width of 0).
    page.wait_for_function("() => { const i = document.querySelector('#image-heatmap img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
    picture = page.locator("#image-heatmap img")
    box = picture.bounding_box()
    natural = picture.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    # The picture is the image as given (280 px square here, scaled by the page) and its colour scale on the right.
    picture.click(position={"x": box["width"] * 140 / natural[0], "y": box["height"] * 100 / natural[1]})
    try:
        page.locator("#focus").get_by_text(re.compile(r"the image at \(1[34]\d, (9\d|10\d)\) attends to")).wait_for(timeout=30_000)
    finally:
        page.screenshot(path=str(ARTIFACTS / "app-token-attention.png"), full_page=True)
    # The playhead follows the player: halfway through the clip, it stands halfway across the spectrogram.
    page.evaluate("""() => { const root = document.querySelector('#audio-input');
        const all = [...root.querySelectorAll('audio')];
        root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) all.push(...e.shadowRoot.querySelectorAll('audio')); });
        all.filter(a => isFinite(a.duration) && a.duration > 0).forEach(a => { a.currentTime = a.duration / 2; }); }""")
    page.wait_for_selector("#playhead", state="visible", timeout=10_000)
    share = page.evaluate("""() => { const img = document.querySelector('#audio-heatmap img'), box = img.getBoundingClientRect();
        const line = document.querySelector('#playhead').getBoundingClientRect(), scale = box.width / img.naturalWidth;
        return (line.left - box.left) / ((img.naturalWidth - %d) * scale); }""" % SCALE_WIDTH)
    assert abs(share - 0.5) < 0.05
    page.locator("#compare-precision").click()
    page.locator("#precision-comparison").get_by_text("top-10% overlap").wait_for(timeout=60_000)
    page.locator("#similarity").get_by_text("audio").first.wait_for(timeout=30_000)

    # Find matching: the drawn 7 finds clips of the sample; a click on one explains it alone.
    page.locator("#find-matching").get_by_text("Find matching items in the sample").click()
    page.locator("#find").click()
    page.locator("#matches").get_by_text(re.compile(r"7_jackson_\d+\.wav")).filter(visible=True).first.wait_for(timeout=60_000)
    page.locator("#matches").get_by_text(re.compile(r"7_jackson_\d+\.wav")).filter(visible=True).first.click()
    page.locator("#notice").get_by_text("from audio, explained by relevance").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "app-find-matching.png"), full_page=True)

    # The dataset view: the shipped sample, only its errors, a row explained.
    page.locator("#dataset").get_by_text("Inspect a dataset").click()
    page.locator("#open-dataset").click()
    page.locator("#dataset-count").get_by_text(re.compile(r"of 500 items")).wait_for(timeout=120_000)
    page.locator("#only-errors input").check()
    page.locator("#dataset-count").get_by_text(re.compile(r"^\d+ of 500 items · (\d+) wrong")).wait_for(timeout=30_000)
    page.locator("#dataset-table").get_by_text("False").filter(visible=True).first.click()
    page.locator("#notice").get_by_text(re.compile(r"from (image|audio|text), explained by relevance")).wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "app-dataset.png"), full_page=True)


def test_corrupt_upload_shows_the_error_and_the_app_keeps_serving(url, browser, tmp_path):
    page = browser.new_page(locale="en-US")
    page.goto(url)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    page.locator("#audio-input input[type=file]").first.set_input_files(str(broken))
    page.wait_for_timeout(1000)
    page.locator("#predict").click()
    page.get_by_text("could not decode the audio", exact=False).first.wait_for(timeout=30_000)
    page.reload()
    page.locator("#text-input textarea").fill("drei")
    page.locator("#predict").click()
    page.locator("#prediction").get_by_text("3").first.wait_for(timeout=30_000)


def test_the_interface_speaks_chinese(url, browser):
    page = browser.new_page(locale="zh-CN")
    page.goto(url)
    page.get_by_text("预测", exact=True).first.wait_for(timeout=30_000)
    assert page.get_by_text("文本", exact=True).count() >= 1
