"""``mgmoe predict``'s box in the file's pixels and its crops, on a hand-computed case."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from conftest import TINY_MGMOE


class FixedBox(torch.nn.Module):
    """A tower that answers (0.25, 0.25, 0.75, 0.75) of the model's input for every image."""

    def forward(self, tokens):
        return tokens.new_tensor([0.25, 0.25, 0.75, 0.75]).expand(tokens.shape[0], 4)  # (B, 4)


def boxed_model_and_meta():
    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.inference import InferenceMeta, build_model, inference_config, preprocessing_for
    from mgmoe_ds.moe.routing import RoutingRequest

    block = copy.deepcopy(TINY_MGMOE)
    block["model"]["tasks"] = {"bbox": True}
    config = inference_config(config_from_dict({"model": block["model"], "moe": block["moe"]}))
    torch.manual_seed(0)
    model = build_model(config, 4)
    model.box_tower = FixedBox()
    meta = InferenceMeta(config=config, class_names=["wren", "robin", "finch", "tit"],
                         preprocessing=preprocessing_for(model), routing=RoutingRequest(top_k=2), source="<test>")
    return model, meta


def test_predicted_box_is_mapped_back_through_reduced_decode_resize_and_crop(tmp_path):
    from mgmoe_ds.predict import predict_files

    model, meta = boxed_model_and_meta()
    assert meta.preprocessing.img_size == 32 and meta.preprocessing.crop_pct == pytest.approx(0.9)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (400, 200), (90, 140, 60)).save(photo, quality=90)
    record = next(predict_files(model, meta, [photo], crops_dir=tmp_path / "crops"))
    # By hand: the decode needs a shorter side >= ceil(32 / 0.9) = 36, so the 400 x 200 JPEG decodes
    # at 1/4 (200 // 36 = 5 >= 4): 100 x 50. Resize the shorter side to floor(32 / 0.9) = 35: 70 x 35;
    # centre-crop 32: left round(38 / 2) = 19, top round(3 / 2) = 2. The box 8..24 of 32 px is then
    # x 27..43, y 10..26 in the 70 x 35 image; x 100/70 and y 50/35 into the decode: x 38.571..61.429,
    # y 14.286..37.143; x 4 into the file: x 154.29..245.71, y 57.14..148.57.
    assert record["box"] == pytest.approx({"x": 154.3, "y": 57.1, "w": 91.4, "h": 91.4}, abs=0.051)
    crop = Image.open(record["crop"])
    assert record["crop"] == str(tmp_path / "crops" / "photo.jpg")
    assert abs(crop.width - 91.4) <= 1.5 and abs(crop.height - 91.4) <= 1.5


def test_two_inputs_with_one_stem_get_two_crops(tmp_path):
    from mgmoe_ds.predict import predict_files

    model, meta = boxed_model_and_meta()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / folder / "bird.png")
    records = list(predict_files(model, meta, [tmp_path / "a" / "bird.png", tmp_path / "b" / "bird.png"],
                                 crops_dir=tmp_path / "crops"))
    assert [r["crop"] for r in records] == [str(tmp_path / "crops" / "bird.jpg"), str(tmp_path / "crops" / "bird-1.jpg")]


def test_crops_need_a_box_tower(tmp_path):
    from test_inference import tiny_model_and_meta

    from mgmoe_ds.predict import predict_files

    model, meta = tiny_model_and_meta()
    with pytest.raises(ValueError, match="has no box tower"):
        next(predict_files(model, meta, [tmp_path / "x.jpg"], crops_dir=tmp_path / "crops"))
