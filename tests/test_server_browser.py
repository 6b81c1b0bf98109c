"""The web page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A tiny random-weight pipeline serves on a loopback port; the tests open a real non-square photo,
paint with mouse events, run, download the result and check its pixels against the mask the page
sent. They skip on a machine without /usr/bin/chromium and fail under CI=true.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import far_from_mask, shared_path, tiny_pipeline
from PIL import Image
from server_helpers import ServerThread

from moebius.server.app import ServerConfig, create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "out" / "browser"  # /out/ is gitignored
PHOTO = "skimage_chelsea.png"  # 451 x 300: non-square, odd width
STEPS = 4  # a few denoising steps keep each run about a second with the tiny model


def _need_browser():
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}: CI must run the browser tests")
        pytest.skip(problem)


class Recording:
    """The pipeline, recording the masks it receives (what the page sent, as the server read it)."""

    def __init__(self, pipe):
        self.pipe, self.masks = pipe, []

    def __call__(self, images, masks, **kwargs):
        self.masks.extend(masks)
        return self.pipe(images, masks, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread of a busy machine
    pipe = Recording(tiny_pipeline())
    app = create_app(lambda: pipe, ServerConfig(queue_size=4, timeout=120))
    with ServerThread(app) as running:
        running.pipe = pipe
        yield running
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760}, accept_downloads=True)
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    page.click("#settings summary")  # open the settings panel, as a user would
    page.fill("#steps", str(STEPS))
    page.click("#settings summary")
    yield page
    context.close()


def open_photo(page) -> Image.Image:
    path = shared_path("data", "photos", PHOTO)
    page.set_input_files("#open", str(path))
    page.wait_for_selector("#canvases:not([hidden])")
    page.wait_for_function("!document.getElementById('run').disabled")
    return Image.open(path).convert("RGB")


def paint(page, start: tuple[float, float], end: tuple[float, float], moves: int = 12):
    """A mouse stroke between two points given as fractions of the displayed image."""
    box = page.locator("#mask").bounding_box()
    x0, y0 = box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"]
    x1, y1 = box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=moves)
    page.mouse.up()


def run_and_capture_mask(page, server) -> np.ndarray:
    """Press Run, wait for the result; the mask the page sent, as bool [H, W] (True = fill)."""
    sent = server.pipe.masks
    sent.clear()
    page.click("#run")
    page.wait_for_function(
        "/^(done|\\d{3} )/.test(document.getElementById('status').textContent)",
        timeout=120_000,
    )
    status = page.text_content("#status")
    assert status.startswith("done"), status
    assert len(sent) == 1
    return np.asarray(sent[0].convert("L")) >= 128


def download(page) -> Image.Image:
    with page.expect_download() as info:
        page.click("#download")
    return Image.open(info.value.path())


def test_paint_run_download(page, server):
    photo = open_photo(page)
    paint(page, (0.30, 0.40), (0.55, 0.60))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "painted.png"))
    fill = run_and_capture_mask(page, server)
    page.screenshot(path=str(SCREENSHOTS / "after_run.png"))
    result = download(page)

    width, height = photo.size
    assert fill.shape == (height, width)  # the mask is sent at the image's full resolution
    rows, cols = np.nonzero(fill.any(axis=1))[0], np.nonzero(fill.any(axis=0))[0]
    # The stroke spans 30%..55% x 40%..60% of the image, widened by the brush (40 screen px).
    brush = 40 * width / page.locator("#mask").bounding_box()["width"]
    assert (
        abs(cols[0] - 0.30 * width) <= brush / 2 + 2
        and abs(cols[-1] - 0.55 * width) <= brush / 2 + 2
    )
    assert (
        abs(rows[0] - 0.40 * height) <= brush / 2 + 2
        and abs(rows[-1] - 0.60 * height) <= brush / 2 + 2
    )

    assert result.size == photo.size and result.mode == "RGB"
    before, after = np.asarray(photo), np.asarray(result)
    outside = far_from_mask(fill, native=128)  # beyond the widest feather (README)
    assert outside.mean() > 0.5  # most of the image is checked
    np.testing.assert_array_equal(after[outside], before[outside])
    changed = (after != before).any(axis=-1)
    assert changed[fill].mean() > 0.9  # random weights fill the hole with something else

    # Before / after: the view shows the result; holding Tab or the compare slider the original.
    x, y = int(cols.mean()), int(rows.mean())
    assert fill[y, x] and (after[y, x] != before[y, x]).any()

    def shown() -> np.ndarray:
        rgba = page.evaluate(f"Array.from(viewCtx.getImageData({x}, {y}, 1, 1).data)")
        return np.array(rgba[:3])

    assert np.abs(shown() - after[y, x]).max() <= 2
    page.keyboard.down("Tab")
    assert np.abs(shown() - before[y, x]).max() <= 2
    page.keyboard.up("Tab")
    assert np.abs(shown() - after[y, x]).max() <= 2
    page.locator("#compare").fill("100")  # slider fully right: all original
    assert np.abs(shown() - before[y, x]).max() <= 2
    page.keyboard.press("]")
    assert page.input_value("#size") == "45"

    # Continue editing: the result becomes the input, with an empty mask.
    page.click("#continue")
    page.wait_for_function("document.getElementById('undo').disabled")
    assert page.text_content("#status").endswith(f"{width}x{height}")


def test_undo_removes_stroke_from_sent_mask(page, server):
    photo = open_photo(page)
    width, height = photo.size
    paint(page, (0.10, 0.20), (0.25, 0.25))  # stroke A, left
    paint(page, (0.70, 0.70), (0.85, 0.75))  # stroke B, right
    page.keyboard.press("Control+z")  # undo B
    fill = run_and_capture_mask(page, server)
    left, right = fill[:, : width // 2], fill[:, width // 2 :]
    assert left.sum() > 100 and right.sum() == 0

    page.keyboard.press("Control+Shift+z")  # redo B: both strokes are sent
    fill = run_and_capture_mask(page, server)
    assert fill[:, : width // 2].sum() == left.sum() and fill[:, width // 2 :].sum() > 100
    assert fill.shape == (height, width)


def test_load_mask_file_then_erase(page, server):
    open_photo(page)
    mask_file = shared_path("data", "photos", PHOTO.replace(".png", "_mask.png"))
    page.set_input_files("#open-mask", str(mask_file))
    page.wait_for_function("!document.getElementById('undo').disabled")
    expected = np.asarray(Image.open(mask_file).convert("L")) >= 128
    np.testing.assert_array_equal(run_and_capture_mask(page, server), expected)

    page.keyboard.press("e")  # eraser: a wide stroke across the whole image removes a band
    assert "active" in page.get_attribute("#eraser", "class")
    paint(page, (0.01, 0.5), (0.99, 0.5))
    fill = run_and_capture_mask(page, server)
    height = fill.shape[0]
    band = slice(int(0.5 * height) - 5, int(0.5 * height) + 5)
    assert not fill[band].any() and expected[band].any(), np.nonzero(fill[band])
    assert (fill <= expected).all()  # erasing never adds to the mask
