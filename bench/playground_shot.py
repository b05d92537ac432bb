"""Screenshot of the playground on a running server (the README's picture).

Fills the page with a demo test mention and its image, as a person would, waits for the ranked
entities with their KB images, and saves a PNG. Uses the system's chromium (Debian package).

    mel-serve ... &    # e.g. make demo
    python bench/playground_shot.py --url http://127.0.0.1:8000 --data artifacts/demo-world \\
        --out docs/playground.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import httpx

from models.data.schema import load_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--data", default="artifacts/demo-world")
    p.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    p.add_argument("--reranker", default="", help="'' = the server's default")
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    ds = load_dataset(a.data)
    chosen = None
    # the first test mention with an image, whose gold entity has one too, linked right
    for m in ds.split("test"):
        row = ds.entity_row.get(m.entity_id or "")
        gold = ds.entities[row] if row is not None else None
        if not m.image or gold is None or not gold.images:
            continue
        files = {"image": ("m.jpg", ds.resolve(m.image).read_bytes(), "image/jpeg")}
        data = {"mention": m.mention, "sentence": m.sentence, "top_k": 3}
        r = httpx.post(f"{a.url}/v1/link/form", data=data, files=files, timeout=60)
        if r.status_code == 200 and r.json()["candidates"][0]["entity_id"] == m.entity_id:
            chosen = m
            break
    if chosen is None or chosen.image is None:
        print("no test mention is linked right", file=sys.stderr)
        return 1
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1150, "height": 820})
        page.goto(f"{a.url}/")
        page.wait_for_selector("#reranker option", state="attached")
        page.fill("#mention", chosen.mention)
        page.fill("#sentence", chosen.sentence)
        page.fill("#topk", "3")
        page.set_input_files("#file", str(ds.resolve(chosen.image)))
        page.wait_for_function("document.getElementById('preview').style.display === 'block'")
        if a.reranker:
            page.select_option("#reranker", a.reranker)
        page.click("#go")
        page.wait_for_selector("li.cand")
        page.wait_for_function(
            "[...document.querySelectorAll('li.cand')].every(li => li.dataset.image)"
        )
        first = page.locator("li.cand").first.get_attribute("data-entity-id")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.out), full_page=True)
        browser.close()
    print(f"{a.out}: {chosen.mention!r} -> {first} (gold {chosen.entity_id})")
    return 0 if first == chosen.entity_id else 1


if __name__ == "__main__":
    sys.exit(main())
