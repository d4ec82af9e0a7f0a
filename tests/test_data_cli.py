"""The `mgmoe shards` commands, end to end through the console-script entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mgmoe_ds.cli import main
from test_data_shards import make_imagefolder

REPO = Path(__file__).resolve().parents[1]


def test_build_verify_register_demo(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src")
    out, registry = tmp_path / "shards", tmp_path / "registry.json"
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "wrens", "--out", str(out),
                 "--split", "train=0.5,val=0.25,test=0.25", "--shard-size", "2"]) == 0
    assert "wrens: reading" in capsys.readouterr().err  # the tqdm progress bar
    manifest = json.loads((out / "wrens" / "manifest.json").read_text())
    assert manifest["options"]["shard_size"] == 2 and manifest["options"]["format"] == "imagefolder"
    assert {p.name for p in (out / "wrens").glob("*.tar")} == {s["path"] for s in manifest["shards"]}
    assert main(["shards", "verify", str(out / "wrens"), "--no-progress"]) == 0
    assert main(["shards", "demo", "--out", str(out), "--num-classes", "3", "--train-images", "12",
                 "--val-per-class", "1", "--test-per-class", "1", "--image-size", "32"]) == 0
    assert main(["shards", "register", str(out / "wrens"), "--registry", str(registry)]) == 0
    assert main(["shards", "register", str(out / "demo_birds"), "--registry", str(registry)]) == 0
    data = json.loads(registry.read_text())
    assert data["classes"][:3] == ["crow", "finch", "wren"] and len(data["classes"]) == 6
    assert data["datasets"]["wrens"]["path"] == "shards/wrens"  # relative to the registry's folder


def test_bad_split_fractions_are_a_one_line_error(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src")
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "w", "--out", str(tmp_path),
                 "--split", "train=0.9,val=0.3"]) == 2
    assert "--split" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "mgmoe_ds.cli", "shards", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and all(c in result.stdout for c in ("build", "verify", "register", "demo"))


def make_train_test_folder(root: Path, train_per_class: dict[str, int], test_per_class: int = 2) -> Path:
    """``root/{train,test}/<class>/*.jpg``: a source with no validation split (as CUB and many sets are)."""
    from test_data_shards import image_bytes

    for c, (name, count) in enumerate(train_per_class.items()):
        for split, n in (("train", count), ("test", test_per_class)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / name / f"{i:03d}.jpg").write_bytes(image_bytes(100 * c + i + (50 if split == "test" else 0)))
    return root


def test_a_source_without_validation_gets_a_stratified_seeded_one_carved_from_train(tmp_path, capsys):
    src = make_train_test_folder(tmp_path / "src", {"crow": 10, "finch": 20, "wren": 3})
    for run in ("a", "b"):
        assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "birds", "--out",
                     str(tmp_path / run), "--val-fraction", "0.2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    # by hand: round(0.2 * 10) = 2, round(0.2 * 20) = 4, and wren's 3 give max(1, round(0.6)) = 1
    assert "carved a validation split from train: 7 images" in printed
    manifests = [json.loads((tmp_path / run / "birds" / "manifest.json").read_text()) for run in ("a", "b")]
    counts = manifests[0]["counts"]
    assert counts["val"]["per_class"] == {"crow": 2, "finch": 4, "wren": 1}
    assert counts["train"]["per_class"] == {"crow": 8, "finch": 16, "wren": 2}
    assert counts["test"]["per_class"] == {"crow": 2, "finch": 2, "wren": 2}  # test is never touched
    assert manifests[0]["options"]["val_carved"] == 7 and manifests[0]["options"]["val_fraction"] == 0.2
    val_paths = [[s for s in m["shards"] if s["split"] == "val"] for m in manifests]
    assert val_paths[0] == val_paths[1]  # seeded: the same images, the same shards


def test_a_source_with_validation_keeps_it(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", per_class=8)
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "w", "--out", str(tmp_path / "o"),
                 "--split", "train=0.5,val=0.25,test=0.25", "--no-progress"]) == 0
    assert "carved" not in capsys.readouterr().out
    manifest = json.loads((tmp_path / "o" / "w" / "manifest.json").read_text())
    assert manifest["counts"]["val"]["total"] == 6 and manifest["options"]["val_carved"] == 0


def test_bad_validation_requests_fail_in_one_line_before_any_shard(tmp_path, capsys):
    src = make_train_test_folder(tmp_path / "src", {"crow": 10, "wren": 1})
    out = tmp_path / "out"
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "b", "--out", str(out),
                 "--val-fraction", "0.7"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "mgmoe shards: error: --val-fraction = 0.7: expected a fraction in (0, 0.5]"
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "b", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "class 'wren' has 1 training image(s): too few to give both a training and a " \
                               "validation image" in error[0]
    assert not out.exists()  # nothing was written
    assert main(["shards", "build", str(src), "--format", "imagefolder", "--name", "b", "--out", str(out),
                 "--no-val-split", "--no-progress"]) == 0
    assert "no validation split: training needs one" in capsys.readouterr().out
