"""The feature cache of frozen-backbone stages: keys, reuse, storage, iteration, equal losses, the trainer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_MGMOE, write_tiny_config
from mgmoe_ds.config import config_from_dict
from mgmoe_ds.data import dataset_source, make_loader
from mgmoe_ds.data.transforms import create_transform
from mgmoe_ds.feature_cache import FeatureCache, FeatureCacheStore, cache_key, load_feature_cache, weights_digest
from mgmoe_ds.model import MGMoE

BATCH = 8


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset):
    torch.manual_seed(0)
    config = config_from_dict(TINY_MGMOE)
    model = MGMoE(config.model, config.moe, num_classes=4)
    model.backbone.requires_grad_(False)
    return model


def eval_loader(dataset, model):
    loader, info = make_loader(dataset, "train", batch_size=BATCH, img_size=32, train=False, shuffle=False,
                               transform_options=model.backbone.preprocessing())
    return loader, info.samples_per_rank[0]


def key_for(model, dataset, **changes):
    args = dict(transform=repr(create_transform(32, False, **model.backbone.preprocessing())),
                manifest=dataset_source(dataset).content_bytes(), split="train", features=model.features | {"pooled"}, rank=0,
                world_size=1,
                views=1, dtype="float16", seed=0)
    return cache_key(weights_digest(model.backbone), **dict(args, **changes))


def get_cache(store, model, dataset, key=None):
    loader, capacity = eval_loader(dataset, model)
    model.eval()
    cache, reused = store.get(key or key_for(model, dataset), views=1, capacity=capacity,
                              view_batches=lambda view: iter(loader), compute=model.forward_features)
    return cache, reused


@pytest.mark.parametrize("memory_limit_bytes", [1 << 30, 0], ids=["memory", "memmap"])
def test_a_cache_built_twice_is_reused(tiny_model, tiny_dataset, tmp_path, memory_limit_bytes):
    store = FeatureCacheStore(tmp_path, memory_limit_bytes=memory_limit_bytes)
    first, reused_first = get_cache(store, tiny_model, tiny_dataset)
    second, reused_second = get_cache(store, tiny_model, tiny_dataset)
    assert (reused_first, reused_second, store.builds) == (False, True, 1)
    assert first.storage == ("memory" if memory_limit_bytes else "memmap") and first.num_samples == 96
    assert set(first.features) == tiny_model.features | {"pooled"}
    if memory_limit_bytes == 0:  # a new process (a resumed run) finds the finished files
        fresh = FeatureCacheStore(tmp_path, memory_limit_bytes=0)
        third, reused_third = get_cache(fresh, tiny_model, tiny_dataset)
        assert reused_third and fresh.builds == 0
        assert all(np.array_equal(np.asarray(first.features[k]), np.asarray(third.features[k])) for k in first.features)


def test_an_unfinished_memmap_build_is_not_read(tiny_model, tiny_dataset, tmp_path):
    store = FeatureCacheStore(tmp_path, memory_limit_bytes=0)
    cache, _ = get_cache(store, tiny_model, tiny_dataset)
    (cache.folder / "index.json").unlink()  # as if the build was killed before its last write
    assert load_feature_cache(cache.folder) is None
    _, reused = get_cache(FeatureCacheStore(tmp_path, memory_limit_bytes=0), tiny_model, tiny_dataset)
    assert not reused


def test_the_key_changes_with_weights_transform_and_manifest(tiny_model, tiny_dataset, tmp_path):
    base = key_for(tiny_model, tiny_dataset)
    assert key_for(tiny_model, tiny_dataset) == base
    other_transform = repr(create_transform(32, False, **dict(tiny_model.backbone.preprocessing(), crop_pct=1.0)))
    assert key_for(tiny_model, tiny_dataset, transform=other_transform) != base
    changed_dataset = tmp_path / "changed"
    shutil.copytree(tiny_dataset, changed_dataset)
    manifest = json.loads((changed_dataset / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][1:]
    (changed_dataset / "manifest.json").write_text(json.dumps(manifest))
    assert key_for(tiny_model, changed_dataset) != base
    assert key_for(tiny_model, tiny_dataset, rank=1, world_size=2) != base
    assert key_for(tiny_model, tiny_dataset, split="val") != base
    weight = next(tiny_model.backbone.parameters())
    with torch.no_grad():
        weight[(0,) * weight.dim()] += 1e-3
        try:
            assert key_for(tiny_model, tiny_dataset) != base
        finally:
            weight[(0,) * weight.dim()] -= 1e-3


def test_a_stale_key_rebuilds_and_its_files_are_deleted(tiny_model, tiny_dataset, tmp_path):
    store = FeatureCacheStore(tmp_path, memory_limit_bytes=0)
    stale, _ = get_cache(store, tiny_model, tiny_dataset)
    _, reused = get_cache(store, tiny_model, tiny_dataset, key=key_for(tiny_model, tiny_dataset, seed=1, views=2))
    assert not reused and store.builds == 2
    assert not stale.folder.exists() and len(list(tmp_path.iterdir())) == 1


def test_slots_hold_several_caches_at_once(tiny_model, tiny_dataset, tmp_path):
    loader, capacity = eval_loader(tiny_dataset, tiny_model)
    store = FeatureCacheStore(tmp_path, memory_limit_bytes=0)
    train, _ = get_cache(store, tiny_model, tiny_dataset)
    val_key = key_for(tiny_model, tiny_dataset, split="val")
    val, reused = store.get(val_key, views=1, capacity=capacity, view_batches=lambda view: iter(loader),
                            compute=tiny_model.forward_features, slot="val")
    assert not reused and set(store.slots) == {"train", "val"} and train.folder.exists()
    _, reused_train = get_cache(store, tiny_model, tiny_dataset)
    _, reused_val = store.get(val_key, views=1, capacity=capacity, view_batches=lambda view: iter(()),
                              compute=tiny_model.forward_features, slot="val")
    assert reused_train and reused_val and store.builds == 2


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 5e-3)])
def test_cached_and_uncached_training_steps_give_the_same_losses(tiny_model, tiny_dataset, tmp_path, dtype,
                                                                 tolerance):
    store = FeatureCacheStore(tmp_path, dtype=dtype, memory_limit_bytes=1 << 30)
    cache, _ = get_cache(store, tiny_model, tiny_dataset)
    loader, _ = eval_loader(tiny_dataset, tiny_model)
    batch = next(iter(loader))  # rows 0..B-1 of the cache, in the loader's order
    cached = cache.gather(torch.arange(BATCH), torch.zeros(BATCH, dtype=torch.long))
    assert torch.equal(cache.labels[:BATCH], batch["labels"])
    tiny_model.train()  # experts draw their training randomness (PMG's jigsaw) from the same seed
    torch.manual_seed(5)
    uncached_out = tiny_model(batch["images"], batch["labels"])
    torch.manual_seed(5)
    cached_out = tiny_model(None, batch["labels"], features={k: v.float() for k, v in cached.items()})
    assert uncached_out.losses.keys() == cached_out.losses.keys()
    for name, value in uncached_out.losses.items():
        assert torch.allclose(value, cached_out.losses[name], rtol=tolerance, atol=tolerance), name


def test_batches_reshuffle_per_epoch_and_cover_every_sample(tmp_path):
    n, views = 20, 3
    features = {"pooled": torch.arange(views * n, dtype=torch.float32).reshape(views, n, 1)}  # value = view * n + i
    cache = FeatureCache("k", features, torch.arange(n), "float32")
    epoch0 = list(cache.batches(6, 4, seed=0, epoch=0))
    labels = torch.cat([labels for _, labels in epoch0])
    assert [len(b) for _, b in epoch0] == [6, 6, 6, 2] and sorted(labels.tolist()) == list(range(n))
    for feats, batch_labels in epoch0:  # each row is its own sample, in one of its views
        assert torch.equal(feats["pooled"][:, 0].long() % n, batch_labels)
    chosen_views = torch.cat([f["pooled"][:, 0].long() // n for f, _ in epoch0])
    assert len(set(chosen_views.tolist())) > 1
    again = torch.cat([labels for _, labels in cache.batches(6, 4, seed=0, epoch=0)])
    other = torch.cat([labels for _, labels in cache.batches(6, 4, seed=0, epoch=1)])
    assert torch.equal(again, labels) and not torch.equal(other, labels)
    resumed = torch.cat([labels for _, labels in cache.batches(6, 4, seed=0, epoch=0, start=2)])
    assert torch.equal(resumed, labels[12:])
    assert [len(b) for _, b in cache.batches(6, 2, seed=0, epoch=0)] == [6, 6]  # truncated to the ranks' minimum
    assert [len(b) for _, b in cache.batches(8, 4, seed=0, epoch=0)] == [8, 8, 8, 1]  # wraps past a skipped sample


def test_bfloat16_memmap_round_trip(tiny_model, tiny_dataset, tmp_path):
    cache, _ = get_cache(FeatureCacheStore(tmp_path, dtype="bfloat16", memory_limit_bytes=0), tiny_model,
                         tiny_dataset)
    loader, _ = eval_loader(tiny_dataset, tiny_model)
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model.forward_features(next(iter(loader))["images"])["pooled"].to(torch.bfloat16)
    got = cache.gather(torch.arange(BATCH), torch.zeros(BATCH, dtype=torch.long))["pooled"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.slow
def test_trainer_caches_frozen_stages_only_and_shares_the_cache(tiny_dataset, tmp_path):
    from test_engine import checked, run_job

    stages = [{"name": "warmup", "steps": 2}, {"name": "residual", "steps": 2}, {"name": "residual", "steps": 2}]
    config = write_tiny_config(tmp_path / "ds.json", curriculum={"stages": stages, "num_clusters": 2})
    run = tmp_path / "run"
    result = checked(run_job(["--deepspeed", str(config), "--data", str(tiny_dataset), "--output", str(run)]))
    records = [json.loads((run / "stages" / name).read_text())["feature_cache"]
               for name in ("0_warmup.json", "1_residual.json", "2_residual.json")]
    assert records[0] is None  # the warm-up trains the backbone
    assert records[1]["storage"] == "memory" and records[1]["samples"] == 96
    assert records[2]["reused"] and records[2]["key"] == records[1]["key"]
    log = result.stdout + result.stderr
    assert "training from the feature cache" in log and "expert pmg: its jigsaw" in log
    # one backbone pass over train (clustering and both residual stages) and one over val
    # (validation and the teacher's statistics): the warm-up trained the backbone, so its
    # validation read images
    assert log.count(" built in ") == 2
    assert "train passes of stage residual read the feature cache" in log
    assert "val passes of stage residual read the feature cache" in log
    assert (run / "final_metrics.json").is_file()


def test_several_views_are_stored_per_sample_and_must_read_the_same_samples(tiny_model, tiny_dataset, tmp_path):
    loader, capacity = eval_loader(tiny_dataset, tiny_model)
    tiny_model.eval()
    store = FeatureCacheStore(tmp_path, memory_limit_bytes=0)
    cache, _ = store.get(key_for(tiny_model, tiny_dataset, views=2), views=2, capacity=capacity,
                         view_batches=lambda view: iter(loader), compute=tiny_model.forward_features)
    assert cache.num_views == 2 and cache.features["pooled"].shape[:2] == (2, 96)
    shuffled, _ = make_loader(tiny_dataset, "train", batch_size=BATCH, img_size=32, train=False, shuffle=True,
                              transform_options=tiny_model.backbone.preprocessing())
    with pytest.raises(Exception, match="another order than view 0"):
        store.get(key_for(tiny_model, tiny_dataset, views=2, seed=3), views=2, capacity=capacity,
                  view_batches=lambda view: iter(loader if view == 0 else shuffled),
                  compute=tiny_model.forward_features)


def training_passes(config_path, dataset, run_dir):
    """The trainer's feature caches and passes for a one-rank run, without DeepSpeed."""
    from mgmoe_ds.config import load_run_config
    from mgmoe_ds.train.data import RunData
    from mgmoe_ds.train.distributed import Collectives
    from mgmoe_ds.train.passes import TrainingPasses
    from mgmoe_ds.train.stage_features import StageFeatures

    config, _ = load_run_config(config_path)
    torch.manual_seed(0)
    model = MGMoE(config.model, config.moe, num_classes=4)
    data = RunData(config, str(dataset), rank=0, world_size=1, micro_batch=BATCH, pin_memory=False,
                   transform_options=model.backbone.preprocessing())
    cpu = torch.device("cpu")
    features = StageFeatures(config, model, data, run_dir, device=cpu, input_dtype=torch.float32, is_main=False)
    return config, features, TrainingPasses(config, model, data, features, Collectives(cpu), device=cpu,
                                            input_dtype=torch.float32)


