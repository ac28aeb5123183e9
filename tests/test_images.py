"""ki_data.images: resize with padding (openpi geometry) and lossless encode/decode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ki_data.images import ImageFormatError, decode_image, decode_images, encode_image, resize_with_pad


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (96, 96), (7, 200), (300, 5)])
def test_resize_with_pad_keeps_aspect_and_centers(shape):
    h, w = shape
    img = np.full((h, w, 3), 200, np.uint8)
    out = resize_with_pad(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    ratio = max(w / 32, h / 32)
    new_h, new_w = max(1, int(h / ratio)), max(1, int(w / ratio))
    content = out.any(axis=-1)
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (new_h, new_w)
    # centered: the padding on the two sides differs by at most one pixel
    assert abs(rows[0] - (31 - rows[-1])) <= 1 and abs(cols[0] - (31 - cols[-1])) <= 1
    assert (out[~content] == 0).all()  # black padding


def test_resize_with_pad_matches_pil_bilinear_inside():
    img = _noise(48, 64)
    out = resize_with_pad(img, 32)
    expected = np.asarray(Image.fromarray(img).resize((32, 24), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[4:28], expected)
    assert (out[:4] == 0).all() and (out[28:] == 0).all()


def test_resize_with_pad_is_identity_at_target_size():
    img = _noise(32, 32)
    np.testing.assert_array_equal(resize_with_pad(img, 32), img)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_png_round_trip_is_bit_exact(level):
    img = _noise(40, 56, seed=level)
    data = encode_image(img, compress_level=level)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_image(data), img)


def test_decode_images_stacks():
    imgs = [_noise(8, 8, seed=i) for i in range(3)]
    out = decode_images([encode_image(i) for i in imgs])
    assert out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out[2], imgs[2])


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_non_rgb_uint8_is_refused_with_its_shape(bad):
    with pytest.raises(ImageFormatError, match=r"uint8 image of shape \[h, w, 3\]"):
        resize_with_pad(bad, 16)
    with pytest.raises(ImageFormatError):
        encode_image(bad)
