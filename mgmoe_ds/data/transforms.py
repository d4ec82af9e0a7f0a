"""Image decoding (with JPEG reduced-size decode) and the timm train/eval transforms.

timm's ``create_transform`` defines what a transform does: which steps, with which parameters
and random distributions. :class:`ImageTransform` runs those same steps, drawing the same random
numbers, on uint8 tensors with torchvision's v2 kernels (antialiased resize, as PIL's resize is)
and torchvision's colour-jitter arithmetic, 2-3 times faster than on PIL images, and splits them
in two: ``augment`` is the per-image part (crop, resize, flip, colour jitter), ``collate`` stacks
images and converts them to normalised floats once per batch. Every geometric step also moves a
bounding box with the image (:mod:`.boxes`). A timm step without a tensor counterpart here
(auto-augment, random erasing, ...) makes the whole transform run as timm's PIL transform
instead, which cannot move boxes.
"""

from __future__ import annotations

import io
import math
import random
from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision import transforms as tv_transforms
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size  # Resize's output size

from .boxes import box_area, crop_box, flip_box_horizontal, flip_box_vertical, scale_box

JPEG_MAGIC = b"\xff\xd8"  # start-of-image marker
DEFAULT_CROP_PCT = 0.875  # timm's default eval crop: resize to img_size / 0.875, centre-crop
GRAY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114])  # torchvision's RGB -> grey weights
ImageLike = Image.Image | torch.Tensor  # a PIL image, or a (3, H, W) uint8 tensor


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


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes at full size, from the header alone."""
    if data[:2] == JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:  # simplejpeg refuses it: PIL reads the header or reports the damage
            pass
    return Image.open(io.BytesIO(data)).size


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """A PIL image -> a (3, H, W) uint8 tensor (a view of an (H, W, 3) array); tensors pass as is."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = np.array(image.convert("RGB") if image.mode != "RGB" else image)  # (H, W, 3) uint8, writable
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)


