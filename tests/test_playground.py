"""The playground page at ``/`` in a real headless browser (Debian's chromium, driven by
playwright; no browser is downloaded). ``.ci/run`` installs chromium, so in CI this test runs;
elsewhere it is skipped only when no chromium is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from models.data.schema import load_dataset
from tests.test_service import _settings, serve

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
)


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium here (apt-get install chromium)")
    return CHROMIUM


def test_page_links_a_mention_with_an_image(
    chromium: str, artifacts: tuple[Path, Path], tiny_world: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    ds = load_dataset(tiny_world)
    with serve(_settings(artifacts)) as (base, _):
        # a test mention with an image whose gold the server ranks first: the page must show
        # the API's answer (the model is a tiny random one; the page is what is tested)
        chosen = None
        for m in ds.split("test") + ds.split("dev"):
            if not m.image:
                continue
            body = {"mention": m.mention, "sentence": m.sentence, "top_k": 5}
            files = {"image": ("m.jpg", ds.resolve(m.image).read_bytes(), "image/jpeg")}
            r = httpx.post(f"{base}/v1/link/form", data=body, files=files, timeout=30)
            if r.json()["candidates"][0]["entity_id"] == m.entity_id:
                chosen = m
                break
        assert chosen is not None and chosen.image is not None
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            console_errors: list[str] = []
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(f"{base}/")
            page.wait_for_selector("#reranker option[value=mimic]", state="attached")
            page.fill("#mention", chosen.mention)
            page.fill("#sentence", chosen.sentence)
            page.set_input_files("#file", str(ds.resolve(chosen.image)))
            page.wait_for_function("document.getElementById('preview').style.display === 'block'")
            page.select_option("#reranker", "mimic")
            page.click("#go")
            page.wait_for_selector("li.cand")
            first = page.locator("li.cand").first
            assert first.get_attribute("data-entity-id") == chosen.entity_id
            # the KB image and attributes come from the entity routes; explain draws bars
            page.wait_for_function(
                "document.querySelector('li.cand .thumb').src.startsWith('blob:')"
            )
            assert "Occupation" in first.locator(".attrs").inner_text()
            assert first.locator(".bar").count() == 3  # MIMIC's units: tglu, vdlu, cmfu
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            # an API error is shown as the API's message
            page.fill("#mention", "x" * 400)
            page.click("#go")
            page.wait_for_selector("#error", state="visible")
            assert "mention over" in page.inner_text("#error")
            assert not console_errors
            browser.close()
