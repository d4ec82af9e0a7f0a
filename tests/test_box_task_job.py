"""The box task end to end: a job trains the tower on the demo birds' boxes, ``mgmoe eval`` reports
its IoU and compares top-1 with a run without it, the export carries the tower, and ``mgmoe predict``
prints each box in the file's pixels and writes crops."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import INFERENCE_STAGES, TINY_MGMOE, launch_training, succeeded, write_tiny_config
from test_inference import extract_split, mgmoe

pytestmark = pytest.mark.slow
BOX_TASK = {"bbox": {"channels": 8, "grid": 2, "hidden": 16}}


@pytest.fixture(scope="module")
def box_run(tmp_path_factory, tiny_dataset) -> Path:
    tmp = tmp_path_factory.mktemp("box_run")
    config = write_tiny_config(tmp / "ds.json", model=dict(TINY_MGMOE["model"], tasks=BOX_TASK),
                               curriculum=INFERENCE_STAGES)
    succeeded(launch_training(config, tiny_dataset, tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def box_eval(box_run, trained_run, tiny_dataset, tmp_path_factory) -> Path:
    from mgmoe_ds.cli import main

    out = tmp_path_factory.mktemp("box_eval")
    assert main(["eval", "--checkpoint", str(box_run), "--data", str(tiny_dataset), "--compare", str(trained_run),
                 "--out", str(out), "--no-progress"]) == 0
    return out


def split_boxes(dataset: Path, split: str) -> dict[str, list[float]]:
    """Each sample's json bbox ``[x, y, w, h]`` (pixels of the stored image), read from the shards."""
    boxes = {}
    for shard in sorted(dataset.glob(f"*-{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext == "json":
                    box = json.loads(tar.extractfile(member).read())["bbox"]
                    if box is not None:
                        boxes[key] = box
    return boxes


def test_the_job_trains_the_tower_and_validates_its_iou(box_run):
    lines = [json.loads(line) for line in (box_run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "bbox" in json.dumps(line) and line.get("event") != "validation"]
    assert steps, "the box loss is logged"
    validations = [line for line in lines if line.get("event") == "validation"]
    assert validations and all(0.0 <= line["val_mean_iou"] <= 1.0 for line in validations)
    config = json.loads((box_run / "config.json").read_text())
    assert config["mgmoe"]["model"]["tasks"]["bbox"]["grid"] == 2


def test_eval_reports_box_quality_and_the_top1_difference_with_the_plain_run(box_eval, eval_report, tiny_dataset):
    report = json.loads((box_eval / "report.json").read_text())
    boxes = report["boxes"]
    assert boxes["images_with_box"] == len(split_boxes(tiny_dataset, "test")) == report["images"]
    assert 0.0 <= boxes["mean_box_baseline"]["mean_iou"] <= 1.0
    plain = json.loads((eval_report / "report.json").read_text())  # the plain run's own eval, same split
    compare = report["compare"]
    assert compare["box_task"] == {"this": True, "other": False}
    assert compare["other_top1"] == pytest.approx(plain["accuracy"]["top1"])
    assert compare["top1"] == pytest.approx(report["accuracy"]["top1"])
    assert compare["difference"] == pytest.approx(compare["top1"] - compare["other_top1"])
    assert "Where the bird is" in (box_eval / "report.md").read_text()


def test_predict_prints_boxes_in_the_files_pixels_and_writes_crops(box_run, box_eval, tiny_dataset, tmp_path):
    from safetensors import safe_open

    exported = tmp_path / "model.safetensors"
    assert mgmoe("export", "--checkpoint", str(box_run), "--out", str(exported)).returncode == 0
    with safe_open(str(exported), framework="pt") as handle:
        assert any(name.startswith("box_tower.") for name in handle.keys())
        preprocessing = json.loads(handle.metadata()["preprocessing"])
    images = extract_split(tiny_dataset, "test", tmp_path / "images")
    result = mgmoe("predict", "--model", str(exported), "--crops", str(tmp_path / "crops"), str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = {Path(r["file"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    evaluated = {row["key"]: row for row in map(json.loads, (box_eval / "predictions.jsonl").read_text().splitlines())}
    # The eval transform by hand (timm): resize the shorter side to floor(size / crop_pct), centre-crop size.
    size = preprocessing["img_size"]
    resized = math.floor(size / preprocessing["crop_pct"])
    for key, path in images.items():
        record = records[path.stem]
        width, height = Image.open(path).size
        assert width == height  # the demo birds are square: one scale for both axes
        offset = int(round((resized - size) / 2))
        x1, y1, x2, y2 = [(v * size + offset) * width / resized for v in evaluated[key]["box"]]
        box = record["box"]
        assert [box["x"], box["y"], box["w"], box["h"]] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.11), key
        crop = Image.open(record["crop"])
        assert abs(crop.width - box["w"]) <= 1.5 and abs(crop.height - box["h"]) <= 1.5, key


def test_crops_without_a_box_tower_is_one_line(trained_run, tmp_path):
    result = mgmoe("predict", "--model", str(trained_run), "--crops", str(tmp_path / "crops"), str(tmp_path))
    assert result.returncode == 2 and "has no box tower" in result.stderr and len(result.stderr.splitlines()) == 1