def _draft_factor(width: int, height: int, min_side: Optional[int]) -> int:
    """The reduction PIL's JPEG ``draft`` picks for a ``min_side`` square: the largest of 8, 4, 2
    and 1 that divides both sides with at least ``min_side`` left (1 when none does)."""
    if min_side is None:
        return 1
    scale = min(width // min_side, height // min_side)
    return next((factor for factor in (8, 4, 2) if scale >= factor), 1)


def decode_image_tensor(data: bytes, min_side: Optional[int] = None) -> torch.Tensor:
    """:func:`decode_image`, as a (3, H, W) uint8 tensor: the same pixels, faster for JPEGs.

    Colour (YCbCr) and grey JPEGs go straight from libjpeg-turbo into an array through
    ``simplejpeg``: the library and settings of PIL's decoder (accurate integer DCT, fancy
    upsampling) and PIL's scale for ``min_side``, without PIL's Python header parsing, in about
    half the time. Anything else (PNG, CMYK JPEGs, data ``simplejpeg`` refuses) takes PIL's path,
    so those colour conversions and every decoding error stay PIL's.
    """
    if data[:2] == JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("YCbCr", "Gray"):
                factor = _draft_factor(width, height, min_side)
                pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // factor),
                                                min_width=-(-width // factor))  # (H, W, 3) uint8
                return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
        except ValueError:  # simplejpeg's error type: PIL decodes the data or reports the damage
            pass
    return image_to_tensor(decode_image(data, min_side))


def _random_resized_crop(step: Any, image: torch.Tensor, box: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm's ``RandomResizedCropAndInterpolation``: its own parameter sampling, a tensor resize."""
    top, left, height, width = step.get_params(image, step.scale, step.ratio)
    interpolation = step.interpolation
    if isinstance(interpolation, (list, tuple)):  # timm's "random": one of several, per image
        interpolation = random.choice(interpolation)
    out_height, out_width = step.size
    image = F.resized_crop_image(image, top, left, height, width, [out_height, out_width], interpolation,
                                 antialias=True)
    if box is not None:
        box = scale_box(crop_box(box, left, top, width, height), out_width / width, out_height / height)
    return image, box


def _resize(step: tv_transforms.Resize, image: torch.Tensor, box: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    resized = F.resize_image(image, size, step.interpolation, step.max_size, antialias=True)
    if box is not None:
        box = scale_box(box, resized.shape[-1] / image.shape[-1], resized.shape[-2] / image.shape[-2])
    return resized, box


def _center_crop_offset(image_side: int, crop_side: int) -> int:
    """Where torchvision's centre crop starts along one side: a crop larger than the image pads
    it, ``(crop - image) // 2`` before, so the crop starts that far before the image."""
    if crop_side > image_side:
        return -((crop_side - image_side) // 2)
    return int(round((image_side - crop_side) / 2.0))


def _center_crop(step: tv_transforms.CenterCrop, image: torch.Tensor, box: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    crop_height, crop_width = step.size
    if box is not None:
        top, left = _center_crop_offset(image.shape[-2], crop_height), _center_crop_offset(image.shape[-1], crop_width)
        box = crop_box(box, left, top, crop_width, crop_height)
    return F.center_crop_image(image, [crop_height, crop_width]), box


def _flip(step: tv_transforms.RandomHorizontalFlip | tv_transforms.RandomVerticalFlip,
          image: torch.Tensor, box: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if torch.rand(1) >= step.p:  # as torchvision's forward draws it
        return image, box
    if isinstance(step, tv_transforms.RandomHorizontalFlip):
        return F.horizontal_flip_image(image), None if box is None else flip_box_horizontal(box, image.shape[-1])
    return F.vertical_flip_image(image), None if box is None else flip_box_vertical(box, image.shape[-2])


def _blend_(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * image + (1 - factor) * other``, clamped to [0, 255], in place (torchvision's blend)."""
    return image.lerp_(other, 1.0 - factor).clamp_(0.0, 255.0)


def _color_jitter(step: tv_transforms.ColorJitter, image: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter``: its own factors and random order, and the arithmetic of its
    tensor kernels, in place on a float copy in [0, 255] (clamped after every adjustment, as
    PIL's uint8 adjustments clip)."""
    order, brightness, contrast, saturation, hue = step.get_params(step.brightness, step.contrast, step.saturation,
                                                                   step.hue)
    image = image.to(torch.float32, copy=True)
    for index in order.tolist():
        if index == 0 and brightness is not None:
            image.mul_(brightness).clamp_(0.0, 255.0)
        elif index == 1 and contrast is not None:
            _blend_(image, torch.dot(GRAY_WEIGHTS, image.mean(dim=(1, 2))), contrast)  # the mean grey level
        elif index == 2 and saturation is not None:
            _blend_(image, torch.tensordot(GRAY_WEIGHTS, image, dims=1), saturation)  # (H, W) grey image
        elif index == 3 and hue is not None:
            image = F.adjust_hue_image(image.div_(255.0), hue).mul_(255.0)  # its kernel works in [0, 1]
    return image


def _colour_step(step: tv_transforms.ColorJitter, image: torch.Tensor, box: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return _color_jitter(step, image), box  # colours move no pixel


BoxStep = Callable[[torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor]]]


def _tensor_steps(timm_transform: Any) -> Optional[list[BoxStep]]:
    """``timm_transform``'s pixel steps as tensor functions ``(image, box) -> (image, box)``, or
    None when it is not ``Compose([pixel steps..., ToTensor, Normalize])`` of steps known here."""
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation

    kernels = {
        RandomResizedCropAndInterpolation: _random_resized_crop,
        tv_transforms.Resize: _resize,
        tv_transforms.CenterCrop: _center_crop,
        tv_transforms.RandomHorizontalFlip: _flip,
        tv_transforms.RandomVerticalFlip: _flip,
        tv_transforms.ColorJitter: _colour_step,
    }
    steps = list(getattr(timm_transform, "transforms", []))
    if len(steps) < 2 or type(steps[-1]) is not tv_transforms.Normalize:
        return None
    if type(steps[-2]) not in (MaybeToTensor, tv_transforms.ToTensor):  # both scale pixels to [0, 1]
        return None
    if any(type(step) not in kernels for step in steps[:-2]):
        return None
    return [partial(kernels[type(step)], step) for step in steps[:-2]]


class ImageTransform:
    """timm's train or eval transform, as a per-image part and a per-batch part.

    ``augment`` maps a PIL image or a (3, H, W) uint8 tensor to a (3, H', W') tensor: uint8, or
    float in [0, 255] once a colour step ran (timm's PIL fallback: already normalised);
    ``augment_with_box`` also moves a bounding box with the image (not under the PIL fallback:
    see ``moves_boxes``). ``collate`` stacks such images into a normalised (B, 3, H', W') float
    batch. Calling the transform does both for one image: a PIL image -> a (3, H', W') normalised
    float tensor. ``box_to_source`` maps a box on the eval transform's output back to its input.
    """

    def __init__(self, timm_transform: Any) -> None:
        self.timm_transform = timm_transform
        self.steps = _tensor_steps(timm_transform)  # None: run timm's PIL transform
        if self.steps is not None:
            normalize = timm_transform.transforms[-1]
            mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
            std = torch.as_tensor(normalize.std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
            self.scale = 1.0 / (255.0 * std)  # pixels p = 255 x: (x - mean) / std = p * scale - shift
            self.shift = mean / std

    @property
    def moves_boxes(self) -> bool:
        """Whether ``augment_with_box`` moves boxes: True on the tensor steps; timm's PIL fallback
        (a step without a tensor kernel, e.g. auto-augment) drops every box."""
        return self.steps is not None

    def augment(self, image: ImageLike) -> torch.Tensor:
        """The per-image steps: an image -> (3, H', W') (see the class docstring)."""
        return self.augment_with_box(image, None)[0]

    def augment_with_box(self, image: ImageLike, box: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-image steps, moving a box with the image: crops shift and clip it, resizes
        scale it, flips mirror it. The random draws are those of ``augment``: the same image.

        Args:
            image: a PIL image or a (3, H, W) uint8 tensor.
            box: (4,) ``(x1, y1, x2, y2)`` in the image's continuous pixel coordinates (pixel
                edges: the whole image is ``(0, 0, W, H)``), or None.

        Returns:
            ``(image, box)``: the (3, H', W') image and the (4,) float32 box in its pixel
            coordinates; None without a box, when the crop left none of it, or under the PIL
            fallback.
        """
        if self.steps is None:
            if isinstance(image, torch.Tensor):
                image = Image.fromarray(image.permute(1, 2, 0).numpy())  # (H, W, 3)
            return self.timm_transform(image), None
        image = image_to_tensor(image)
        if box is not None:
            box = torch.as_tensor(box, dtype=torch.float32)  # (4,)
        for step in self.steps:
            image, box = step(image, box)
        return image, box if box is not None and box_area(box) > 0 else None

    def box_to_source(self, boxes: torch.Tensor, source_size: tuple[int, int]) -> torch.Tensor:
        """Boxes on the eval transform's output -> in pixels of the image the transform was given.

        Args:
            boxes: (N, 4) ``(x1, y1, x2, y2)`` normalised to the output image ([0, 1]).
            source_size: ``(width, height)`` of the image given to the transform.

        Returns:
            (N, 4) boxes in the source image's pixels, clipped to it (float, of ``boxes``' dtype).

        Raises:
            ValueError: the transform has a step other than Resize and CenterCrop (a random or
                PIL-only one), so no fixed mapping exists.
        """
        steps = list(self.timm_transform.transforms[:-2]) if self.steps is not None else []
        if self.steps is None or any(type(step) not in (tv_transforms.Resize, tv_transforms.CenterCrop)
                                     for step in steps):
            names = [type(step).__name__ for step in getattr(self.timm_transform, "transforms", [self.timm_transform])]
            raise ValueError(f"box_to_source: transform steps {names}: expected Resize and CenterCrop only "
                             f"(the eval transform)")
        source_width, source_height = source_size
        width, height = source_width, source_height
        # output pixel = source pixel * scale - offset, per axis, composed over the steps
        scale_x = scale_y = 1.0
        offset_x = offset_y = 0.0
        for step in steps:
            if isinstance(step, tv_transforms.Resize):
                size = [step.size] if isinstance(step.size, int) else list(step.size)
                new_height, new_width = _compute_resized_output_size((height, width), size, step.max_size)
                resize_x, resize_y = new_width / width, new_height / height
                scale_x, scale_y = scale_x * resize_x, scale_y * resize_y
                offset_x, offset_y = offset_x * resize_x, offset_y * resize_y
                width, height = new_width, new_height
            else:
                crop_height, crop_width = step.size
                offset_x += _center_crop_offset(width, crop_width)
                offset_y += _center_crop_offset(height, crop_height)
                width, height = crop_width, crop_height
        boxes = torch.as_tensor(boxes)
        dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
        boxes = boxes.to(torch.float64)  # (N, 4); float64 keeps the round trip exact to far below a pixel
        output_pixels = scale_box(boxes, width, height)  # (N, 4)
        source = scale_box(output_pixels + boxes.new_tensor([offset_x, offset_y] * 2), 1 / scale_x, 1 / scale_y)
        return crop_box(source, 0, 0, source_width, source_height).to(dtype)  # (N, 4)

    def collate(self, images: list[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images from :meth:`augment` (all of one size) -> a (B, 3, H, W) normalised float batch.

        Args:
            images: the images.
            out: an empty float32 tensor of shape (B, 3, H, W) to write the batch into (e.g. one in
                shared memory); default: a new one.
        """
        if out is None:
            out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)  # (B, 3, H, W)
        if self.steps is None:
            return torch.stack(images, out=out)
        for slot, image in zip(out, images):
            torch.mul(image, self.scale, out=slot).sub_(self.shift)
        return out

    def __call__(self, image: ImageLike) -> torch.Tensor:
        return self.collate([self.augment(image)])[0]  # (3, H, W)

    def __repr__(self) -> str:
        kernels = "torchvision v2 tensor kernels" if self.steps is not None else "PIL"
        return f"{type(self).__name__}(on {kernels}: {self.timm_transform!r})"


def create_transform(img_size: int, train: bool, **options: Any) -> ImageTransform:
    """timm's train or eval transform at ``img_size``, run on tensors (see :class:`ImageTransform`).

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
    return ImageTransform(timm_create_transform(**kwargs))
