"""Starting a run from a trained model (``train.init_from``, ``--init-from``, ``--freeze``): the
weight transfer by export name and species name, its errors, freezing, and the README's path
"a lab adds species to last year's model" as a user runs it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import ROOT, TINY_MGMOE, launch_training, succeeded, write_small_set, write_tiny_config


def tiny_config(**changes):
    """The tiny model's run config at expert-parallel size 1; ``changes`` replace keys of its model block."""
    from mgmoe_ds.config import config_from_dict

    return config_from_dict({"model": dict(TINY_MGMOE["model"], **changes), "moe": TINY_MGMOE["moe"]})


def exported_source(tmp_path, class_names, seed=0, **changes):
    """A randomly initialised tiny model exported as a trained one would be; returns (file, its tensors)."""
    from mgmoe_ds.export import save_export, tensor_names
    from mgmoe_ds.inference import InferenceMeta, build_model, inference_config, preprocessing_for
    from mgmoe_ds.moe.routing import RoutingRequest

    config = inference_config(tiny_config(**changes))
    torch.manual_seed(seed)
    model = build_model(config, len(class_names))
    with torch.no_grad():  # as training leaves it: no value left at its (often constant) initialisation
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) + 0.5)
    meta = InferenceMeta(config=config, class_names=list(class_names), preprocessing=preprocessing_for(model),
                         routing=RoutingRequest(top_k=2), source="<test>", checkpoint_tag="stage2-residual-end")
    path = save_export(model, meta, tmp_path / f"source{seed}.safetensors")
    names = tensor_names(model)
    return path, {names[k]: v.clone() for k, v in model.state_dict().items()}


def target_model(num_classes, seed=1, expert_parallel_size=1, expert_parallel_rank=0, **changes):
    """This run's freshly built model (only its own experts at expert_parallel_size > 1), its config
    and its initial tensors by export name."""
    import dataclasses

    from mgmoe_ds.export import tensor_names
    from mgmoe_ds.model import MGMoE

    config = tiny_config(**changes)
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, expert_parallel_size=expert_parallel_size))
    torch.manual_seed(seed)
    model = MGMoE(config.model, config.moe, num_classes, expert_parallel_rank=expert_parallel_rank)
    names = tensor_names(model)
    return model, config, {names[k]: v.clone() for k, v in model.state_dict().items()}


