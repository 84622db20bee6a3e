"""The figures people look at say what they show: panel titles, class legend, uncertainty colour bar,
corruption labels (read back from the matplotlib objects, then saved as a PNG)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipeline.outputs.figures import corruption_figure, overlay_figure, palette, save_figure

NAMES = ["background", "cat", "dog", "bird"]
IGNORE = 255


def masks(size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    truth = np.zeros((size, size), np.uint8)
    truth[:4, :4], truth[0, 7] = 1, IGNORE
    prediction = truth.copy()
    prediction[0, 7], prediction[6:, 6:] = 0, 2  # class 2 only predicted; class 3 nowhere
    disagreement = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    return image, truth, prediction, disagreement


def test_overlay_has_four_titled_panels_a_class_legend_and_an_uncertainty_colour_bar(tmp_path):
    image, truth, prediction, disagreement = masks()
    colours = palette(len(NAMES), IGNORE)
    figure = overlay_figure(image, truth, prediction, disagreement, colours, NAMES, IGNORE, title="test image a")
    titled = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in titled] == ["image", "ground truth", "prediction", "uncertainty"]
    # the panels show what they say: the prediction panel is the prediction in the class colours
    assert np.array_equal(titled[2].get_images()[0].get_array(), colours[prediction])
    shown = titled[3].get_images()[0]
    assert np.allclose(shown.get_array(), disagreement) and shown.get_clim() == (0.0, pytest.approx(math.log(2)))
    (bar,) = [axis for axis in figure.axes if axis not in titled]  # the colour bar's own axes
    assert "nats" in bar.get_ylabel()
    (legend,) = figure.legends
    entries = {text.get_text(): patch.get_facecolor()[:3] for text, patch in zip(legend.get_texts(), legend.get_patches())}
    assert list(entries) == ["background", "cat", "dog", "ignore"]  # the classes shown, in class order; not "bird"
    assert np.allclose(entries["cat"], colours[1] / 255) and np.allclose(entries["ignore"], (1, 1, 1))
    assert figure.get_suptitle() == "test image a"
    save_figure(figure, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as picture:
        assert picture.format == "PNG" and picture.width > 3 * picture.height
    assert not (tmp_path / "a.png.tmp").exists()


def test_overlay_without_ground_truth_drops_that_panel():
    image, _, prediction, disagreement = masks()
    figure = overlay_figure(image, None, prediction, disagreement, palette(len(NAMES), IGNORE), NAMES, IGNORE)
    assert [axis.get_title() for axis in figure.axes if axis.get_title()] == ["image", "prediction", "uncertainty"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["background", "cat", "dog"]


def test_corruption_strip_names_each_corruption_and_severity_under_its_image(tmp_path):
    image = masks()[0]
    levels = [("none", 0), ("gaussian_noise", 1), ("blur", 5)]
    figure = corruption_figure([image, image // 2, image // 3], levels)
    assert [axis.get_xlabel() for axis in figure.axes] == ["clean", "gaussian noise\nseverity 1", "blur\nseverity 5"]
    assert np.array_equal(figure.axes[2].get_images()[0].get_array(), image // 3)
    save_figure(figure, tmp_path / "corruptions.png")
    assert Image.open(tmp_path / "corruptions.png").format == "PNG"
    with pytest.raises(ValueError, match="2 images but 3"):
        corruption_figure([image, image], levels)


def test_blend_draws_the_prediction_over_the_image():
    image, _, prediction, disagreement = masks()
    colours = palette(len(NAMES), IGNORE)
    figure = overlay_figure(image, None, prediction, disagreement, colours, NAMES, IGNORE, blend=0.5)
    painted = figure.axes[1].get_images()[0].get_array()
    assert np.array_equal(painted, (0.5 * image + 0.5 * colours[prediction]).round().astype(np.uint8))