def test_validation_and_clustering_read_the_eval_cache_with_the_same_results(tiny_dataset, tmp_path, world_of_one):
    from mgmoe_ds.config import StageConfig
    from mgmoe_ds.curriculum import create_stage
    from mgmoe_ds.moe.routing import RoutingRequest

    config, features, passes = training_passes(write_tiny_config(tmp_path / "ds.json", cache={"dtype": "float32"}),
                                               tiny_dataset, tmp_path / "run")
    frozen = create_stage(StageConfig("residual", epochs=1), config, 1e-3)
    unfrozen = create_stage(StageConfig("warmup", epochs=1), config, 1e-3)
    routing = RoutingRequest.dense()
    from_images = passes.evaluate("val", routing, unfrozen)
    assert features._store is None  # a stage that trains the backbone reads images
    from_cache = passes.evaluate("val", routing, frozen)
    assert features._store.builds == 1 and set(features._eval_caches) == {"val"}
    assert from_cache["images"] == from_images["images"] > 0 and from_cache["top1"] == from_images["top1"]
    assert abs(from_cache["loss"] - from_images["loss"]) < 1e-4
    assert torch.allclose(passes.pooled_features(frozen), passes.pooled_features(None), atol=1e-5)
    assert features._store.builds == 2


def test_clusters_refined_by_neighbours_account_for_every_training_image_and_its_label(tiny_dataset, tmp_path,
                                                                                      world_of_one):
    from mgmoe_ds.config import StageConfig
    from mgmoe_ds.curriculum import create_stage

    config, _, passes = training_passes(write_tiny_config(
        tmp_path / "ds.json", curriculum={"clustering": "kmeans+knn", "knn_neighbours": 5, "knn_agreement": 0.8}),
        tiny_dataset, tmp_path / "run")
    frozen = create_stage(StageConfig("residual", epochs=1), config, 1e-3)
    features, labels = passes.labelled_features(frozen)  # from the training cache
    assert labels.shape == (features.shape[0],) and torch.equal(labels, passes.labelled_features(None)[1])
    record = passes.clusters(frozen, seed=0).clustering
    images = features.shape[0]
    assert record.method == "kmeans+knn" and (record.neighbours, record.agreement) == (5, 0.8)
    assert record.kmeans_sizes.sum() == images == record.refined_sizes.sum() + record.outliers.sum()
    assert 0 < record.kmeans_overall_purity <= 1 and 0 < record.refined_overall_purity <= 1


