"""Camera images: resize with padding to the model resolution, encode for the shards, decode.

Preprocessing and the inference Policy both call `shard_image` (resize + encode) and `decode_image`, so a live
observation becomes exactly the tensor the model saw in training: the encoders are deterministic, so the same frame
gives the same bytes and the same decoded pixels, lossy (JPEG, the default) or lossless (PNG).

Resizing is OpenCV's (SIMD): area averaging when shrinking, bilinear when enlarging, with openpi's resize-with-pad
geometry (integer target sizes, centered black padding). `resize_with_pad_pil` is openpi's own PIL-bilinear version,
kept as the reference the benchmark compares against on real frames.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import simplejpeg
from jaxtyping import UInt8
from PIL import Image

IMAGE_FORMATS = ("jpeg", "png")
DEFAULT_IMAGE_FORMAT = "jpeg"
# JPEG quality 95 with 4:2:0 chroma: ~16 kB per 224 px camera frame of a 480x640 recording, ~0.3 ms to encode.
JPEG_QUALITY = 95
# zlib level 1: ~1-2 ms per 224x224 frame; higher levels cost 2-5x the time for ~10-20% fewer bytes.
PNG_COMPRESS_LEVEL = 1

_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageFormatError(ValueError):
    """An image array that is not uint8 [h, w, 3], or an unknown image format."""


def _check_rgb(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ImageFormatError(f"expected a uint8 image of shape [h, w, 3], got {img.dtype} {img.shape}")


def check_image_format(image_format: str) -> str:
    if image_format not in IMAGE_FORMATS:
        raise ImageFormatError(f"unknown image format {image_format!r}; expected one of {IMAGE_FORMATS}")
    return image_format


def _fitted_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) of an h x w image scaled to fit a size x size square, as openpi computes it."""
    ratio = max(w / size, h / size)
    return max(1, int(h / ratio)), max(1, int(w / ratio))


def _pad(resized: UInt8[np.ndarray, "nh nw 3"], size: int) -> UInt8[np.ndarray, "size size 3"]:
    new_h, new_w = resized.shape[:2]
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def resize_with_pad(img: UInt8[np.ndarray, "h w 3"], size: int) -> UInt8[np.ndarray, "size size 3"]:
    """Scale to fit a size x size square keeping the aspect ratio, then pad the rest with black (centered).

    openpi's geometry; OpenCV's area averaging when shrinking (anti-aliased, like PIL's bilinear filter, which widens
    with the scale), bilinear when enlarging."""
    _check_rgb(img)
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    new_h, new_w = _fitted_size(h, w, size)
    shrink = new_h <= h and new_w <= w
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return _pad(resized, size)


def resize_with_pad_pil(img: UInt8[np.ndarray, "h w 3"], size: int) -> UInt8[np.ndarray, "size size 3"]:
    """openpi's resize_with_pad exactly (PIL bilinear): the reference `resize_with_pad` is measured against."""
    _check_rgb(img)
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    new_h, new_w = _fitted_size(h, w, size)
    return _pad(np.asarray(Image.fromarray(img).resize((new_w, new_h), resample=Image.BILINEAR)), size)


def encode_image(
    img: UInt8[np.ndarray, "h w 3"],
    image_format: str = "png",
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    quality: int = JPEG_QUALITY,
) -> bytes:
    """PNG (lossless) or JPEG (libjpeg-turbo through simplejpeg, 4:2:0 chroma) bytes of an RGB uint8 image."""
    _check_rgb(img)
    if check_image_format(image_format) == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_image(data: bytes) -> UInt8[np.ndarray, "h w 3"]:
    """RGB uint8 array from encoded image bytes: JPEG (libjpeg-turbo, accurate DCT and upsampling: the same pixels
    everywhere), PNG or anything else PIL reads."""
    if bytes(data[:3]) == _JPEG_MAGIC:
        return simplejpeg.decode_jpeg(bytes(data), colorspace="RGB", fastdct=False, fastupsample=False)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_images(blobs: list[bytes] | np.ndarray) -> UInt8[np.ndarray, "n h w 3"]:
    """Stack of decoded images (all the same size, as in a shard column)."""
    return np.stack([decode_image(b) for b in blobs])


def shard_image(img: UInt8[np.ndarray, "h w 3"], size: int, image_format: str) -> bytes:
    """What a shard stores for one camera frame (and what the Policy round-trips a live frame through): resized with
    padding to the model resolution, then encoded in the manifest's `image_format`."""
    return encode_image(resize_with_pad(img, size), image_format)
