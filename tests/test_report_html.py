"""fedflat report --html: one self-contained page, rendered in a real headless Chromium
(issue 12). The browser test skips, with its reason, only where chromium or playwright is
absent."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_scenario

import fedflat
from fedflat.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep folder of 2 points x 1 seed (runs made in-process; sweep.json as the sweep
    runner writes it), one run with a privacy ledger."""
    root = tmp_path_factory.mktemp("sweep")
    points = []
    for i, lr in enumerate((0.05, 0.2)):
        name = f"lr{lr}-seed3"
        fedflat.run(tiny_scenario(**{"client.lr": lr, "eval.per_client": True,
                                     "output.plots": False, "name": f"tiny-lr{lr}"}),
                    out=root / "runs" / name)
        points.append({"index": i, "label": f"client.lr={lr}", "overrides": {"client.lr": lr},
                       "runs": [{"seed": 3, "dir": f"runs/{name}", "status": "completed"}]})
    (root / "sweep.json").write_text(json.dumps({"format": 1, "points": points,
                                                 "target": None}))
    ledger = {"accountant": "rdp", "sample_level": None, "notes": [],
              "user_level": {"noise_multiplier": 1.1, "sampling_rate": 0.3,
                             "rounds_accounted": 4, "epsilon": 1.2345, "epsilon_budget": 2.0,
                             "delta": 1e-5}}
    (root / "runs" / "lr0.2-seed3" / "privacy.json").write_text(json.dumps(ledger))
    return root


def _page(sweep_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "report.html"
    assert main(["report", str(sweep_dir), "--html", str(out)]) == 0
    return out, out.read_text()


def test_page_is_self_contained_and_holds_every_section(sweep_dir, tmp_path):
    _, text = _page(sweep_dir, tmp_path)
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert len(srcs) >= 6  # run plots, sweep plots, the per-client histogram
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from outside
    assert "<script" not in text
    for needle in ("tiny-lr0.05", "tiny-lr0.2", "client.lr=0.05", "Per-client fairness",
                   "Privacy ledger", "1.234", "Resolved scenarios", "per_client: true"):
        assert needle in text, needle
    # The fairness table shows each run's last per_client/accuracy_worst10, as metrics.jsonl.
    for name in ("lr0.05-seed3", "lr0.2-seed3"):
        metrics = [json.loads(ln) for ln in
                   (sweep_dir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert f"{metrics[-1]['per_client/accuracy_worst10']:.4f}" in text


def test_page_renders_in_headless_chromium(sweep_dir, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium is not installed ({CHROMIUM}); apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (extra: browser)")
    page_path, _ = _page(sweep_dir, tmp_path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            sizes = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            run_cells = page.eval_on_selector_all(
                "table.runs tbody tr td:first-child", "tds => tds.map(t => t.textContent)")
            points = page.eval_on_selector_all(
                "table.sweep tbody tr td:first-child", "tds => tds.map(t => t.textContent)")
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(sizes) >= 6
    assert all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    assert sorted(run_cells) == ["tiny-lr0.05", "tiny-lr0.2"]
    assert points == ["client.lr=0.05", "client.lr=0.2"]
