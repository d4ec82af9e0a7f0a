"""Bounding boxes through the data pipeline: checked at build, moved by every geometric step,
delivered with each batch, and mapped back to the source image for inference.

The moved boxes are checked against pixels: a white rectangle drawn on a black image at the box
must come out of each step where the step says the box went. Other expected values are worked
out by hand in the comments.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as tv_transforms

from mgmoe_ds.data import DataError, build_shards, load_manifest, make_loader, read_listing
from mgmoe_ds.data.boxes import box_from_json, check_box, decoded_scale
from mgmoe_ds.data.demo import render_image, species_table
from mgmoe_ds.data.shards import Sample, write_dataset
from mgmoe_ds.data.transforms import (_center_crop, _flip, _random_resized_crop, _resize, create_transform,
                                      image_size)
from test_data_shards import make_cub, stock_samples

RECTANGLE = (20, 10, 50, 35)  # (x1, y1, x2, y2) of the white rectangle on the 80 x 60 test image
CORNER_RECTANGLE = (50, 35, 72, 55)  # one that random crops often cut, and sometimes miss
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's defaults, the loader's
PIXEL_TOLERANCE = 1.5  # interpolation blurs an edge by about a pixel of the output


def rectangle_image(width: int, height: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A black (3, H, W) uint8 image with a white rectangle filling the pixel-edge box ``box``."""
    pixels = torch.zeros((3, height, width), dtype=torch.uint8)  # (3, H, W)
    x1, y1, x2, y2 = box
    pixels[:, y1:y2, x1:x2] = 255
    return pixels


def encoded(pixels: torch.Tensor, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format=fmt, quality=95)  # (H, W, 3)
    return buffer.getvalue()


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised (..., 3, H, W) batch images -> pixel levels in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)  # (3, 1, 1)
    return (images * std + mean) * 255


def visible_box(image: torch.Tensor) -> Optional[tuple[float, float, float, float]]:
    """The pixel-edge box of the rectangle's pixels in an output image (3, H, W); None if none show.

    Colour jitter maps white and black to two other grey levels, keeping their order, so a pixel
    is the rectangle's when it is brighter than half-way between the darkest and the brightest.
    A plain image is all rectangle when bright (jitter keeps white at >= 0.6 x 255), else all
    background.
    """
    grey = image.float().mean(dim=0)  # (H, W)
    low, high = float(grey.min()), float(grey.max())
    if high - low < 20:
        return (0.0, 0.0, float(grey.shape[1]), float(grey.shape[0])) if low > 64 else None
    bright = grey > (low + high) / 2  # (H, W)
    rows = torch.nonzero(bright.any(dim=1)).flatten()  # (R,)
    cols = torch.nonzero(bright.any(dim=0)).flatten()  # (C,)
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def assert_box_on_pixels(image: torch.Tensor, box: Optional[torch.Tensor]) -> bool:
    """The box is where the rectangle shows in ``image``; True when a rectangle was compared."""
    seen = visible_box(image)
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) <= 0:
        assert seen is None or (seen[2] - seen[0]) * (seen[3] - seen[1]) <= 2, seen  # at most a faint sliver
        return False
    if min(box[2] - box[0], box[3] - box[1]) < 2:  # a sliver: antialiasing leaves no full-white pixel
        return False
    assert seen is not None and np.allclose(seen, box.tolist(), atol=PIXEL_TOLERANCE), (seen, box.tolist())
    return True


