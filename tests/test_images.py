import numpy as np
from PIL import Image

from cxr.images import load_grey, resize, to_grey_uint8


def test_grey_rgb_rgba_and_16_bit_decode_alike(tmp_path):
    grey = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    variants = {
        "l.png": Image.fromarray(grey),
        "rgb.png": Image.fromarray(np.stack([grey] * 3, -1)),
        "rgba.png": Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])),
        "i16.png": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    for name, img in variants.items():
        img.save(tmp_path / name)
        out = load_grey(tmp_path / name, 64)
        assert out.dtype == np.uint8 and out.shape == (64, 64), name
        assert np.abs(out.astype(int) - grey).max() <= 1, name


def test_resize_keeps_range_and_flat_areas():
    ramp = np.tile(np.linspace(0, 255, 80).round().astype(np.uint8), (100, 1))
    small = resize(ramp, 32)
    assert small.shape == (32, 32) and small.dtype == np.uint8
    assert small.min() <= 4 and small.max() >= 251  # the ends survive antialiasing
    assert (np.diff(small.astype(int), axis=1) >= 0).all()  # and the ramp stays a ramp
    assert (resize(np.full((100, 80), 200, np.uint8), 32) == 200).all()
    same = ramp[:32, :32]
    assert resize(same, 32) is same  # already that size: untouched


def test_16_bit_images_are_scaled_not_clipped():
    img = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    assert to_grey_uint8(img).max() == 255