def test_a_shared_cache_dir_is_reused_by_another_run(tiny_dataset, tmp_path, world_of_one):
    from mgmoe_ds.config import StageConfig
    from mgmoe_ds.curriculum import create_stage
    from mgmoe_ds.moe.routing import RoutingRequest

    shared = tmp_path / "shared_cache"
    config_path = write_tiny_config(tmp_path / "ds.json", cache={"dir": str(shared)})
    builds = []
    for run in ("one", "two"):
        config, features, passes = training_passes(config_path, tiny_dataset, tmp_path / run)
        passes.evaluate("val", RoutingRequest.dense(), create_stage(StageConfig("residual", epochs=1), config, 1e-3))
        builds.append(features._store.builds)
        assert features._eval_caches["val"].storage == "memmap" and features._eval_caches["val"].folder.parent == shared
    assert builds == [1, 0] and not (tmp_path / "one" / "feature_cache").exists()


# ---------------------------------------------------------------------------------------------
# A cache at a depth of the backbone (cache.depth): the top above the cut trains on it

CUT_AFTER = 3


@pytest.fixture(scope="module")
def tiny_cut_model(tiny_dataset):
    """A tiny EfficientNet cut after block 3, its lower part frozen (a stage that trains ``backbone_top``)."""
    torch.manual_seed(0)
    config = config_from_dict(dict(TINY_MGMOE, model=dict(TINY_MGMOE["model"], backbone="tf_efficientnet_lite0",
                                                         backbone_options={}), cache={"depth": CUT_AFTER}))
    model = MGMoE(config.model, config.moe, num_classes=4, cut_after=CUT_AFTER)
    model.backbone.requires_grad_(False)
    for module in model.backbone.top_modules():
        module.requires_grad_(True)
    return model


