"""The lung region (cxr.lungs): the template's geometry, mask files, the audit's views."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cxr.lungs import (
    TEMPLATE,
    audit_inputs,
    heat_inside,
    mask_file,
    read_mask,
    template_box,
    template_mask,
)


def test_the_template_is_two_lungs_one_each_side_of_the_midline():
    mask = template_mask(100)
    labels, n = ndimage.label(mask)
    assert n == 2
    (ly, lx), (ry, rx) = ndimage.center_of_mass(mask, labels, [1, 2])
    assert lx < 50 < rx and ly == pytest.approx(ry)
    # Each ellipse's area, pi * a * b of the image, within a pixel's rounding.
    expected = sum(np.pi * a * b for _, _, a, b in TEMPLATE)
    assert mask.mean() == pytest.approx(expected, rel=0.03)
    assert template_mask(100, margin=0.04).sum() > mask.sum()


def test_the_box_view_is_the_crop_of_the_full_template():
    box = template_box(0.04)
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    full = template_mask(400, 0.04)
    crop = full[round(y0 * 400) : round(y1 * 400), round(x0 * 400) : round(x1 * 400)]
    resized = np.asarray(Image.fromarray(crop).resize((100, 100), Image.NEAREST))
    view = template_mask(100, 0.04, box)
    assert np.mean(resized != view) < 0.02
    assert view.any(axis=0).sum() > 90  # the lungs fill the crop from side to side


def test_mask_files_sit_beside_images_and_are_read_at_any_size(tmp_path):
    images, masks = tmp_path / "COVID" / "images", tmp_path / "COVID" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    (images / "a.png").write_bytes(b"")
    (images / "b.png").write_bytes(b"")
    lung = np.zeros((256, 256, 3), np.uint8)
    lung[64:192, 32:96] = 255  # RGB, as some copies store them
    Image.fromarray(lung).save(masks / "a.png")
    assert mask_file(images / "a.png") == masks / "a.png"
    assert mask_file(images / "b.png") is None
    assert mask_file(tmp_path / "flat.png") is None  # the older layout has no masks
    mask = read_mask(masks / "a.png", 64)
    assert mask.shape == (64, 64) and mask[16:48, 8:24].all() and mask.sum() == 32 * 16
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "empty.png")
    with pytest.raises(ValueError, match="empty"):
        read_mask(masks / "empty.png", 64)
    (masks / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="unreadable lung mask bad.png"):
        read_mask(masks / "bad.png", 64)


def test_audit_views_fill_the_hidden_part_with_the_images_mean_grey():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    masks = np.zeros((3, 16, 16), bool)
    masks[:, 4:12, 2:7] = True
    views = audit_inputs(x, masks)
    assert views["intact"] is x
    for i in range(3):
        mean = np.rint(x[i].mean())
        hidden, only = views["lungs_hidden"][i, ..., 0], views["lungs_only"][i, ..., 0]
        assert (hidden[masks[i]] == mean).all()
        assert np.array_equal(hidden[~masks[i]], x[i, ..., 0][~masks[i]])
        assert (only[~masks[i]] == mean).all()
        assert np.array_equal(only[masks[i]], x[i, ..., 0][masks[i]])
    assert views["lungs_hidden"].dtype == np.uint8 and views["lungs_only"].shape == x.shape


def test_heat_inside_is_the_share_of_each_heatmap_in_its_mask():
    masks = np.zeros((3, 4, 4), bool)
    masks[:, :2] = True
    cams = np.zeros((3, 4, 4))
    cams[0, 0, 0] = 1.0  # all inside
    cams[1, :, :] = 1.0  # spread evenly: the mask's area
    share = heat_inside(cams, masks)
    assert share[0] == 1.0 and share[1] == 0.5 and np.isnan(share[2])
