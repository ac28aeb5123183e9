"""ki_data.images: resize with padding (openpi geometry), JPEG and PNG encode/decode, the shard image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ki_data.images import (
    ImageFormatError,
    decode_image,
    decode_images,
    encode_image,
    resize_with_pad,
    resize_with_pad_pil,
    shard_image,
)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("resize", [resize_with_pad, resize_with_pad_pil])
@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (96, 96), (7, 200), (300, 5), (24, 16)])
def test_resize_with_pad_keeps_aspect_and_centers(shape, resize):
    h, w = shape
    img = np.full((h, w, 3), 200, np.uint8)
    out = resize(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    ratio = max(w / 32, h / 32)
    new_h, new_w = max(1, int(h / ratio)), max(1, int(w / ratio))
    content = out.any(axis=-1)
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (new_h, new_w)
    # centered: the padding on the two sides differs by at most one pixel
    assert abs(rows[0] - (31 - rows[-1])) <= 1 and abs(cols[0] - (31 - cols[-1])) <= 1
    assert (out[~content] == 0).all()  # black padding


def test_resize_with_pad_pil_matches_pil_bilinear_inside():
    img = _noise(48, 64)
    out = resize_with_pad_pil(img, 32)
    expected = np.asarray(Image.fromarray(img).resize((32, 24), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[4:28], expected)
    assert (out[:4] == 0).all() and (out[28:] == 0).all()


def _smooth_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A camera-like picture: smooth shading and a few sharp-edged objects."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC)).copy()
    for _ in range(6):
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
        img[y : y + rng.integers(10, 40), x : x + rng.integers(10, 40)] = rng.integers(0, 256, 3)
    return img


@pytest.mark.parametrize("shape", [(480, 640), (96, 96), (240, 320)])
def test_resize_with_pad_is_close_to_openpis_pil_bilinear(shape):
    # Same output box as the PIL reference; inside it, area averaging differs from PIL's triangle filter only along
    # sharp edges (on the benchmark's recorded frames the benchmark reports the largest difference).
    img = _smooth_scene(*shape)
    ours, ref = resize_with_pad(img, 224).astype(int), resize_with_pad_pil(img, 224).astype(int)
    assert np.array_equal(ours.any(-1), ref.any(-1))
    diff = np.abs(ours - ref)
    assert diff.mean() < 1.0 and diff.max() <= 64


@pytest.mark.parametrize("resize", [resize_with_pad, resize_with_pad_pil])
def test_resize_with_pad_is_identity_at_target_size(resize):
    img = _noise(32, 32)
    np.testing.assert_array_equal(resize(img, 32), img)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_png_round_trip_is_bit_exact(level):
    img = _noise(40, 56, seed=level)
    data = encode_image(img, compress_level=level)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_image(data), img)


@pytest.mark.parametrize("quality", [90, 95])
def test_jpeg_is_deterministic_and_decodes_close_to_the_input(quality):
    img = _smooth_scene(224, 224, seed=quality)
    data = encode_image(img, "jpeg", quality=quality)
    assert data[:3] == b"\xff\xd8\xff" and data == encode_image(img.copy(), "jpeg", quality=quality)
    out = decode_image(data)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, decode_image(bytes(data)))  # decoding is exact too: the Policy relies on it
    assert np.abs(out.astype(int) - img).mean() < 3.0


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_shard_image_is_the_resized_frame_encoded(image_format):
    frame = _smooth_scene(96, 128)
    data = shard_image(frame, 32, image_format)
    assert data == encode_image(resize_with_pad(frame, 32), image_format)
    assert decode_image(data).shape == (32, 32, 3)


def test_unknown_image_format_is_refused():
    with pytest.raises(ImageFormatError, match="unknown image format 'webp'"):
        shard_image(_noise(8, 8), 8, "webp")


def test_damaged_jpeg_raises():
    data = encode_image(_smooth_scene(64, 64), "jpeg")
    with pytest.raises(ValueError):
        decode_image(data[:8] + b"not a jpeg, garbage bytes")


def test_decode_images_stacks():
    imgs = [_noise(8, 8, seed=i) for i in range(3)]
    out = decode_images([encode_image(i) for i in imgs])
    assert out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out[2], imgs[2])


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)]
)
def test_non_rgb_uint8_is_refused_with_its_shape(bad, no_shape_checks):
    with pytest.raises(ImageFormatError, match=r"uint8 image of shape \[h, w, 3\]"):
        resize_with_pad(bad, 16)
    with pytest.raises(ImageFormatError):
        encode_image(bad)