def top_gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.backbone.named_parameters() if p.grad is not None}


def test_at_a_depth_cached_and_uncached_steps_give_the_same_losses_and_top_gradients(tiny_cut_model, tiny_dataset,
                                                                                     tmp_path):
    model = tiny_cut_model
    store = FeatureCacheStore(tmp_path, dtype="float32", memory_limit_bytes=1 << 30)
    loader, capacity = eval_loader(tiny_dataset, model)
    model.eval()  # the cache holds the frozen lower part's inference outputs
    cache, _ = store.get(key_for(model, tiny_dataset, features=model.cached_feature_names, depth=CUT_AFTER), views=1,
                         capacity=capacity, view_batches=lambda view: iter(loader), compute=model.cache_features)
    assert set(cache.features) == {"cut", "level0", "level1"}  # levels 2 and 3 lie above a cut after block 3
    assert cache.features["cut"].shape[2:] == (80, 2, 2)  # block 3 of Lite0: 80 channels, stride 16 at 32 px
    batch = next(iter(loader))
    cached = cache.gather(torch.arange(BATCH), torch.zeros(BATCH, dtype=torch.long))
    model.train()
    model.backbone.eval()  # frozen BatchNorm statistics, as the trainer runs a stage that trains only the top
    runs = {}
    for name, inputs in (("images", dict(images=batch["images"])), ("cache", dict(images=None, features=cached))):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the experts' training randomness (PMG's jigsaw) drawn alike
        out = model(targets=batch["labels"], **inputs)
        out.losses["task"].backward()
        runs[name] = (out.losses, top_gradients(model))
    (losses, grads), (cached_losses, cached_grads) = runs["images"], runs["cache"]
    assert losses.keys() == cached_losses.keys()
    for name, value in losses.items():
        assert torch.allclose(value, cached_losses[name], rtol=1e-5, atol=1e-6), name
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    top = {names[id(p)] for module in model.backbone.top_modules() for p in module.parameters()}
    assert grads.keys() == cached_grads.keys() == top  # only the top gets gradients, every tensor of it
    for name, grad in grads.items():
        assert torch.allclose(grad, cached_grads[name], rtol=1e-4, atol=1e-7), name


