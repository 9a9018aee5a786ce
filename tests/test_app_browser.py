"""app.py in a real headless browser (Debian's Chromium driven by Playwright), as a person uses it: bad uploads get a
message on the page, then the held-out example generates at the page's default settings (the demo model's quick
start) and every result shows: the videos, the Rerun viewer on the recording, the novel view, the metrics, and the
archive, downloaded and opened.

It prints how long the first result took to show after pressing Generate (BENCHMARKS.md, "app.py"). With
FOURDNEX_APP_SCREENSHOT=PATH it also saves a screenshot of the finished page there (README.md's docs/app.png).

Where no Chromium is found the test skips, unless FOURDNEX_BROWSER_REQUIRED is set (.ci/run installs Chromium and
sets it): in CI it must run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 300_000  # generous: many times a job's time on a 2-core CPU (BENCHMARKS.md, "The web page (app.py)")


def find_chromium() -> str | None:
    """Chromium's executable: FOURDNEX_CHROMIUM, else Debian's, else one on PATH."""
    for candidate in (os.environ.get("FOURDNEX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("FOURDNEX_BROWSER_REQUIRED"):
            pytest.fail("no Chromium found, but FOURDNEX_BROWSER_REQUIRED is set (.ci/run installs it)")
        pytest.skip("no Chromium found: apt-get install chromium (as .ci/run does), or set FOURDNEX_CHROMIUM")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """app.py with its defaults (the demo model on the CPU), on a free port of this machine."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"app.py did not start:\n{log.read_text()}")
            time.sleep(0.5)
    yield url, process, log
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, text: str) -> None:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=TIMEOUT_MS
    )


def _upload(page, path: Path) -> None:
    """Put ``path`` into the image box (clearing what it held)."""
    clear = page.locator("#image button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
    page.locator("#image input[type=file]").set_input_files(str(path))


def _video_ready(selector: str) -> str:
    return f"() => {{ const v = document.querySelector('{selector} video'); return !!v && v.readyState >= 2; }}"


def save_screenshot(png: bytes, path: Path, width: int = 1100) -> None:
    """The page's screenshot, scaled to ``width`` and reduced to 256 colours (a few hundred KB at most)."""
    import io

    import PIL.Image

    image = PIL.Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), PIL.Image.LANCZOS)
    image.quantize(256, method=PIL.Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_the_page_generates_shows_and_packs_a_result(chromium, server, tmp_path):
    from playwright.sync_api import sync_playwright
    from test_app import png_header

    url, process, log = server
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    bomb = png_header(tmp_path / "bomb.png", 50_000, 50_000)
    caption = (ROOT / "example" / "demo" / "prompt.txt").read_text().splitlines()[0]
    rrd_responses = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("response", lambda r: rrd_responses.append(r.status) if r.url.endswith("/scene.rrd") else None)
        page.goto(url)

        # Bad uploads: a message on the page, and the page keeps working.
        _upload(page, not_an_image)
        _wait_status(page, "is not an image this app can read")
        _upload(page, bomb)
        _wait_status(page, "claims 2500 megapixels; at most 40 megapixels")
        _upload(page, ROOT / "example" / "demo" / "scene.png")
        page.locator("#caption textarea").fill("   ")
        page.locator("#generate").click()
        _wait_status(page, "the caption is empty")

        # The example at the page's defaults.
        page.locator("#caption textarea").fill(caption)
        start = time.perf_counter()
        page.locator("#generate").click()
        page.wait_for_function(  # the progress bar follows the denoising steps
            "() => /denoising/.test(document.body.innerText)", timeout=TIMEOUT_MS
        )
        page.wait_for_function(_video_ready("#rgb-video"), timeout=TIMEOUT_MS)
        first = time.perf_counter() - start
        page.wait_for_function(_video_ready("#xyz-video"), timeout=TIMEOUT_MS)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\nfirst result on screen {first:.1f} s after pressing Generate (the RGB video playable; load {load})")
        page.wait_for_selector("#viewer iframe", timeout=TIMEOUT_MS)
        page.frame_locator("#viewer iframe").locator("canvas").first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function(_video_ready("#novel"), timeout=TIMEOUT_MS)
        page.locator("#archive a").first.wait_for(timeout=TIMEOUT_MS)
        total = time.perf_counter() - start
        print(f"every result on screen {total:.1f} s after pressing Generate; {_status(page)}")
        assert _status(page).startswith("done in"), _status(page)
        assert "focal length" in page.locator("#camera").inner_text()
        assert "residual median" in page.locator("#metrics").inner_text()
        assert 200 in rrd_responses  # the viewer read the recording

        with page.expect_download() as download:
            page.locator("#archive a").first.click()
        archive = tmp_path / "result.zip"
        download.value.save_as(archive)
        page.wait_for_timeout(5000)  # the viewer draws the first frames of the point cloud
        png = page.screenshot(full_page=True)
        browser.close()

    save_screenshot(png, tmp_path / "app.png")
    if os.environ.get("FOURDNEX_APP_SCREENSHOT"):
        save_screenshot(png, Path(os.environ["FOURDNEX_APP_SCREENSHOT"]))
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert zf.testzip() is None
    expected = {
        "input/image.png",
        "result/00000.mp4",
        "result/00000_rgb.mp4",
        "result/00000_xyz.mp4",
        "result/00000.npz",
        "result/00000.json",
        "result/00000_reg.npz",
        "result/00000_reg.json",
        "result/00000_export/colmap/cameras.txt",
        "result/00000_export/colmap/images.txt",
        "result/00000_export/transforms.json",
        "result/00000_export/ply/frame_00000.ply",
        "novel/00000/novel.mp4",
        "metrics.json",
        "scene.rrd",
    }
    assert expected <= names, sorted(expected - names)
    assert process.poll() is None, log.read_text()  # still serving
