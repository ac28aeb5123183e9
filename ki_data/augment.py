"""Train-time image augmentation, on the loader's CPU (grain's worker processes), with OpenCV.

The recipe follows openpi's π0 / π0.5 training: a random 95 % crop resized back to full size and a rotation of up to
±5° on the scene cameras (not on wrist cameras, whose framing is fixed to the gripper), then colour jitter
(brightness 0.3, contrast 0.4, saturation 0.5) on every camera. Evaluation and inference never augment.

Each part is one OpenCV call: crop + resize + rotation is one affine warp (one bilinear interpolation), and the three
jitters, all linear in the pixel, are one 3x4 colour matrix. openpi augments inside the jitted train step instead;
here the loader does it because, measured (`python -m pipelines.benchmark`, loader figures), one loader core
decodes and augments several hundred 3-camera samples per second, far more than an accelerator consumes at π0.5
size, and augmentation then stays seeded by stream position, so a resumed run sees the same pixels.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from jaxtyping import UInt8


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_scale: float = 0.95  # side of the random crop, as a fraction of the image side
    max_rotation_deg: float = 5.0
    brightness: float = 0.3  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.5


def is_wrist_camera(camera: str) -> bool:
    return "wrist" in camera.lower()


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _crop_resize_rotate(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, cfg: AugmentConfig
) -> UInt8[np.ndarray, "s s 3"]:
    """A random crop of `crop_scale` of each side stretched back to full size, rotated about the centre by up to
    `max_rotation_deg` (counter-clockwise positive), black outside: one inverse affine map, output -> input."""
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * cfg.crop_scale)), max(1, round(w * cfg.crop_scale))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    angle = np.deg2rad(float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)))
    cos, sin = np.cos(angle), np.sin(angle)
    # In continuous coordinates (pixel centres at i + 0.5): undo the rotation about the centre, then map the full
    # frame onto the crop window; OpenCV indexes pixel centres at i, hence the half-pixel shifts at both ends.
    unrotate = _shift(w / 2, h / 2) @ np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) @ _shift(-w / 2, -h / 2)
    to_crop = _shift(left, top) @ np.diag([cw / w, ch / h, 1.0])
    inverse = _shift(-0.5, -0.5) @ to_crop @ unrotate @ _shift(0.5, 0.5)
    return cv2.warpAffine(img, inverse[:2], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


# ITU-R 601 luma, the weights torchvision / augmax use for saturation and contrast.
_LUMA = np.array([0.299, 0.587, 0.114])


def _color_jitter(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, cfg: AugmentConfig
) -> UInt8[np.ndarray, "s s 3"]:
    """Brightness b (x -> b x), contrast c about the mean luma m of b x (x -> c x + (1 - c) m), saturation s about
    each pixel's luma (x -> s x + (1 - s) luma(x)): together x -> c b (s I + (1 - s) 1 luma^T) x + (1 - c) m,
    applied as one colour matrix, rounded and clipped to uint8."""
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    mean_luma = b * float(np.dot(cv2.mean(img)[:3], _LUMA))
    matrix = np.zeros((3, 4))
    matrix[:, :3] = c * b * (s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA))
    matrix[:, 3] = (1 - c) * mean_luma
    return cv2.transform(img, matrix)


def augment_image(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, *, wrist: bool, cfg: AugmentConfig = AugmentConfig()
) -> UInt8[np.ndarray, "s s 3"]:
    """One augmented copy of `img`; the same `rng` state gives the same output."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"augment_image expects uint8 [h, w, 3], got {img.dtype} {img.shape}")
    if not wrist:
        img = _crop_resize_rotate(img, rng, cfg)
    return _color_jitter(img, rng, cfg)
