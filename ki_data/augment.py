"""Train-time image augmentation, in numpy + PIL so that it runs inside grain's loader worker processes.

The recipe follows openpi's π0 / π0.5 training: a random 95 % crop resized back to full size and a rotation of up to
±5° on the scene cameras (not on wrist cameras, whose framing is fixed to the gripper), then colour jitter
(brightness 0.3, contrast 0.4, saturation 0.5) on every camera. Evaluation and inference never augment.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import UInt8
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_scale: float = 0.95  # side of the random crop, as a fraction of the image side
    max_rotation_deg: float = 5.0
    brightness: float = 0.3  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.5


def is_wrist_camera(camera: str) -> bool:
    return "wrist" in camera.lower()


def _crop_resize_rotate(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, cfg: AugmentConfig
) -> UInt8[np.ndarray, "s s 3"]:
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * cfg.crop_scale)), max(1, round(w * cfg.crop_scale))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    pil = Image.fromarray(img).crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
    pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(pil, dtype=np.uint8)


def _grayscale(x: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, the weights torchvision / augmax use for saturation and contrast.
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def _color_jitter(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, cfg: AugmentConfig
) -> UInt8[np.ndarray, "s s 3"]:
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    x = img.astype(np.float32) * b
    x = (x - _grayscale(x).mean()) * c + _grayscale(x).mean()
    gray = _grayscale(x)
    x = gray + (x - gray) * s
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_image(
    img: UInt8[np.ndarray, "s s 3"], rng: np.random.Generator, *, wrist: bool, cfg: AugmentConfig = AugmentConfig()
) -> UInt8[np.ndarray, "s s 3"]:
    """One augmented copy of `img`; the same `rng` state gives the same output."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"augment_image expects uint8 [h, w, 3], got {img.dtype} {img.shape}")
    if not wrist:
        img = _crop_resize_rotate(img, rng, cfg)
    return _color_jitter(img, rng, cfg)
