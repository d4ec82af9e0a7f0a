import json
from pathlib import Path

import pytest

from mgmoe_ds.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ExpertSpec,
    RunConfig,
    config_from_dict,
    load_run_config,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config, ds = load_run_config(path)
    assert isinstance(config, RunConfig)
    assert "mgmoe" not in ds and "train_micro_batch_size_per_gpu" in ds


def test_default_config_is_zero2():
    assert DEFAULT_CONFIG_PATH.name == "zero2.json"


def write(tmp_path, block, extra=None):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, **(extra or {}), "mgmoe": block}))
    return path


def test_deepspeed_part_is_passed_through_untouched(tmp_path):
    extra = {"zero_optimization": {"stage": 1, "whatever_deepspeed_knows": 3}}
    _, ds = load_run_config(write(tmp_path, {}, extra))
    assert ds == {"train_micro_batch_size_per_gpu": 4, **extra}


def test_expert_short_form_and_options():
    config = config_from_dict({"model": {"experts": ["mlp", {"name": "pim", "options": {"top_k": [8, 4, 2, 1]}}]},
                               "moe": {"top_k": 1}})
    assert config.model.experts == [ExpertSpec("mlp"), ExpertSpec("pim", {"top_k": [8, 4, 2, 1]})]
    assert config.num_experts == 2


@pytest.mark.parametrize("block, message", [
    ({"moe": {"top_k": 5}}, "mgmoe.moe.top_k = 5: expected an integer from 1 to the number of experts (4)"),
    ({"moe": {"expert_parallel_size": 3}}, "mgmoe.moe.expert_parallel_size = 3: expected a positive divisor"),
    ({"moe": {"capacity_factor": 0}}, "mgmoe.moe.capacity_factor = 0.0: expected a number > 0"),
    ({"moe": {"capacity_factor": -1.5}}, "mgmoe.moe.capacity_factor = -1.5: expected a number > 0"),
    ({"moe": {"top_k": "two"}}, "mgmoe.moe.top_k = 'two': expected integer"),
    ({"moe": {"dropless": 1}}, "mgmoe.moe.dropless = 1: expected true/false"),
    ({"moe": {"noisy_gate_policy": "gumbel"}}, 'mgmoe.moe.noisy_gate_policy = \'gumbel\': expected "jitter" or "rsample" or null'),
    ({"moe": {"topk": 2}}, "unknown key mgmoe.moe.topk; accepted keys:"),
    ({"modle": {}}, "unknown key mgmoe.modle; accepted keys: cache, curriculum, data, model, moe, train"),
    ({"curriculum": {"stages": [{"name": "warmup"}]}}, "mgmoe.curriculum.stages[0]"),
    ({"curriculum": {"stages": [{"name": "polish", "epochs": 1}]}}, "mgmoe.curriculum.stages[0].name = 'polish'"),
])
def test_bad_values_fail_in_one_line_naming_file_and_key(tmp_path, block, message):
    path = write(tmp_path, block)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(str(path) + ": ")
    assert message in text, text


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, {})
    config, _ = load_run_config(path, ["moe.top_k=1", "model.experts=[\"mlp\",\"mlp\"]", "data.dataset=shards/x"])
    assert config.moe.top_k == 1 and config.num_experts == 2 and config.data.dataset == "shards/x"
    with pytest.raises(ConfigError, match="unknown key mgmoe.moe.top_kk"):
        load_run_config(path, ["moe.top_kk=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_run_config(path, ["moe.top_k"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"mgmoe\": {,}}")
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 1"):
        load_run_config(bad)


def test_config_is_frozen():
    config = config_from_dict({})
    with pytest.raises(Exception):
        config.moe.top_k = 3  # type: ignore[misc]
