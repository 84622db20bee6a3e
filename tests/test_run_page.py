"""``python -m analyses.report --run DIR``: one HTML page that needs no other file."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from analyses.run_page import build_run_page
from tests.conftest import REPO


class Page(HTMLParser):
    """Every tag's attributes, and the text of each table cell."""

    def __init__(self):
        super().__init__()
        self.tags, self.cells, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False if tag in ("td", "th") else self._in_cell

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 10, 3), value, np.uint8)).save(path)


def make_run(tmp_path) -> None:
    """A run folder with params, metrics, tables and five small figures."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"miou": 0.4081, "per_class_iou": {"background": 0.97}}))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "per_class_iou.csv").write_text("class,iou\nbackground,0.97\ndigit_0,0.5\n")
    (tmp_path / "plots" / "confusion.csv").write_text("actual,predicted\nNOT_SHOWN,NOT_SHOWN\n")
    for index, relative in enumerate(["plots/overlays/test_00000.png", "plots/overlays/test_00001.png",
                                      "plots/corruptions.png", "segmentations/demo_00000.overlay.png",
                                      "plots/suggestions.png"]):
        png(tmp_path / relative, 40 * index)


def test_run_page_embeds_every_image_and_tables_the_metrics(tmp_path):
    make_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "analyses.report", "--run", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "report.html").read_text()
    assert text == build_run_page(tmp_path)
    page = Page()
    page.feed(text)
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 5
    for index, source in enumerate(images):  # in the page's order: overlays, corruptions, segment, suggest
        assert source.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert decoded.size == (10, 6) and decoded.getpixel((0, 0)) == (40 * index,) * 3
    # nothing else is fetched: no stylesheet, script or link to another file
    assert not [attrs for tag, attrs in page.tags if tag in ("link", "script", "iframe")]
    assert {"miou", "0.4081", "per_class_iou.background", "0.9700", "digit_0", "0.5000"} <= set(page.cells)
    assert "NOT_SHOWN" not in text  # the per-pixel confusion rows are no table for a page
    assert "no plots/kmeans/*.png in this run" in text
    assert "ddpm:" in text and "t_steps:" in text  # params.yaml, as written


def test_run_page_names_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.yaml does not exist: give --run the folder of a run"):
        build_run_page(tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def images_in_browser(page, profile) -> tuple[list[bool], list[dict]]:
    """Open ``page`` in headless Chromium with every network request sent to a closed port: whether each
    image loaded (complete, naturalWidth > 0), the console's errors, and a screenshot beside the page."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(page.as_uri())
        loaded = driver.execute_script(
            "return Array.from(document.images).map(image => image.complete && image.naturalWidth > 0)")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        driver.save_screenshot(str(page.with_suffix(".png")))
    finally:
        driver.quit()
    return loaded, errors


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver packages "
                    "(.ci/run installs them with apt-get where it can)")
def test_the_run_page_shows_every_image_in_a_real_browser_with_the_network_off(tmp_path):
    make_run(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(build_run_page(tmp_path))
    loaded, errors = images_in_browser(page, tmp_path / "profile")
    assert loaded == [True] * 5 and not errors, (loaded, errors)
    assert Image.open(tmp_path / "report.png").size[0] > 100  # the screenshot of the page
    # the check can fail: the same page with one image taken from a file that is not there
    text = page.read_text()
    first = text.index("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:first] + "missing.png" + text[text.index('"', first):])
    loaded, errors = images_in_browser(broken, tmp_path / "profile2")
    assert loaded[0] is False and all(loaded[1:]) and errors


def test_the_experiments_page_tables_each_run_with_the_params_that_differ(tmp_path):
    """``python -m analyses.report --compare exp_show.json``: one page from a real `dvc exp show --json`."""
    exp_show = REPO / "tests" / "data" / "analyses" / "exp_show.json"
    out = tmp_path / "experiments.html"
    result = subprocess.run([sys.executable, "-m", "analyses.report", "--compare", str(exp_show), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = Page()
    page.feed(out.read_text())
    assert not [attrs for tag, attrs in page.tags if tag in ("link", "script", "iframe", "img")]
    header = page.cells[: page.cells.index("experiment") + 20]
    assert "features.representation" in header and "test mIoU" in header
    assert "dataset.name" not in page.cells  # equal in every run: no column
    rows = json.loads(exp_show.read_text())
    rgb = next(entry for entry in rows[1]["experiments"] if entry["name"] == "bl-rgb")["revs"][0]["data"]
    assert f"{rgb['metrics']['metrics/eval.json']['data']['miou']:.4f}" in page.cells
    assert {"workspace", "bl-rgb", "bl-ddpm", "rgb", "ddpm"} <= set(page.cells)
