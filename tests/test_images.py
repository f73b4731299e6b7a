import numpy as np
from PIL import Image

from cxr.images import load_grey, to_grey_uint8


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


def test_resize_keeps_range():
    img = Image.fromarray(np.full((100, 80), 200, np.uint8))
    assert to_grey_uint8(img).max() == 200
