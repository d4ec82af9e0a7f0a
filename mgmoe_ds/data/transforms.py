"""Image decoding (with JPEG reduced-size decode) and the timm train/eval transforms."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Optional

from PIL import Image

DEFAULT_CROP_PCT = 0.875  # timm's default eval crop: resize to img_size / 0.875, centre-crop


def draft_size(img_size: int, crop_pct: Optional[float] = None) -> int:
    """The shorter side a decoded image needs before the transform: ``ceil(img_size / crop_pct)``.

    Both the eval resize and the train random-resized crop sample from an image of about this
    size, so decoding a large JPEG at a reduced scale no smaller than this loses nothing the
    transform keeps (apart from the smallest random crops, which are upsampled anyway).
    """
    return math.ceil(img_size / (crop_pct or DEFAULT_CROP_PCT))


def decode_image(data: bytes, min_side: Optional[int] = None) -> Image.Image:
    """Decode image bytes to RGB, using JPEG DCT scaling when ``min_side`` allows it.

    Args:
        data: encoded image bytes (any format PIL reads).
        min_side: the smallest shorter side the caller needs; JPEGs are decoded at the largest
            1/2, 1/4 or 1/8 scale that keeps both sides at least this large. None: full size.

    Returns:
        A fully loaded RGB image.
    """
    image = Image.open(io.BytesIO(data))
    if min_side is not None and image.format == "JPEG":
        # draft() keeps each side >= the requested one, so request a square of min_side.
        image.draft("RGB", (min_side, min_side))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def create_transform(img_size: int, train: bool, **options: Any) -> Callable:
    """timm's train or eval transform at ``img_size`` (a PIL image -> a (3, H, W) float tensor).

    Args:
        img_size: output resolution in pixels.
        train: random-resized crop, flip and colour jitter if True; resize and centre crop if False.
        **options: extra keyword arguments for ``timm.data.create_transform`` (e.g. ``crop_pct``,
            ``auto_augment``, ``mean``, ``std``); they override the defaults.

    Returns:
        The transform.
    """
    from timm.data import create_transform as timm_create_transform

    kwargs = dict(dict(input_size=img_size, is_training=train), **options)
    return timm_create_transform(**kwargs)