def tensors_of(model):
    from mgmoe_ds.export import tensor_names

    names = tensor_names(model)
    return {names[k]: v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The transfer


def test_shared_classes_keep_their_rows_by_name_new_ones_their_init_and_the_rest_is_copied(tmp_path):
    from mgmoe_ds.train.transfer import load_initial_weights

    path, source = exported_source(tmp_path, ["a", "b", "c"])
    model, config, initial = target_model(4)
    record = load_initial_weights(model, path, ["c", "x", "a", "y"], config)
    after = tensors_of(model)
    # class-indexed: the fallback head's and every expert head's rows and bias entries (here dim 0)
    class_tensors = {n for n, v in after.items() if v.shape[:1] == (4,) and source[n].shape[:1] == (3,)}
    assert {"fallback.1.weight", "fallback.1.bias", "experts.mpsa.head.weight", "experts.transfg.head.bias",
            "experts.pmg.concat_head.4.weight", "experts.pim.combiner.head.weight"} <= class_tensors
    assert set(record["class_tensors"]) == class_tensors
    for name in class_tensors:
        assert torch.equal(after[name][0], source[name][2]), name  # c
        assert torch.equal(after[name][2], source[name][0]), name  # a
        assert torch.equal(after[name][1], initial[name][1]) and torch.equal(after[name][3], initial[name][3]), name
        assert not torch.equal(after[name][1], source[name][1]), name  # x did not get b's row
    for name, value in after.items():
        if name not in class_tensors:
            assert torch.equal(value, source[name]), name
    assert record["tensors_copied"] == len(after) - len(class_tensors)
    assert record["classes_kept"] == {"count": 2, "names": ["c", "a"]}
    assert record["classes_new"] == {"count": 2, "names": ["x", "y"]}
    assert record["classes_dropped"] == {"count": 1, "names": ["b"]}
    assert record["left_at_init"] == [] and record["not_used"] == []
    assert record["checkpoint_tag"] == "stage2-residual-end" and record["source"] == str(path)
    json.dumps(record)  # the run folder's init_from.json


def test_the_same_number_of_classes_in_another_order_is_mapped_by_name_and_the_run_rng_is_untouched(tmp_path):
    from mgmoe_ds.train.transfer import load_initial_weights

    path, source = exported_source(tmp_path, ["a", "b", "c", "d"])
    model, config, _ = target_model(4)
    state = torch.random.get_rng_state()
    record = load_initial_weights(model, path, ["d", "b", "a", "e"], config)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading and probing drew from forked generators
    after = tensors_of(model)
    assert "experts.pim.token_heads.2.weight" in record["class_tensors"]
    for name in record["class_tensors"]:
        assert torch.equal(after[name][0], source[name][3]) and torch.equal(after[name][2], source[name][0]), name
        assert torch.equal(after[name][1], source[name][1]), name
    assert torch.equal(after["router.gate.weight"], source["router.gate.weight"])
    assert record["classes_new"]["names"] == ["e"] and record["classes_dropped"]["names"] == ["c"]


def test_a_rank_holding_only_its_experts_gets_those_experts_weights(tmp_path):
    from mgmoe_ds.train.transfer import load_initial_weights

    path, source = exported_source(tmp_path, ["a", "b", "c", "d"])
    model, config, _ = target_model(4, expert_parallel_size=2, expert_parallel_rank=1)
    assert [model.expert_names[e] for e in model.moe.global_expert_ids] == ["transfg", "pim"]
    record = load_initial_weights(model, path, ["a", "b", "c", "d"], config)
    after = tensors_of(model)
    assert {n.split(".")[1] for n in after if n.startswith("experts.")} == {"transfg", "pim"}
    for name, value in after.items():
        assert torch.equal(value, source[name]), name
    # the experts rank 0 holds are neither missing here nor unused
    assert record["not_used"] == [] and record["left_at_init"] == [] and record["class_tensors"] == []


def test_tensors_only_one_side_has_are_listed(tmp_path):
    from mgmoe_ds.train.transfer import load_initial_weights

    moe = {"blocks": [1], "num_experts": 2}
    path, _ = exported_source(tmp_path, ["a", "b"], backbone_moe=moe)
    model, config, initial = target_model(2)
    record = load_initial_weights(model, path, ["a", "b"], config)
    assert "backbone.blocks.1.mlp.routed.experts.1.fc1.weight" in record["not_used"]
    assert "backbone.blocks.1.mlp.fc1.weight" in record["left_at_init"]  # the dense layer the source replaced
    assert torch.equal(tensors_of(model)["backbone.blocks.1.mlp.fc1.weight"], initial["backbone.blocks.1.mlp.fc1.weight"])


# ---------------------------------------------------------------------------------------------
# What it refuses, in one line


def test_another_backbone_other_experts_or_other_shapes_are_one_line_errors_naming_the_mismatch(tmp_path):
    from mgmoe_ds.train.transfer import TransferError, load_initial_weights

    model, config, initial = target_model(3)
    # the same layers under another timm name: loads, and is refused for the name
    other, _ = exported_source(tmp_path, ["a", "b", "c"], backbone="vit_small_patch16_224")
    with pytest.raises(TransferError) as err:
        load_initial_weights(model, other, ["a", "b", "c"], config)
    assert str(err.value) == (f"--init-from {other}: model.backbone = 'vit_small_patch16_224' but this run's is "
                              f"'vit_tiny_patch16_224'")
    swapped, _ = exported_source(tmp_path, ["a", "b", "c"], seed=1, experts=TINY_MGMOE["model"]["experts"][::-1])
    with pytest.raises(TransferError, match=r"model.experts = \['pim', 'transfg', 'pmg', 'mpsa'\] but this run's "
                                            r"is \['mpsa', 'pmg', 'transfg', 'pim'\]"):
        load_initial_weights(model, swapped, ["a", "b", "c"], config)
    experts = [dict(e) for e in TINY_MGMOE["model"]["experts"]]
    experts[3] = {"name": "pim", "options": {"dim": 16}}
    narrow, _ = exported_source(tmp_path, ["a", "b", "c"], seed=2, experts=experts)
    with pytest.raises(TransferError, match=r"tensor experts\.pim\.\S+ has shape \(\d+(, \d+)*\) there but"):
        load_initial_weights(model, narrow, ["a", "b", "c"], config)
    assert all(torch.equal(v, initial[n]) for n, v in tensors_of(model).items())  # refused before any copy


@pytest.mark.parametrize("kind", ["text", "foreign_safetensors", "folder", "missing"])
def test_a_path_that_is_no_trained_model_is_a_one_line_error(tmp_path, kind):
    from safetensors.torch import save_file

    from mgmoe_ds.train.transfer import TransferError, load_initial_weights

    path = tmp_path / {"text": "notes.txt", "foreign_safetensors": "other.safetensors", "folder": "run",
                       "missing": "nothing"}[kind]
    if kind == "text":
        path.write_text("species,count\nwren,3\n")
    elif kind == "foreign_safetensors":
        save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "folder":
        path.mkdir()
    model, config, initial = target_model(3)
    with pytest.raises(TransferError) as err:
        load_initial_weights(model, path, ["a", "b", "c"], config)
    message = str(err.value)
    assert message.startswith("--init-from") and str(path) in message and "\n" not in message, message
    assert {"text": "not a readable safetensors file", "foreign_safetensors": "a file written by `mgmoe export`",
            "folder": "not a run folder", "missing": "no such run folder"}[kind] in message
    assert all(torch.equal(v, initial[n]) for n, v in tensors_of(model).items())  # nothing half-loaded


def test_a_source_whose_class_names_are_unknown_is_refused_when_the_label_spaces_differ(tmp_path):
    from mgmoe_ds.train.transfer import TransferError, load_initial_weights

    path, source = exported_source(tmp_path, ["class_0", "class_1", "class_2"])
    model, config, _ = target_model(3)
    with pytest.raises(TransferError, match="class names are unknown .* cannot be matched to this run's 3"):
        load_initial_weights(model, path, ["a", "b", "c"], config)
    load_initial_weights(model, path, ["class_0", "class_1", "class_2"], config)  # the same placeholders: all of it
    assert all(torch.equal(v, source[n]) for n, v in tensors_of(model).items())


def test_a_run_folder_records_its_class_names_and_loading_prefers_them():
    from mgmoe_ds.inference import _run_class_names

    run = {"dataset": "/nowhere/gone", "class_names": ["wren", "robin"]}
    assert _run_class_names(run, 2) == ["wren", "robin"]
    assert _run_class_names({"dataset": "/nowhere/gone"}, 2) == ["class_0", "class_1"]


# ---------------------------------------------------------------------------------------------
# Freezing, and the command line


def test_frozen_groups_train_in_no_stage_and_the_heads_router_and_fallback_still_do():
    from mgmoe_ds.config import config_from_dict
    from mgmoe_ds.curriculum import create_stage

    config = config_from_dict({"train": {"freeze": ["backbone", "experts"]}})
    stages = {s.name: create_stage(s, config, base_lr=1e-3) for s in config.curriculum.stages}
    for stage in stages.values():
        assert not {"backbone", "experts"} & set(stage.group_lr) and not stage.trains_backbone, stage.name
    assert {"expert_heads", "fallback"} <= set(stages["warmup"].group_lr)
    assert {"expert_heads", "fallback", "router"} <= set(stages["routing"].group_lr)
    assert set(stages["residual"].group_lr) == {"router", "expert_heads"}
    unfrozen = create_stage(config.curriculum.stages[0], config_from_dict({}), base_lr=1e-3)
    assert {"backbone", "experts"} <= set(unfrozen.group_lr)


def test_freeze_names_are_checked_at_load_in_one_line():
    from mgmoe_ds.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"mgmoe\.train\.freeze = \[\"backbone\", \"expert\"\]: expected a list "
                                          r"of parameter groups: backbone, backbone_top"):
        config_from_dict({"train": {"freeze": ["backbone", "expert"]}}, "ds.json")
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[2\]\.lr = \{\}: expected at least one parameter "
                                          r"group with lr > 0 outside mgmoe\.train\.freeze"):
        config_from_dict({"train": {"freeze": ["router", "expert_heads"]}}, "ds.json")