STEPS = {
    "resize_shorter_side": (_resize, tv_transforms.Resize(37)),
    "resize_squash": (_resize, tv_transforms.Resize((30, 50))),
    "resize_up": (_resize, tv_transforms.Resize(150)),
    "center_crop": (_center_crop, tv_transforms.CenterCrop(40)),
    "center_crop_larger_than_image": (_center_crop, tv_transforms.CenterCrop((100, 30))),
    "horizontal_flip": (_flip, tv_transforms.RandomHorizontalFlip(p=1.0)),
    "vertical_flip": (_flip, tv_transforms.RandomVerticalFlip(p=1.0)),
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_each_fixed_step_moves_the_box_with_the_pixels(name):
    kernel, step = STEPS[name]
    image, box = kernel(step, rectangle_image(80, 60, RECTANGLE), torch.tensor(RECTANGLE, dtype=torch.float32))
    assert assert_box_on_pixels(image, box)


def test_random_resized_crop_moves_the_box_with_the_pixels():
    step = RandomResizedCropAndInterpolation((30, 40), scale=(0.08, 1.0))
    compared = empty = 0
    for seed in range(40):
        random.seed(seed)
        image, box = _random_resized_crop(step, rectangle_image(80, 60, CORNER_RECTANGLE),
                                          torch.tensor(CORNER_RECTANGLE, dtype=torch.float32))
        assert image.shape == (3, 30, 40)
        compared += assert_box_on_pixels(image, box)
        empty += bool((box[2] - box[0]) * (box[3] - box[1]) == 0)
    assert compared >= 20 and empty >= 3  # crops that keep (part of) the rectangle, and some that miss it


@pytest.mark.parametrize("options", [{}, {"vflip": 0.5}])
def test_timm_train_transform_moves_the_box_and_draws_as_without_one(options):
    transform = create_transform(32, True, **options)
    assert transform.moves_boxes
    compared = dropped = 0
    for seed in range(30):
        random.seed(seed), torch.manual_seed(seed)
        image, box = transform.augment_with_box(rectangle_image(80, 60, CORNER_RECTANGLE),
                                                torch.tensor(CORNER_RECTANGLE))
        random.seed(seed), torch.manual_seed(seed)
        assert torch.equal(transform.augment(rectangle_image(80, 60, CORNER_RECTANGLE)), image)  # the same draws
        compared += assert_box_on_pixels(image, box)
        dropped += box is None
    assert compared >= 15 and dropped >= 3


def test_hand_computed_crop_resize_flip():
    box = torch.tensor([10.0, 20.0, 50.0, 60.0])  # on a 100 x 80 image
    image = torch.zeros((3, 80, 100), dtype=torch.uint8)
    crop = RandomResizedCropAndInterpolation((30, 30))
    crop.get_params = lambda *args: (10, 20, 40, 60)  # top, left, height, width
    # shift by (-20, -10): (-10, 10, 30, 50); clip to 60 x 40: (0, 10, 30, 40); x * 30/60, y * 30/40
    assert _random_resized_crop(crop, image, box)[1].tolist() == [0.0, 7.5, 15.0, 30.0]
    # shorter side 80 -> 50, longer 100 -> int(50 * 100 / 80) = 62: x * 0.62, y * 0.625
    assert torch.allclose(_resize(tv_transforms.Resize(50), image, box)[1], torch.tensor([6.2, 12.5, 31.0, 37.5]))
    assert _flip(tv_transforms.RandomHorizontalFlip(1.0), image, box)[1].tolist() == [50.0, 20.0, 90.0, 60.0]
    box = torch.tensor([10.0, 5.0, 50.0, 30.0])
    assert _flip(tv_transforms.RandomVerticalFlip(1.0), image, box)[1].tolist() == [10.0, 50.0, 50.0, 75.0]
    # 40 x 40 from 100 x 80 starts at left (100 - 40) / 2 = 30, top (80 - 40) / 2 = 20: (-20, -15, 20, 10) clipped
    assert _center_crop(tv_transforms.CenterCrop(40), image, box)[1].tolist() == [0.0, 0.0, 20.0, 10.0]


def test_a_box_the_crop_leaves_out_is_dropped():
    transform = create_transform(64, False)  # 200 x 100: resize to 146 x 73, crop from x = 41
    image, box = transform.augment_with_box(torch.zeros((3, 100, 200), dtype=torch.uint8), torch.tensor([0, 0, 50, 100]))
    assert image.shape == (3, 64, 64) and box is None  # x2 = 50 * 0.73 = 36.5 < 41


def test_pil_fallback_cannot_move_boxes():
    transform = create_transform(32, True, auto_augment="rand-m9-mstd0.5")
    assert not transform.moves_boxes
    image, box = transform.augment_with_box(rectangle_image(80, 60, RECTANGLE), torch.tensor(RECTANGLE))
    assert image.shape == (3, 32, 32) and box is None
    with pytest.raises(ValueError, match="Resize and CenterCrop"):
        transform.box_to_source(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), (80, 60))


