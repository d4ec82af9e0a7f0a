import copy
import json
import subprocess
import sys
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
    config = config_from_dict({"model": {"experts": ["mlp", {"name": "pim", "options": {"num_selects": [8, 4, 2, 1]}}]},
                               "moe": {"top_k": 1}})
    assert config.model.experts == [ExpertSpec("mlp"), ExpertSpec("pim", {"num_selects": [8, 4, 2, 1]})]
    assert config.num_experts == 2


def test_an_option_pim_does_not_have_is_refused_at_load(tmp_path):
    path = write(tmp_path, {"model": {"experts": ["mlp", {"name": "pim", "options": {"top_k": [8, 4, 2, 1]}}]},
                            "moe": {"top_k": 1}})
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value) == (f"{path}: unknown key mgmoe.model.experts[1].options.top_k; accepted keys: "
                              "combiner_weight, dim, drop_path, dropout, level_weight, num_nodes, num_selects, "
                              "select_ratio, suppression_weight")


# Per expert: a wrong type, a wrong tuple length (or a wrong entry), an out-of-range value, an unknown key.
BAD_EXPERT_OPTIONS = [
    ("mlp", {"hidden_dim": "wide"}, "options.hidden_dim = 'wide': expected integer or null"),
    ("mlp", {"hidden_dim": 0}, "options.hidden_dim = 0: expected an integer >= 1"),
    ("mlp", {"dropout": 1}, "options.dropout = 1.0: expected a number in [0, 1)"),
    ("mpsa", {"num_parts": [16, 8, 8]}, "options.num_parts = [16, 8, 8]: expected list of 4 integers"),
    ("mpsa", {"num_parts": [16, 8, 0, 4]}, "options.num_parts[2] = 0: expected an integer >= 1"),
    ("mpsa", {"dim": 12.5}, "options.dim = 12.5: expected integer"),
    ("mpsa", {"part_drop": -0.1}, "options.part_drop = -0.1: expected a number in [0, 1)"),
    ("mpsa", {"label_smoothing": True}, "options.label_smoothing = true: expected number"),
    ("pmg", {"granularities": "4,2,1"}, "options.granularities = '4,2,1': expected list of 3 integers"),
    ("pmg", {"granularities": [4, 2, 1, 1]}, "options.granularities = [4, 2, 1, 1]: expected list of 3 integers"),
    ("pmg", {"granularities": [4, 2.5, 1]}, "options.granularities[1] = 2.5: expected integer"),
    ("pmg", {"level_weight": -1}, "options.level_weight = -1.0: expected a number >= 0"),
    ("pmg", {"hidden": 0}, "options.hidden = 0: expected an integer >= 1"),
    ("transfg", {"num_queries": "4"}, "options.num_queries = '4': expected integer"),
    ("transfg", {"margin": 2}, "options.margin = 2.0: expected a number in [-1, 1]"),
    ("transfg", {"dim": 0}, "options.dim = 0: expected an integer >= 1"),
    ("pim", {"select_ratio": 0}, "options.select_ratio = 0.0: expected a number in (0, 1]"),
    ("pim", {"select_ratio": 1.5}, "options.select_ratio = 1.5: expected a number in (0, 1]"),
    ("pim", {"num_selects": [3, 2, 2]}, "options.num_selects = [3, 2, 2]: expected list of 4 integers or null"),
    ("pim", {"num_selects": [3, 2, 0, 1]}, "options.num_selects[2] = 0: expected an integer >= 1"),
    ("pim", {"suppression_weight": -5}, "options.suppression_weight = -5.0: expected a number >= 0"),
]
UNKNOWN_OPTION_MESSAGES = {
    "mlp": "drop_path, dropout, hidden_dim",
    "mpsa": "dim, drop_path, dropout, label_smoothing, num_parts, part_drop, se_reduction",
    "pmg": "concat_weight, drop_path, granularities, hidden, level_weight, mid_channels, out_channels",
    "transfg": "contrastive_weight, dim, drop_path, dropout, margin, num_queries",
    "pim": "combiner_weight, dim, drop_path, dropout, level_weight, num_nodes, num_selects, select_ratio, "
           "suppression_weight",
}


def load_expert(tmp_path, expert):
    """Loads a file whose second expert is ``expert`` (after a plain "mlp")."""
    return load_run_config(write(tmp_path, {"model": {"experts": ["mlp", expert]}, "moe": {"top_k": 1}}))


