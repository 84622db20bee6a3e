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


def test_run_page_embeds_every_image_and_tables_the_metrics(tmp_path):
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