def test_box_to_source_by_hand():
    transform = create_transform(64, False, crop_pct=0.875)
    # 200 x 100 -> Resize(floor(64 / 0.875) = 73): 73 high, int(73 * 200 / 100) = 146 wide; the
    # 64 x 64 centre crop starts at left round((146 - 64) / 2) = 41, top round((73 - 64) / 2) = round(4.5) = 4.
    # Output (0, 0, 64, 64) is resized (41, 4, 105, 68), source (41 * 200/146, 4 * 100/73, 105 * 200/146, 68 * 100/73);
    # output (16, 32, 48, 64) is resized (57, 36, 89, 68).
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 1.0]])
    expected = torch.tensor([[56.16438, 5.47945, 143.83562, 93.15068], [78.08219, 49.31507, 121.91781, 93.15068]])
    assert torch.allclose(transform.box_to_source(boxes, (200, 100)), expected, atol=1e-4)
    # crop_pct 1.25 on 100 x 100: resize to floor(64 / 1.25) = 51, the 64 crop pads 6 pixels before:
    # (0, 0, 1, 1) -> (-6, -6, 58, 58) * 100/51 = (-11.8, -11.8, 113.7, 113.7), clipped to the image
    padded = create_transform(64, False, crop_pct=1.25).box_to_source(boxes[:1], (100, 100))
    assert torch.allclose(padded, torch.tensor([[0.0, 0.0, 100.0, 100.0]]))
    with pytest.raises(ValueError, match="Resize and CenterCrop"):
        create_transform(64, True).box_to_source(boxes, (200, 100))


@pytest.mark.parametrize("options", [{}, {"crop_pct": 1.0}, {"crop_mode": "squash"}])
@pytest.mark.parametrize("source_size", [(200, 100), (90, 131)])
def test_box_to_source_inverts_the_eval_transform(options, source_size):
    transform = create_transform(48, False, **options)
    width, height = source_size
    source_box = torch.tensor([0.4 * width, 0.35 * height, 0.6 * width, 0.7 * height])  # inside every crop here
    image, box = transform.augment_with_box(torch.zeros((3, height, width), dtype=torch.uint8), source_box)
    normalised = box / torch.tensor([image.shape[-1], image.shape[-2]] * 2)  # (4,)
    back = transform.box_to_source(normalised[None].double(), source_size)  # (1, 4)
    assert back.dtype == torch.float64 and torch.allclose(back[0], source_box.double(), atol=1e-3)


def test_check_box_by_hand():
    size = (20, 20)
    assert check_box((2.0, 3.0, 10.0, 5.0), size) == ((2.0, 3.0, 10.0, 5.0), "ok")
    assert check_box((-1.0, 0.0, 10.0, 10.0), size) == ((0.0, 0.0, 9.0, 10.0), "clipped")
    assert check_box((15.0, 0.0, 6.0, 5.0), size) == ((15.0, 0.0, 5.0, 5.0), "clipped")  # x + w = 21: 1 px over
    assert check_box((-1.5, 0.0, 10.0, 10.0), size) == (None, "outside_image")
    assert check_box((5.0, 15.0, 5.0, 6.5), size) == (None, "outside_image")
    assert check_box((20.5, 0.0, 0.4, 5.0), size) == (None, "outside_image")  # within the tolerance, but off the image
    assert check_box((0.0, 0.0, 0.0, 5.0), size) == (None, "non_positive_size")
    assert check_box((0.0, 0.0, 5.0, -1.0), size) == (None, "non_positive_size")
    assert check_box((math.nan, 0.0, 5.0, 5.0), size) == (None, "not_finite")
    assert check_box((0.0, 0.0, math.inf, 5.0), size) == (None, "not_finite")


def test_box_from_json_takes_only_four_finite_numbers_of_positive_size():
    assert box_from_json([1, 2, 3, 4.5]).tolist() == [1.0, 2.0, 4.0, 6.5]
    for bad in (None, [1, 2, 3], [1, 2, math.nan, 4], [1, 2, 0, 4], "1,2,3,4", [True, 2, 3, 4], {"x": 1}):
        assert box_from_json(bad) is None


def test_image_size_reads_the_header():
    assert image_size(encoded(rectangle_image(80, 60, RECTANGLE))) == (80, 60)
    assert image_size(encoded(rectangle_image(33, 17, (1, 1, 2, 2)), "PNG")) == (33, 17)


WIDE_BOX = (60, 20, 80, 60)  # x, y, w, h on the 200 x 100 images of the CSV dataset
CSV_ROWS = {  # file -> (x, y, w, h) cells as written in the CSV
    "wide.jpg": "60,20,80,60",
    "corner.jpg": "0,0,30,30",
    "overhang.jpg": "120,10,80.5,20",
    "nan.jpg": "nan,2,3,4",
    "negative.jpg": "10,10,-5,20",
    "outside.jpg": "150,10,100,20",
    "nobox.jpg": ",,,",
}


