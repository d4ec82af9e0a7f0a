"""Bounding-box geometry: checking a stored box, and moving a box with the image it belongs to.

A box on disk (a dataset's label file, a shard's ``json`` entry) is ``[x, y, w, h]`` in pixels of
the stored image. Inside the pipeline a box is ``(x1, y1, x2, y2)`` in continuous pixel
coordinates of the current image: coordinates of pixel edges, so the box of a whole W x H image
is ``(0, 0, W, H)`` and a box scales with the image exactly as the image's edges do. The
functions here take boxes of shape (..., 4): one box (4,) or several (N, 4).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

BOX_TOLERANCE = 1.0  # pixels a stored box may overhang its image (then clipped) before it is dropped
BOX_DROP_REASONS = ("not_finite", "non_positive_size", "outside_image")  # why a stored box is dropped
DCT_FACTORS = (1, 2, 4, 8)  # the scales libjpeg can decode a JPEG at (1/factor)
XYWH = tuple[float, float, float, float]


def check_box(box: XYWH, image_size: tuple[int, int], tolerance: float = BOX_TOLERANCE
              ) -> tuple[Optional[XYWH], str]:
    """Check a stored ``[x, y, w, h]`` box against its image.

    Args:
        box: the box in pixels of the image.
        image_size: ``(width, height)`` of the image.
        tolerance: pixels the box may overhang an edge; such a box is clipped to the image.

    Returns:
        ``(box, status)``: the box to store (None when dropped) and ``"ok"``, ``"clipped"`` or
        the reason it was dropped, one of :data:`BOX_DROP_REASONS`.
    """
    x, y, w, h = box
    width, height = image_size
    if not all(math.isfinite(v) for v in box):
        return None, "not_finite"
    if w <= 0 or h <= 0:
        return None, "non_positive_size"
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        return None, "outside_image"
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:  # within the tolerance of an edge, but nothing of it on the image
        return None, "outside_image"
    if (x1, y1, x2, y2) == (x, y, x + w, y + h):
        return (x, y, w, h), "ok"
    return (x1, y1, x2 - x1, y2 - y1), "clipped"


def box_from_json(value: Any) -> Optional[torch.Tensor]:
    """A shard's ``bbox`` entry ``[x, y, w, h]`` -> a (4,) xyxy float tensor, or None.

    None for a missing box and for one that is not four finite numbers with a positive size
    (shards written before boxes were checked at build time may hold such boxes): the sample
    then trains without a box, it is not skipped.
    """
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        return None
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float32)  # (4,)


def decoded_scale(full_size: tuple[int, int], decoded_size: tuple[int, int]) -> tuple[float, float]:
    """How a stored image's pixel coordinates scale into a (possibly reduced) decode of it.

    A JPEG decoded at 1/f (DCT scaling) has ``ceil(side / f)`` pixels per side, output pixel ``i``
    covering stored pixels ``[i f, (i + 1) f)``: a coordinate scales by exactly 1/f, not by the
    ratio of the sizes, which differs when a side is not a multiple of f.

    Args:
        full_size: ``(width, height)`` of the stored image.
        decoded_size: ``(width, height)`` of the decoded image.

    Returns:
        ``(scale_x, scale_y)``.
    """
    (width, height), (decoded_width, decoded_height) = full_size, decoded_size
    for factor in DCT_FACTORS:
        if -(-width // factor) == decoded_width and -(-height // factor) == decoded_height:
            return 1.0 / factor, 1.0 / factor
    return decoded_width / width, decoded_height / height


def crop_box(box: torch.Tensor, left: float, top: float, width: float, height: float) -> torch.Tensor:
    """Boxes (..., 4) in an image -> in its crop ``[left, left + width) x [top, top + height)``,
    clipped to the crop (a box outside it gets zero area)."""
    offset = box.new_tensor([left, top, left, top])  # (4,)
    shifted = box - offset  # (..., 4)
    return torch.stack([shifted[..., 0].clamp(0, width), shifted[..., 1].clamp(0, height),
                        shifted[..., 2].clamp(0, width), shifted[..., 3].clamp(0, height)], dim=-1)  # (..., 4)


def scale_box(box: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """Boxes (..., 4) in an image -> in the image resized by ``scale_x`` x ``scale_y``."""
    return box * box.new_tensor([scale_x, scale_y, scale_x, scale_y])  # (..., 4)


def flip_box_horizontal(box: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes (..., 4) in an image of ``width`` -> in its mirror image: x -> width - x."""
    return torch.stack([width - box[..., 2], box[..., 1], width - box[..., 0], box[..., 3]], dim=-1)  # (..., 4)


def flip_box_vertical(box: torch.Tensor, height: float) -> torch.Tensor:
    """Boxes (..., 4) in an image of ``height`` -> in its upside-down image: y -> height - y."""
    return torch.stack([box[..., 0], height - box[..., 3], box[..., 2], height - box[..., 1]], dim=-1)  # (..., 4)


def box_area(box: torch.Tensor) -> torch.Tensor:
    """The areas (...) of boxes (..., 4); zero for an empty (clipped-away) box."""
    return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)