@pytest.mark.parametrize("name, options, message", BAD_EXPERT_OPTIONS,
                         ids=[f"{n}-{next(iter(o))}-{i}" for i, (n, o, _) in enumerate(BAD_EXPERT_OPTIONS)])
def test_bad_expert_options_fail_at_load_in_one_exact_line(tmp_path, name, options, message):
    with pytest.raises(ConfigError) as err:
        load_expert(tmp_path, {"name": name, "options": options})
    assert str(err.value) == f"{tmp_path / 'ds.json'}: mgmoe.model.experts[1].{message}"


@pytest.mark.parametrize("name", sorted(UNKNOWN_OPTION_MESSAGES))
def test_unknown_expert_option_fails_at_load_listing_the_accepted_keys(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        load_expert(tmp_path, {"name": name, "options": {"depth": 3}})
    assert str(err.value) == (f"{tmp_path / 'ds.json'}: unknown key mgmoe.model.experts[1].options.depth; "
                              f"accepted keys: {UNKNOWN_OPTION_MESSAGES[name]}")


def test_unknown_expert_name_fails_at_load_listing_the_registered_experts(tmp_path):
    from mgmoe_ds.experts import list_experts

    with pytest.raises(ConfigError) as err:
        load_expert(tmp_path, "vit")
    assert str(err.value) == (f"{tmp_path / 'ds.json'}: mgmoe.model.experts[1].name = 'vit': "
                              f"expected a registered expert ({', '.join(list_experts())})")


def test_expert_options_as_given_are_kept_once_valid(tmp_path):
    options = {"granularities": [2, 2, 1], "level_weight": 0}
    config, _ = load_expert(tmp_path, {"name": "pmg", "options": options})
    assert config.model.experts[1] == ExpertSpec("pmg", options)  # plain JSON values, for run folders and exports


def test_tuple_annotations_read_json_lists_of_the_right_length():
    from typing import Optional

    from mgmoe_ds.typed_json import convert as _convert, type_name as _type_name

    assert _convert(tuple[int, int, int], [4, 2, 1], "k", "f") == (4, 2, 1)
    assert _convert(tuple[float, ...], [1, 2.5], "k", "f") == (1.0, 2.5)
    assert _convert(tuple[int, ...], [], "k", "f") == ()
    assert _convert(Optional[tuple[int, int]], None, "k", "f") is None
    assert _type_name(tuple[int, int, int]) == "list of 3 integers"
    assert _type_name(tuple[int, ...]) == "list of integers"
    assert _type_name(Optional[tuple[int, int, int, int]]) == "list of 4 integers or null"
    with pytest.raises(ConfigError, match=r"^f: k = \[1, 2\]: expected list of 3 integers$"):
        _convert(tuple[int, int, int], [1, 2], "k", "f")
    with pytest.raises(ConfigError, match=r"^f: k\[1\] = 'x': expected integer$"):
        _convert(tuple[int, ...], [1, "x"], "k", "f")


def test_importing_the_config_imports_neither_torch_nor_timm():
    code = "import sys, mgmoe_ds.config; print(sorted(m for m in ('timm', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("block, message", [
    ({"moe": {"top_k": 5}}, "mgmoe.moe.top_k = 5: expected an integer from 1 to the number of experts (4)"),
    ({"moe": {"expert_parallel_size": 3}}, "mgmoe.moe.expert_parallel_size = 3: expected a positive divisor"),
    ({"moe": {"capacity_factor": 0}}, "mgmoe.moe.capacity_factor = 0.0: expected a number > 0"),
    ({"moe": {"capacity_factor": -1.5}}, "mgmoe.moe.capacity_factor = -1.5: expected a number > 0"),
    ({"moe": {"top_k": "two"}}, "mgmoe.moe.top_k = 'two': expected integer"),
    ({"moe": {"dropless": 1}}, "mgmoe.moe.dropless = 1: expected true/false"),
    ({"moe": {"noisy_gate_policy": "gumbel"}}, 'mgmoe.moe.noisy_gate_policy = \'gumbel\': expected "jitter" or "rsample" or null'),
    ({"moe": {"topk": 2}}, "unknown key mgmoe.moe.topk; accepted keys:"),
    ({"modle": {}}, "unknown key mgmoe.modle; accepted keys: cache, curriculum, data, distill, model, moe, train"),
    ({"curriculum": {"stages": [{"name": "warmup"}]}}, "mgmoe.curriculum.stages[0]"),
    ({"curriculum": {"stages": [{"name": "polish", "epochs": 1}]}}, "mgmoe.curriculum.stages[0].name = 'polish'"),
    ({"model": {"backbone": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite3"}},
     'mgmoe.model.pretrained = \'efficientnet-lite3\': expected an offline checkpoint ("efficientnet-lite0", '
     '"efficientnet-lite1", "efficientnet-lite2") or a weights file'),
    ({"cache": {"depth": -1}}, "mgmoe.cache.depth = -1: expected a backbone block index >= 0, or null"),
    ({"curriculum": {"clustering": "dbscan"}},
     'mgmoe.curriculum.clustering = \'dbscan\': expected "kmeans" or "kmeans+knn"'),
    ({"curriculum": {"knn_neighbours": 0}}, "mgmoe.curriculum.knn_neighbours = 0: expected an integer >= 1"),
    ({"curriculum": {"knn_agreement": 0}}, "mgmoe.curriculum.knn_agreement = 0.0: expected a share in (0, 1]"),
    ({"curriculum": {"knn_agreement": 1.5}}, "mgmoe.curriculum.knn_agreement = 1.5: expected a share in (0, 1]"),
    ({"curriculum": {"stages": [{"name": "warmup", "epochs": 1, "lr": {"backbone_top": 0.001}}]}},
     "mgmoe.curriculum.stages[0].lr.backbone_top = 0.001: expected 0 or absent while mgmoe.cache.depth is null"),
    ({"model": {"backbone": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite2"}},
     'mgmoe.model.backbone = \'tf_efficientnet_lite0\': expected "tf_efficientnet_lite2", the architecture of '
     'model.pretrained = "efficientnet-lite2"'),
])
def test_bad_values_fail_in_one_line_naming_file_and_key(tmp_path, block, message):
    path = write(tmp_path, block)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(str(path) + ": ")
    assert message in text, text


def test_clustering_is_plain_kmeans_unless_set_and_its_neighbour_vote_is_set_by_override(tmp_path):
    default = RunConfig().curriculum
    assert (default.clustering, default.knn_neighbours, default.knn_agreement) == ("kmeans", 10, 0.5)
    config, _ = load_run_config(write(tmp_path, {}), ["curriculum.clustering=kmeans+knn",
                                                     "curriculum.knn_neighbours=5", "curriculum.knn_agreement=1"])
    assert (config.curriculum.clustering, config.curriculum.knn_neighbours, config.curriculum.knn_agreement) == (
        "kmeans+knn", 5, 1.0)


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


def test_offline_checkpoints_and_weight_files_are_accepted_at_load():
    for n in (0, 1, 2):
        config = config_from_dict({"model": {"backbone": f"tf_efficientnet_lite{n}",
                                             "pretrained": f"efficientnet-lite{n}"}})
        assert config.model.pretrained == f"efficientnet-lite{n}"
    assert config_from_dict({"model": {"pretrained": "weights/efficientnet-b0.pth"}}).model.pretrained


def test_config_is_frozen():
    config = config_from_dict({})
    with pytest.raises(Exception):
        config.moe.top_k = 3  # type: ignore[misc]


def test_fitting_the_teacher_on_the_test_split_is_refused_at_load():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"val_split": "test"}}, "ds.json")
    message = str(error.value)
    assert message.startswith("ds.json: mgmoe.data.val_split = 'test': expected a split other than test")
    assert "\n" not in message
    assert "--val-fraction" in message


@pytest.mark.parametrize("rate", [-0.1, 1.0, "0.1"])
def test_backbone_drop_path_rate_out_of_range_is_one_line(rate):
    from conftest import TINY_MGMOE

    block = copy.deepcopy(TINY_MGMOE)
    block["model"]["backbone_options"] = dict(block["model"]["backbone_options"], drop_path_rate=rate)
    with pytest.raises(ConfigError, match=r"mgmoe\.model\.backbone_options\.drop_path_rate"):
        config_from_dict(block)
    block["model"]["backbone_options"]["drop_path_rate"] = 0.1
    assert config_from_dict(block).model.backbone_options["drop_path_rate"] == 0.1