@pytest.fixture(scope="module")
def box_dataset(tmp_path_factory):
    """Seven 200 x 100 JPEGs listed by a CSV with good, clipped, bad and missing boxes."""
    root = tmp_path_factory.mktemp("boxes")
    (root / "img").mkdir()
    rows = ["path,label,x,y,w,h"]
    for index, (file_name, cells) in enumerate(CSV_ROWS.items()):
        (root / "img" / file_name).write_bytes(encoded(rectangle_image(200, 100, (60, 20, 140, 80))))
        rows.append(f"img/{file_name},{'tern' if index % 2 else 'gull'},{cells}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    listing = read_listing("csv", root / "labels.csv", {"train": 1.0}, 0)
    return build_shards(listing, root / "out", "terns", source="labels.csv", progress=False)


def test_build_keeps_every_image_and_counts_the_dropped_boxes(box_dataset):
    manifest = load_manifest(box_dataset)
    assert manifest["counts"]["train"]["total"] == len(CSV_ROWS)
    boxes = manifest["boxes"]["train"]
    examples = boxes.pop("examples")
    assert boxes == {"with_box": 3, "without_box": 4, "clipped": 1,
                     "dropped": {"not_finite": 1, "non_positive_size": 1, "outside_image": 1}}
    assert sorted(e.split(":")[0] for e in examples) == ["img/nan.jpg", "img/negative.jpg", "img/outside.jpg"]
    assert "img/outside.jpg: outside_image" in " ".join(examples)
    stored = {json.loads(s["json"])["path"]: json.loads(s["json"])["bbox"] for s in stock_samples(box_dataset)}
    assert stored == {"img/wide.jpg": [60.0, 20.0, 80.0, 60.0], "img/corner.jpg": [0.0, 0.0, 30.0, 30.0],
                      "img/overhang.jpg": [120.0, 10.0, 80.0, 20.0], "img/nan.jpg": None, "img/negative.jpg": None,
                      "img/outside.jpg": None, "img/nobox.jpg": None}


def test_eval_batches_carry_the_hand_computed_boxes(box_dataset):
    paths = {s["__key__"]: json.loads(s["json"])["path"] for s in stock_samples(box_dataset)}
    loader, _ = make_loader(box_dataset, "train", batch_size=4, img_size=32, train=False)
    found = {}
    for batch in loader:
        assert batch["boxes"].dtype == torch.float32 and batch["boxes"].shape == (len(batch["keys"]), 4)
        assert batch["has_box"].dtype == torch.bool
        for key, box, has_box in zip(batch["keys"], batch["boxes"], batch["has_box"]):
            found[paths[key]] = box.tolist() if has_box else None
            assert has_box or not box.any()
    # 200 x 100 -> Resize(floor(32 / 0.875) = 36): 72 x 36, scale 0.36; the 32 crop starts at x 20, y 2.
    # wide (60, 20, 140, 80) -> (21.6, 7.2, 50.4, 28.8) -> (1.6, 5.2, 30.4, 26.8) / 32.
    # overhang, clipped to (120, 10, 200, 30) -> (43.2, 3.6, 72, 10.8) -> (23.2, 1.6, 52 -> 32, 8.8) / 32.
    # corner (0, 0, 30, 30) -> x2 = 10.8, left of the crop at 20: nothing left.
    assert np.allclose(found.pop("img/wide.jpg"), [0.05, 0.1625, 0.95, 0.8375], atol=1e-5)
    assert np.allclose(found.pop("img/overhang.jpg"), [0.725, 0.05, 1.0, 0.275], atol=1e-5)
    assert found == dict.fromkeys(["img/corner.jpg", "img/nan.jpg", "img/negative.jpg", "img/outside.jpg",
                                   "img/nobox.jpg"])


def test_a_transform_that_cannot_move_boxes_delivers_none(box_dataset):
    loader, _ = make_loader(box_dataset, "train", batch_size=8, img_size=32, train=True,
                            transform_options={"auto_augment": "rand-m9-mstd0.5"})
    (batch,) = list(loader)
    assert batch["boxes"].shape == (7, 4) and not batch["has_box"].any() and not batch["boxes"].any()


def one_image_dataset(out: Path, width: int, height: int, box: tuple[int, int, int, int], copies: int) -> Path:
    """``copies`` samples of one JPEG: a white rectangle at ``box`` (x, y, w, h), stored as its bbox."""
    x, y, w, h = box
    data = encoded(rectangle_image(width, height, (x, y, x + w, y + h)))
    samples = [Sample(f"big_train_{i:07d}", data, "jpg", 0, {"bbox": [float(v) for v in box]}) for i in range(copies)]
    return write_dataset({"train": samples}, ["owl"], out, "big", shard_size=100, skipped=[], options={}, source="test")


def test_reduced_jpeg_decode_gives_the_full_decodes_box(tmp_path):
    dataset = one_image_dataset(tmp_path, 800, 400, (200, 100, 400, 200), copies=1)
    boxes = {}
    for reduced in (True, False):  # 800 x 400 decodes at 1/8 (100 x 50) for a 37-pixel shorter side
        loader, _ = make_loader(dataset, "train", batch_size=1, img_size=32, train=False, reduced_decode=reduced)
        (batch,) = list(loader)
        boxes[reduced] = batch["boxes"][0]
        assert batch["has_box"].all() and assert_box_on_pixels(grey_levels(batch["images"][0]), batch["boxes"][0] * 32)
    # Resize(36): 72 x 36, scale 0.09; crop from x 20, y 2: (18 - 20, 9 - 2, 54 - 20, 27 - 2) = (0 clipped, 7, 34 -> 32, 25)
    assert torch.allclose(boxes[True], boxes[False], atol=1e-6)
    assert torch.allclose(boxes[False], torch.tensor([0.0, 7 / 32, 1.0, 25 / 32]), atol=1e-6)


def test_train_batches_box_the_rectangle_after_a_reduced_decode(tmp_path):
    # 801 x 401 decodes at 1/8 to 101 x 51 pixels, each covering 8 stored ones
    dataset = one_image_dataset(tmp_path, 801, 401, (300, 100, 300, 200), copies=12)
    loader, _ = make_loader(dataset, "train", batch_size=12, img_size=32, train=True, epoch_seed=3)
    (batch,) = list(loader)
    compared = sum(assert_box_on_pixels(image, box * 32 if has_box else None)
                   for image, box, has_box in zip(grey_levels(batch["images"]), batch["boxes"], batch["has_box"]))
    assert compared >= 6


def test_max_side_scales_the_stored_box(tmp_path):
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    (root / "img" / "big.png").write_bytes(encoded(rectangle_image(120, 60, (30, 15, 90, 45)), "PNG"))
    (root / "labels.csv").write_text("path,label,x,y,w,h\nimg/big.png,owl,30,15,60,30\n")
    listing = read_listing("csv", root / "labels.csv", {"train": 1.0}, 0)
    out = build_shards(listing, tmp_path / "out", "owls", source="src", max_side=48, progress=False)
    (sample,) = stock_samples(out)
    stored = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))).permute(2, 0, 1)
    assert stored.shape == (3, 24, 48)
    assert json.loads(sample["json"])["bbox"] == [12.0, 6.0, 24.0, 12.0]  # 120 x 60 -> 48 x 24: all * 0.4
    assert assert_box_on_pixels(stored, torch.tensor([12.0, 6.0, 36.0, 18.0]))


