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


def _saved(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    import io

    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # the EXIF Orientation tag
    buffer = io.BytesIO()
    img.save(buffer, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_exif_orientation_is_applied_where_every_image_is_decoded():
    """A film stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to
    view") decodes to the upright film: prepare, `cxr predict` and serving all decode here,
    so the network sees the same pixels and gives the same prediction."""
    import base64

    import pandas as pd

    from cxr.images import decode_grey
    from cxr.pyfunc_classifier import to_batch

    grey = np.zeros((60, 90), np.uint8)
    grey[:15] = 255  # a bright band at the top: upright and sideways differ everywhere
    upright = Image.fromarray(grey)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # 90 degrees anticlockwise
    assert np.array_equal(decode_grey(_saved(sideways, "PNG", orientation=6)), grey)
    assert np.array_equal(decode_grey(_saved(upright, "PNG", orientation=1)), grey)

    def served(data: bytes) -> np.ndarray:
        frame = pd.DataFrame({"image": [base64.b64encode(data).decode()]})
        return to_batch(frame, 32, min_size=1)[0, ..., 0].astype(int)

    as_sent = served(_saved(upright, "JPEG"))
    rotated = served(_saved(sideways, "JPEG", orientation=6))
    assert np.abs(rotated - as_sent).mean() < 2  # JPEG's noise only
    assert np.abs(served(_saved(sideways, "JPEG")) - as_sent).mean() > 50  # no tag: sideways


def test_a_lung_mask_is_turned_with_its_sideways_image(tmp_path):
    """The mask of a film stored sideways (drawn on its stored pixels) is turned as the
    film is: prepare's masks.npy stays aligned with images.npy."""
    from cxr.classes import DATASET_DIR
    from cxr.images import decode_upright
    from cxr.lungs import read_mask

    images = tmp_path / DATASET_DIR / "COVID" / "images"
    images.mkdir(parents=True)
    (images.parent / "masks").mkdir()
    band = np.zeros((60, 90), np.uint8)
    band[:15] = 255
    sideways = Image.fromarray(band).transpose(Image.Transpose.ROTATE_90)
    (images / "x.jpg").write_bytes(_saved(sideways, "JPEG", orientation=6))
    sideways.save(images.parent / "masks" / "x.jpg")  # the mask as stored: sideways too
    grey, turn = decode_upright(images / "x.jpg")
    assert grey.shape == (60, 90)  # upright
    mask = read_mask(images.parent / "masks" / "x.jpg", 30, turn)
    assert mask[:5].all() and not mask[10:].any()  # upright: the band at the top
