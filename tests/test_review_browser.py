"""A real browser on the review page: Playwright drives Debian's Chromium (no downloaded browser).

Accept one image with the keyboard, paint another's mask with the brush, reload: both decisions are there.
The test setup installs Chromium with ``apt-get install -y chromium``; when it is missing the test tries
that itself (as root), and skips, saying why, only when it cannot be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_review_fixtures import live_server, make_review_out

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
H, W = 120, 160


def _install_chromium() -> str | None:
    """None when Chromium is there (installing it if possible); else why it cannot be had."""
    if os.access(CHROMIUM, os.X_OK):
        return None
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and apt-get cannot run here: `apt-get install -y chromium` as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(cmd)}` failed: {exc}"
        log = (res.stdout + res.stderr)[-400:]
        if os.access(CHROMIUM, os.X_OK):
            return None
    return f"Chromium could not be installed with apt-get: {log}"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the review extra)")
    reason = _install_chromium()
    if reason:
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_accept_edit_reload_persists(browser, tmp_path: Path) -> None:
    from pixelvote.review.settings import ReviewSettings
    from pixelvote.review.store import ReviewStore

    out = make_review_out(tmp_path, size=(H, W))
    problems: list[str] = []
    with live_server(ReviewSettings(out_dir=out, reviewer="browser-test")) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#stage[data-ready='case 01']")  # flagged and most uncertain: first
        assert "A" in page.inner_text("footer.keys") and "accept" in page.inner_text("footer.keys")

        # 1. accept the first image with the keyboard; the desk moves on to the next one
        page.keyboard.press("a")
        page.wait_for_selector("#queue li[data-key='case 01'] .qs.accept")
        page.wait_for_selector("#stage[data-ready='case 03']")

        # 2. edit the second image's mask: brush a stroke in its empty lower-right corner
        page.keyboard.press("e")
        page.wait_for_selector("#edit-bar:not([hidden])")
        page.fill("#reviewer", "Dr. Brush")
        page.dispatch_event("#reviewer", "change")
        page.locator("#mask").hover()
        box = page.locator("#mask").bounding_box()
        sx, sy = box["width"] / W, box["height"] / H

        def at(x: float, y: float) -> tuple[float, float]:
            return box["x"] + x * sx, box["y"] + y * sy

        page.mouse.move(*at(110, 95))
        page.mouse.down()
        page.mouse.move(*at(145, 100), steps=10)
        page.mouse.up()
        assert page.evaluate(f"() => S.mask[{100 * W + 130}]") == 1
        page.screenshot(path=str(tmp_path / "editing.png"))
        page.keyboard.press("Enter")
        page.wait_for_selector("#queue li[data-key='case 03'] .qs.edit")

        # 3. reload: both decisions come back from the database
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#queue li[data-key='case 01'] .qs.accept")
        page.wait_for_selector("#queue li[data-key='case 03'] .qs.edit")
        page.click("#queue li[data-key='case 03']")
        page.wait_for_selector("#stage[data-ready='case 03']")
        assert "edit" in page.inner_text("#d-status") and "Dr. Brush" in page.inner_text("#d-status")
        assert page.evaluate(f"() => S.mask[{100 * W + 130}]") == 1  # the painted stroke
        assert page.evaluate(f"() => S.mask[{5 * W + 5}]") == 0
        assert "2/" in page.inner_text("#p-flagged")
        page.screenshot(path=str(tmp_path / "review.png"))
        if os.environ.get("PIXELVOTE_SCREENSHOTS"):
            shutil.copy(tmp_path / "review.png", Path(os.environ["PIXELVOTE_SCREENSHOTS"]) / "review.png")
            shutil.copy(tmp_path / "editing.png", Path(os.environ["PIXELVOTE_SCREENSHOTS"]) / "editing.png")
        page.close()

    with ReviewStore(out / "review.sqlite") as st:
        latest = st.latest()
        assert set(latest) == {"case 01", "case 03"} and st.count() == 2
        assert (latest["case 01"].action, latest["case 01"].reviewer) == ("accept", "browser-test")
        edit = latest["case 03"]
        assert (edit.action, edit.label, edit.reviewer) == ("edit", "benign", "Dr. Brush")
        from pixelvote.review.masks import decode_stored

        mask = decode_stored(st.mask_png(edit.id))
    predicted = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "masks/case 03.png")) > 127
    assert mask[100, 130] and not predicted[100, 130]
    assert (mask & predicted).sum() == predicted.sum()  # the predicted lesion is still there
    assert mask.sum() > predicted.sum() + 200
    assert not problems, problems
