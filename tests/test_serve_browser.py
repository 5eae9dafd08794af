"""The demo page in a real browser: Debian's Chromium driven by Playwright against `fusionseg serve` on
127.0.0.1 with the default model. `.ci/run` installs Chromium; without it (or Playwright) the test skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FUSIONSEG_CHROMIUM", "/usr/bin/chromium")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'fusionseg[serve]')")

from playwright.sync_api import sync_playwright  # noqa: E402

from fusionseg.serve import ServeConfig, create_app, serve_in_thread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAT = REPO / "examples" / "cat_toilet.jpg"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server_url():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    with serve_in_thread(create_app(ServeConfig(model="default", workers=1, queue=4))) as url:
        yield url
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(server_url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = ctx.new_page()
        # Offline: every request must go to our own server.
        outside: list[str] = []
        pg.on("request", lambda r: None if r.url.startswith((server_url, "data:", "blob:")) else outside.append(r.url))
        pg.outside = outside
        pg.goto(server_url + "/")
        yield pg
        browser.close()


def test_upload_three_classes_and_segment(page, tmp_path):
    page.set_input_files("#file", str(CAT))
    page.fill("#classes", "cat, toilet, sink")
    page.click("#segment")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert page.is_hidden("#error")
    # the overlay is drawn at the photo's size and is visible
    size = page.eval_on_selector("#overlay", "c => [c.width, c.height]")
    assert size == [640, 522]
    assert page.is_visible("#overlay")
    # no threshold typed: the model's own decision, as the CLI decides (the page sent no threshold)
    assert page.input_value("#threshold") == "" and "relative decision" in page.text_content("#timing")
    box = page.locator("#overlay").bounding_box()
    assert box["width"] > 200 and box["height"] > 150
    # the legend lists the three names, the chart has a bar per class plus "none of these"
    names = page.eval_on_selector_all("#legend li", "els => els.map(e => e.dataset.name)")
    assert sorted(names) == ["cat", "sink", "toilet"]
    assert page.locator("#chart .row").count() == 4
    # the overlay really shows class colour: some pixels differ from the plain photo
    coloured = page.evaluate("""() => {
        const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let red = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 150 && d[i + 1] < 110 && d[i + 2] < 110) red++;
        return red / (d.length / 4);
    }""")
    assert coloured > 0.05  # the cat (class 1, red) covers a good part of the picture
    # hover reads a pixel's class and score: the cat's body is at the picture's centre-left
    cx, cy = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
    page.mouse.move(cx, cy)
    info = page.text_content("#pixel-info")
    assert "cat" in info and "score 0." in info, info
    # the download links carry the label PNG and the overlay
    with page.expect_download() as dl:
        page.click("#download-label")
    path = tmp_path / "labels.png"
    dl.value.save_as(path)
    from PIL import Image
    assert Image.open(path).size == (640, 522)
    assert page.get_attribute("#download-overlay", "href").startswith("blob:")
    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FUSIONSEG_SCREENSHOT"):
        page.screenshot(path=os.environ["FUSIONSEG_SCREENSHOT"], full_page=True)
    assert page.outside == []


def test_errors_are_shown_on_the_page(page):
    page.fill("#classes", "cat, , dog")
    page.click("#segment")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "blank" in page.text_content("#error")
    page.fill("#classes", "cat, Cat")
    page.click("#segment")
    page.wait_for_function("document.getElementById('error').textContent.includes('duplicate')", timeout=30_000)
    # a file that is not an image
    page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a picture"}])
    page.fill("#classes", "cat")
    page.click("#segment")
    page.wait_for_function("document.getElementById('error').textContent.includes('not an image')", timeout=30_000)
    assert page.is_enabled("#segment")


def test_bundled_example(page):
    page.fill("#classes", "")
    page.click("#examples button[data-file='elephant.jpg']")
    page.wait_for_function("document.getElementById('classes').value.includes('elephant')")
    page.click("#segment")
    page.wait_for_function("document.getElementById('timing').textContent.includes('480 × 305')", timeout=60_000)
    names = page.eval_on_selector_all("#legend li:not(.absent)", "els => els.map(e => e.dataset.name)")
    assert "elephant" in names
    assert page.is_hidden("#error")
