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