def test_at_a_depth_the_key_follows_the_lower_parts_weights_only(tiny_cut_model):
    backbone = tiny_cut_model.backbone
    before = weights_digest(backbone.lower_modules())
    top_weight = next(backbone.top_modules()[0].parameters())
    lower_weight = next(backbone.lower_modules().parameters())
    with torch.no_grad():
        top_weight.add_(1.0)  # the top trained: the lower part's output, and so the cache, is unchanged
        assert weights_digest(backbone.lower_modules()) == before
        lower_weight.add_(1.0)
        assert weights_digest(backbone.lower_modules()) != before
        top_weight.sub_(1.0)
        lower_weight.sub_(1.0)


@pytest.mark.parametrize("memory_limit_bytes", [1 << 30, 0], ids=["memory", "memmap"])
def test_the_cache_keeps_each_rows_sample_key_and_cached_batches_carry_keys_and_views(
        tiny_model, tiny_dataset, tmp_path, memory_limit_bytes):
    from types import SimpleNamespace

    from mgmoe_ds.train.stage_features import StageFeatures

    cache, _ = get_cache(FeatureCacheStore(tmp_path, memory_limit_bytes=memory_limit_bytes), tiny_model, tiny_dataset)
    loader, _ = eval_loader(tiny_dataset, tiny_model)
    rows = [(key, int(label)) for batch in loader for key, label in zip(batch["keys"], batch["labels"])]
    assert cache.keys == [key for key, _ in rows]  # the loader's order, which is the rows' order
    if memory_limit_bytes == 0:  # read back from its folder: the same keys
        assert load_feature_cache(cache.folder).keys == cache.keys
    label_of = dict(rows)
    config = config_from_dict(TINY_MGMOE)
    features = StageFeatures(config, tiny_model, SimpleNamespace(micro_batch=BATCH), tmp_path, device=torch.device("cpu"),
                             input_dtype=torch.float32, is_main=False)
    batches = list(features.cached_batches(cache, epoch=3, num_batches=4))
    seen = [key for batch in batches for key in batch["keys"]]
    assert len(seen) == 32 and len(set(seen)) == 32
    for batch in batches:
        assert batch["labels"].tolist() == [label_of[key] for key in batch["keys"]]
        assert batch["views"].tolist() == [0] * len(batch["keys"])
