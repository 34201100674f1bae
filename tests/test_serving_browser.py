"""racm3 serve in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) opens
the page of a `racm3 serve` on a free loopback port, draws a caption, captions an upload, and saves a screenshot.

RACM3_SERVE_SCREENSHOT=PATH runs it over the shipped model and the emoji memory instead of the tiny fixtures and
writes the screenshot there (the README's docs/serve.png was taken so).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TOKEN = "browser-token"


def _skip_without_browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(f"needs Chromium and its driver: {INSTALL}")
    pytest.importorskip("selenium", reason=f"needs Selenium: {INSTALL}")


def start_serve(args: list[str], timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`racm3 serve ARGS --port 0` as a child process; returns it and the URL it printed."""
    command = [sys.executable, "-c", "from racm3.cli import app; app()", "serve", "--port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            seen.append(line)
            if line.startswith("racm3 serve: http://127.0.0.1:"):
                return proc, line.split()[2]
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"racm3 serve did not start: {''.join(seen)[-2000:]}")


@pytest.fixture()
def browser():
    _skip_without_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1240,860", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, seconds: float = 90.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition)


def _shrink_png(path: Path, limit: int = 300_000) -> None:
    """A screenshot as a palette PNG (the page is mostly flat colour) when the full-colour file is over limit."""
    from PIL import Image

    if path.stat().st_size > limit:
        Image.open(path).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(path, optimize=True)


def test_page_draws_captions_and_escapes(browser, tiny_model_dir, tmp_path):
    import json
    import urllib.request

    from selenium.webdriver.common.by import By

    shot = os.environ.get("RACM3_SERVE_SCREENSHOT")
    if shot:
        args, caption, upload_caption = [], "flag: France", "grinning face"
    else:
        memory = tmp_path / "memory"
        shutil.copytree(tiny_model_dir[1], memory)
        args, caption, upload_caption = ["--model", str(tiny_model_dir[0]), "--memory", str(memory)], "red circle", None
    proc, url = start_serve([*args, "--token", TOKEN])
    try:
        d = browser
        d.get(url)
        _wait(d, lambda d: "documents" in d.find_element(By.ID, "info").text)
        box = d.find_element(By.ID, "caption")
        box.clear()
        box.send_keys(caption)
        d.find_element(By.ID, "draw").click()
        # progress shows while the generation runs (the button is disabled until it ends)
        _wait(d, lambda d: d.execute_script("return !!document.getElementById('draw-image').src"
                                            " && document.getElementById('draw-image').naturalWidth > 0"))
        assert d.find_element(By.ID, "draw-image").get_attribute("src").startswith("data:image/png;base64,")
        _wait(d, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#draw-sources .card img')].every(i => i.complete && i.naturalWidth)"))
        sources = d.find_elements(By.CSS_SELECTOR, "#draw-sources .card")
        assert sources and all(s.find_element(By.CLASS_NAME, "cap").text for s in sources)
        assert "score" in sources[0].find_element(By.CLASS_NAME, "score").text
        assert d.find_element(By.ID, "error").text == ""
        assert d.execute_script("return document.getElementById('progress').classList.contains('on')") is False
        png = tmp_path / "serve.png"
        d.save_screenshot(str(png))
        assert png.stat().st_size > 10_000

        # image -> caption: upload a file
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=describe]").click()
        image_path = tmp_path / "upload.png"
        if upload_caption is None:
            from generator_fixtures import draw

            draw("blue", "square", "filled").save(image_path)
        else:  # the emoji memory's own drawing of the caption
            hits = json.loads(urllib.request.urlopen(urllib.request.Request(
                url + "v1/retrieve", data=json.dumps({"text": upload_caption, "k": 1}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30).read())["hits"]
            image_path.write_bytes(urllib.request.urlopen(url + hits[0]["image_url"].lstrip("/"), timeout=30).read())
        d.find_element(By.ID, "describe-file").send_keys(str(image_path))
        d.find_element(By.ID, "describe").click()
        _wait(d, lambda d: d.find_element(By.ID, "describe-text").text.strip() != "")
        assert d.find_elements(By.CSS_SELECTOR, "#describe-sources .card")

        # a caption holding markup is shown as text, never run
        hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
        import base64

        picture = base64.b64encode(image_path.read_bytes()).decode()  # with an image: retrieval puts those first
        req = urllib.request.Request(url + "v1/memory/documents",
                                     data=json.dumps({"id": "hostile", "text": hostile, "image": picture}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        assert urllib.request.urlopen(req, timeout=30).status == 201
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=search]").click()
        d.find_element(By.ID, "search-text").send_keys(hostile)
        d.find_element(By.ID, "search").click()
        _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-hits .card .cap"))
        caps = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#search-hits .card .cap")]
        assert hostile in caps and d.execute_script("return window.__pwned") is None
        assert not d.find_elements(By.CSS_SELECTOR, "#search-hits b")
        urllib.request.urlopen(urllib.request.Request(url + "v1/memory/documents/hostile", method="DELETE",
                                                      headers={"Authorization": f"Bearer {TOKEN}"}), timeout=30)
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, shot)
            _shrink_png(Path(shot))
    finally:
        proc.terminate()
        proc.wait(20)