def test_csv_lists_non_finite_boxes_and_rejects_text(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encoded(rectangle_image(8, 8, (1, 1, 2, 2))))
    (tmp_path / "d.csv").write_text("path,label,x,y,w,h\na.jpg,gull,inf,1,2,3\n")
    (item,) = read_listing("csv", tmp_path / "d.csv", {"train": 1.0}, 0).items
    assert item.bbox[0] == math.inf
    (tmp_path / "d.csv").write_text("path,label,x,y,w,h\na.jpg,gull,one,1,2,3\n")
    with pytest.raises(DataError, match=r"d.csv:2: bbox = \['one', '1', '2', '3'\]: expected numbers"):
        read_listing("csv", tmp_path / "d.csv", {"train": 1.0}, 0)
    cub = make_cub(tmp_path / "cub")
    (cub / "bounding_boxes.txt").write_text("1 one 2.0 20.0 30.0\n")
    with pytest.raises(DataError, match="image id 1: bbox"):
        read_listing("cub", cub, {"train": 1.0}, 0)


def test_decoded_scale_is_the_dct_factor():
    assert decoded_scale((800, 400), (100, 50)) == (1 / 8, 1 / 8)
    assert decoded_scale((801, 401), (101, 51)) == (1 / 8, 1 / 8)  # pixel i covers stored [8 i, 8 i + 8)
    assert decoded_scale((801, 401), (401, 201)) == (1 / 2, 1 / 2)
    assert decoded_scale((30, 20), (30, 20)) == (1.0, 1.0)
    assert decoded_scale((100, 50), (40, 20)) == (0.4, 0.4)  # not a DCT scale: the ratio of the sizes


def test_demo_boxes_are_valid_stored_pixel_boxes():
    table = species_table(12, seed=0)
    for index in range(40):
        image, box = render_image(0, "train", index % 12, index, table[index % 12], 48)
        assert check_box(box, image.size) == (tuple(box), "ok")
