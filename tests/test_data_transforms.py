"""The tensor transforms run timm's steps with timm's parameters and random draws."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ColorJitter

from mgmoe_ds.data.transforms import _color_jitter, create_transform, decode_image, decode_image_tensor
from test_data_shards import image_bytes

IMAGENET_STD = 0.225  # about; turns a normalised difference back into grey levels


def smooth_jpeg(seed: int, width: int = 120, height: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour gradients (resampling differences stay small on these)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)  # (H, W) each
    channels = [128 + 100 * np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    pixels = np.stack(channels, axis=-1).astype(np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def grey_levels(a: torch.Tensor, b: torch.Tensor, std: float = IMAGENET_STD) -> torch.Tensor:
    return (a - b).abs() * std * 255


def encoded(data: bytes, mode: str, **save) -> bytes:
    """``data`` decoded and saved again as a JPEG in another colour mode (grey, CMYK) or with options."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def test_decode_image_tensor_is_the_pil_decode():
    photo = smooth_jpeg(0, 400, 300)
    cases = [(photo, 90), (photo, 300), (photo, 40), (smooth_jpeg(1), None), (image_bytes(2, 30, "PNG"), 90),
             (encoded(photo, "L"), 90), (encoded(photo, "CMYK"), 90), (encoded(photo, "RGB", progressive=True), 90),
             (encoded(photo, "RGB", subsampling=0), None), (smooth_jpeg(3, 401, 301), 90), (smooth_jpeg(3, 401, 301), 50)]
    for data, min_side in cases:
        pixels = decode_image_tensor(data, min_side)  # (3, H, W) uint8
        reference = np.asarray(decode_image(data, min_side))  # (H, W, 3)
        assert pixels.dtype == torch.uint8 and np.array_equal(pixels.permute(1, 2, 0).numpy(), reference)
    assert decode_image_tensor(photo, 90).shape == (3, 150, 200)  # 1/2 scale keeps >= 90
    assert decode_image_tensor(photo, 40).shape == (3, 75, 100)  # 1/4
    assert decode_image_tensor(smooth_jpeg(3, 401, 301), 50).shape == (3, 76, 101)  # 1/4, rounded up


def test_rgb_jpegs_skip_pil_and_damaged_ones_still_fail(monkeypatch):
    from mgmoe_ds.data import transforms

    photo = smooth_jpeg(0, 400, 300)
    reference = decode_image_tensor(photo, 90)

    def no_pil(*args, **kwargs):
        raise AssertionError("PIL was used")

    monkeypatch.setattr(transforms, "decode_image", no_pil)
    assert torch.equal(decode_image_tensor(photo, 90), reference)
    monkeypatch.undo()
    with pytest.raises(OSError):  # PIL's error for a damaged JPEG, as before the fast path
        decode_image_tensor(photo[: len(photo) // 2], 90)


@pytest.mark.parametrize("options", [{}, dict(crop_pct=1.0, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)])
def test_eval_transform_is_timms_within_a_grey_level(options):
    transform = create_transform(48, False, **options)
    assert "tensor kernels" in repr(transform)
    for seed in range(4):
        data = smooth_jpeg(seed)
        reference = transform.timm_transform(decode_image(data))  # (3, 48, 48)
        ours = transform(decode_image(data))
        assert ours.shape == reference.shape == (3, 48, 48) and ours.dtype == torch.float32
        assert grey_levels(ours, reference, options.get("std", (IMAGENET_STD,))[0]).max() <= 1.01
        batch = transform.collate([transform.augment(decode_image_tensor(data))] * 2)  # (2, 3, 48, 48)
        assert torch.equal(batch[1], ours)


def test_train_transform_draws_timms_crops_flips_and_jitter():
    transform = create_transform(48, True)
    ours, reference = [], []
    for seed in range(16):
        data = smooth_jpeg(seed)
        random.seed(seed), torch.manual_seed(seed)
        reference.append(transform.timm_transform(decode_image(data)))
        random.seed(seed), torch.manual_seed(seed)
        ours.append(transform.collate([transform.augment(decode_image_tensor(data))])[0])
    difference = grey_levels(torch.stack(ours), torch.stack(reference))  # (16, 3, 48, 48)
    # the same crop, flip and jitter factors: only rounding differs (PIL truncates to uint8 after
    # every jitter step, ~0.5 level each); other draws differ by ~70 levels on average
    assert difference.mean() < 2 and difference.max() < 6


def test_color_jitter_is_torchvisions_tensor_arithmetic():
    step = ColorJitter(0.4, 0.4, 0.4, 0.1)
    pixels = decode_image_tensor(smooth_jpeg(3))  # (3, 90, 120) uint8
    for seed in range(6):
        torch.manual_seed(seed)
        ours = _color_jitter(step, pixels)
        torch.manual_seed(seed)
        reference = step(pixels.float() / 255) * 255  # torchvision's own tensor kernels
        assert torch.allclose(ours, reference, atol=1e-3)
    assert pixels.dtype == torch.uint8  # the input is left alone


def test_steps_without_a_tensor_kernel_run_timms_pil_transform():
    transform = create_transform(32, True, auto_augment="rand-m9-mstd0.5")
    assert "PIL" in repr(transform)
    batch = transform.collate([transform.augment(decode_image_tensor(smooth_jpeg(s))) for s in range(3)])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