def test_the_job_turns_init_from_and_freeze_into_recorded_config_keys(tmp_path):
    from mgmoe_ds.config import load_run_config

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse_args(["--init-from", "runs/last year", "--freeze", "backbone, experts", "--set", "moe.top_k=1"])
    config, _ = load_run_config(write_tiny_config(tmp_path / "ds.json"), args.overrides)
    assert config.train.init_from == "runs/last year" and config.train.freeze == ["backbone", "experts"]
    assert config.moe.top_k == 1
    assert job.main(["--deepspeed", str(tmp_path / "ds.json"), "--freeze", "backbone,experts,router,expert_heads,"
                     "fallback"]) == 2  # warm-up left with nothing to train: refused before any process group


# ---------------------------------------------------------------------------------------------
# The README's path: last year's model, this year's registry with new species


@pytest.mark.slow
def test_a_run_starts_from_last_years_run_on_the_registry_with_new_species(tmp_path):
    from mgmoe_ds.data.registry import register_dataset
    from mgmoe_ds.inference import load_trained

    sizes = {"train": 48, "val": 12, "test": 8}
    registry = tmp_path / "shards" / "registry.json"
    register_dataset(write_small_set(tmp_path / "shards", "lastyear", sizes, 16, num_classes=4), registry)
    stages = {"stages": [{"name": "warmup", "steps": 2}, {"name": "routing", "steps": 2},
                         {"name": "residual", "steps": 2}], "num_clusters": 2}
    config = write_tiny_config(tmp_path / "ds.json", curriculum=stages)
    succeeded(launch_training(config, registry, tmp_path / "last-year"))
    last_year = json.loads((tmp_path / "last-year" / "config.json").read_text())
    assert last_year["class_names"] == [f"species_{i}" for i in range(4)]

    # this year: six species, four of them known; the registry appends the two new ones
    register_dataset(write_small_set(tmp_path / "shards", "new2", sizes, 16, num_classes=6, seed=3), registry)
    result = succeeded(launch_training(config, registry, tmp_path / "this-year",
                                       extra=("--init-from", str(tmp_path / "last-year"),
                                              "--freeze", "backbone,experts")))
    run = tmp_path / "this-year"
    record = json.loads((run / "init_from.json").read_text())
    tag = json.loads((tmp_path / "last-year" / "checkpoints" / "last_good.json").read_text())["tag"]
    assert record["source"] == str(tmp_path / "last-year") and record["checkpoint_tag"] == tag
    assert record["classes_kept"] == {"count": 4, "names": [f"species_{i}" for i in range(4)]}
    assert record["classes_new"] == {"count": 2, "names": ["species_4", "species_5"]}
    assert record["left_at_init"] == [] and "fallback.1.weight" in record["class_tensors"]
    assert f"started from {tmp_path / 'last-year'} ({tag})" in result.stdout + result.stderr
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["mgmoe"]["train"]["init_from"] == str(tmp_path / "last-year")
    assert recorded["mgmoe"]["train"]["freeze"] == ["backbone", "experts"]
    for stage_file in sorted((run / "stages").glob("*.json")):
        stage = json.loads(stage_file.read_text())
        assert not {"backbone", "experts"} & set(stage["trained_groups"]), stage_file.name
        assert stage["feature_cache"] is not None, stage_file.name  # a frozen backbone trains from cached features

    # the frozen groups are last year's weights exactly; the heads trained on
    before, _ = load_trained(tmp_path / "last-year")
    after, meta = load_trained(run)
    assert meta.class_names == [f"species_{i}" for i in range(6)]
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    matchers = after.group_matcher()
    groups = {name: next(g for g, matches in matchers.items() if matches(name)) for name in new}
    assert {"backbone", "experts", "expert_heads"} <= set(groups.values())
    for name, group in groups.items():
        if group in ("backbone", "experts"):
            assert torch.equal(new[name], old[name]), name
    class_rows = [name for name, group in groups.items() if group in ("expert_heads", "fallback")
                  and new[name].shape[:1] == (6,) and old[name].shape[:1] == (4,)]
    assert "moe.fallback_head.1.weight" in class_rows
    assert all(not torch.equal(new[name][:4], old[name]) for name in class_rows)  # started there, trained on
