"""Figures: PNGs that decode, drawn from the data given, written atomically; bad input refused."""

import imageio.v3 as iio
import pytest
import torch

from stem.plots import image_grid, plot_curves


def test_plot_curves_writes_a_png_and_no_temporary_file(tmp_path):
    path = plot_curves(tmp_path / "curve.png", {"ddim": [0.5, 0.6, 0.7], "stem": [0.9, 0.95, 0.97]},
                       x=[1, 21, 41], xlabel="t", ylabel="similarity")
    image = iio.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_image_grid_shows_the_images_it_is_given(tmp_path):
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1
    path = image_grid(tmp_path / "grid.png", {"red": red, "small": torch.rand(1, 3, 4, 4)}, ["a", "b"])
    image = iio.imread(path)[..., :3].reshape(-1, 3).astype(int)
    assert ((image == [255, 0, 0]).all(1)).sum() > 1000  # the pure-red cells are drawn as they are


@pytest.mark.parametrize("call, match", [
    (lambda p: plot_curves(p, {}), "every curve needs at least one value"),
    (lambda p: plot_curves(p, {"a": []}), "every curve needs at least one value"),
    (lambda p: image_grid(p, {}), "no rows"),
    (lambda p: image_grid(p, {"gray": torch.rand(2, 1, 4, 4)}),
     r"row 'gray' must be \(F, 3, h, w\), got \(2, 1, 4, 4\)"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
