"""Experts: the contract, parametrised over the registry, on a tiny ViT and a tiny CNN backbone."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from mgmoe_ds.backbone import Backbone
from mgmoe_ds.experts import ExpertError, create_expert, expert_class, list_experts, register_expert, transfg
from mgmoe_ds.experts.base import Expert, ExpertOutput
from mgmoe_ds.experts.pim import select_tokens
from mgmoe_ds.experts.pmg import effective_granularity, feature_jigsaw
from mgmoe_ds.experts.transfg import contrastive_loss, select_parts

NUM_CLASSES = 5
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=4, embed_dim=64, num_heads=2)),
    "cnn": ("resnet18", dict(img_size=32)),  # 32 px: the deepest map is 1x1
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=64, window_size=2, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))),
}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request) -> Backbone:
    torch.manual_seed(0)
    name, options = BACKBONES[request.param]
    return Backbone(name, **options).eval()


def _payload(backbone: Backbone, expert: Expert, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    size = backbone.info.img_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone(images, need=expert.required_features)


def test_registry_lists_every_expert():
    assert {"mlp", "mpsa", "pim", "pmg", "transfg"} <= set(list_experts())


def test_duplicate_registration_raises():
    with pytest.raises(ExpertError, match="already registered"):
        register_expert("mlp")(type("Another", (Expert,), {}))


def test_unknown_option_is_one_line_error_naming_expert_and_option(backbone):
    with pytest.raises(ExpertError, match=r"^expert 'pim': unknown key depth; accepted keys: combiner_weight, ") as error:
        create_expert("pim", info=backbone.info, num_classes=NUM_CLASSES, depth=3)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, options, message", [
    ("pmg", dict(granularities="4,2,1"), "expert 'pmg': granularities = '4,2,1': expected list of 3 integers"),
    ("pmg", dict(granularities=(4, 2)), "expert 'pmg': granularities = [4, 2]: expected list of 3 integers"),
    ("pim", dict(select_ratio=1.5), "expert 'pim': select_ratio = 1.5: expected a number in (0, 1]"),
    ("pim", dict(num_selects=(3, 2, -1, 1)), "expert 'pim': num_selects[2] = -1: expected an integer >= 1"),
    ("mlp", dict(dropout=None), "expert 'mlp': dropout = null: expected number"),
    ("transfg", dict(num_queries=2.0), "expert 'transfg': num_queries = 2.0: expected integer"),
    ("mpsa", dict(se_reduction=0), "expert 'mpsa': se_reduction = 0: expected an integer >= 1"),
])
def test_create_expert_refuses_wrong_types_and_ranges_in_one_line(name, options, message):
    # the checks run before the expert is built, so no backbone is needed
    with pytest.raises(ExpertError) as error:
        create_expert(name, info=None, num_classes=NUM_CLASSES, **options)
    assert str(error.value) == message


@pytest.mark.parametrize("name", list_experts())
def test_every_expert_has_frozen_typed_options_whose_defaults_build_it(backbone, name):
    from mgmoe_ds.config import options_from_dict
    from mgmoe_ds.experts.base import ExpertOptions

    cls = expert_class(name)
    options_class = cls.options_class
    assert options_class is not ExpertOptions and issubclass(options_class, ExpertOptions), name
    assert options_class.__module__ == cls.__module__  # in the expert's own file
    defaults = options_class()
    fields = [f.name for f in dataclasses.fields(options_class)]
    # every keyword of the expert's __init__ after info and num_classes is an option, and nothing else
    assert fields == [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "info", "num_classes")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(defaults, fields[0], getattr(defaults, fields[0]))
    # the defaults survive a trip through JSON (a run folder, an export) and build the expert
    as_json = json.loads(json.dumps(dataclasses.asdict(defaults)))
    assert options_from_dict(options_class, as_json, "run.json") == defaults
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES, **as_json)
    assert isinstance(expert, cls)


def test_caller_options_win_over_defaults(backbone):
    expert = create_expert("mlp", info=backbone.info, num_classes=NUM_CLASSES, hidden_dim=7)
    assert expert.fc.out_features == 7


@pytest.mark.parametrize("name", list_experts())
def test_train_forward_backward(backbone, name):
    torch.manual_seed(0)
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES).train()
    assert expert.required_features <= backbone.info.available
    assert expert_class(name).features_for(backbone.info) == expert.required_features
    targets = torch.tensor([0, 1, 1, 3])
    out = expert(_payload(backbone, expert, 4), targets)
    assert isinstance(out, ExpertOutput)
    assert out.logits.shape == (4, NUM_CLASSES)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    assert all(k.startswith(f"{name}.") for k in out.aux_losses)
    loss = F.cross_entropy(out.logits, targets) + sum(out.aux_losses.values())
    loss.backward()
    trainable = [(n, p) for n, p in expert.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert sum(p.grad.abs().sum() for _, p in trainable) > 0
    heads = expert.head_parameters()
    assert heads and {id(p) for p in heads} <= {id(p) for p in expert.parameters()}


@pytest.mark.parametrize("name", list_experts())
def test_single_image_training(backbone, name):
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES).train()
    out = expert(_payload(backbone, expert, 1), torch.tensor([2]))
    assert out.logits.shape == (1, NUM_CLASSES)
    loss = out.logits.sum() + sum(out.aux_losses.values())
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", list_experts())
def test_eval_is_deterministic_and_has_no_aux_without_targets(backbone, name):
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES).eval()
    payload = _payload(backbone, expert, 3)
    with torch.no_grad():
        first, second = expert(payload, None), expert(payload, None)
        with_targets = expert(payload, torch.tensor([0, 1, 2]))
    assert first.aux_losses == {}
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)
    torch.testing.assert_close(first.logits, with_targets.logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", list_experts())
def test_experts_are_row_independent_in_eval(backbone, name):
    # The engine regroups images per expert: an image's logits must not depend on its batch mates.
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES).eval()
    payload = _payload(backbone, expert, 3)
    with torch.no_grad():
        together = expert(payload, None).logits
        alone = expert({k: v[1:2] for k, v in payload.items()}, None).logits
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_experts())
def test_own_losses_over_segments_are_the_sum_of_each_sources_losses(backbone, name):
    # Under expert parallelism an expert's rows come from several ranks; each own loss must be
    # what data parallelism computes: every source's rows alone, then summed (experts.base).
    expert = create_expert(name, info=backbone.info, num_classes=NUM_CLASSES).eval()  # eval: no random draws
    payload = _payload(backbone, expert, 7, seed=3)
    targets = torch.tensor([0, 1, 1, 3, 0, 0, 2])
    segments = [3, 0, 4]  # three source ranks, the middle one sent nothing
    with torch.no_grad():
        together = expert(payload, targets, segments=segments).aux_losses
        first = expert({k: v[:3] for k, v in payload.items()}, targets[:3]).aux_losses
        last = expert({k: v[3:] for k, v in payload.items()}, targets[3:]).aux_losses
        pooled = expert(payload, targets).aux_losses
    assert together.keys() == first.keys() == last.keys()
    for key in together:
        torch.testing.assert_close(together[key], first[key] + last[key], rtol=1e-5, atol=1e-6, msg=key)
    if name in ("pmg", "pim", "transfg"):  # their losses are means: one source's mean is not the sum
        assert any(not torch.allclose(together[k], pooled[k]) for k in together), name


def test_segment_reductions_on_a_hand_made_case():
    from mgmoe_ds.experts.base import segment_mean, segment_ratio

    values = torch.tensor([1.0, 3.0, 10.0, 4.0, 4.0, 7.0])
    # segments [2, 0, 3, 1]: means 2, (empty) 0, 6, 7 -> 15
    assert float(segment_mean(values, [2, 0, 3, 1])) == pytest.approx(15.0)
    assert float(segment_mean(values, None)) == pytest.approx(29.0 / 6)
    # ratios per segment: (1+3)/(2+0) = 2, (10+4+4)/(1+1+1) = 6, and an empty denominator counts as 1
    assert float(segment_ratio(values[:5], torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0]), [2, 3])) == pytest.approx(8.0)
    assert float(segment_ratio(torch.tensor([5.0]), torch.tensor([0.0]), [1])) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="add up to 5 rows, not 6"):
        segment_mean(values, [2, 3])


def test_contrastive_loss_runs_in_fp32_under_bf16_autocast():
    # The main job on a GPU (bf16 autocast) crashed here: CUDA's autocast returns the row sums in
    # fp32 while the per-segment buffer was bf16. The loss is now computed in fp32 throughout.
    features = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]).bfloat16()  # exact in bf16
    targets = torch.tensor([0, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(features, targets, 0.4, [2, 1])
    assert loss.dtype == torch.float32
    # one segment of two same-class rows: 1 - cos(45 degrees), counted for both orders, over 2 pairs
    assert float(loss) == pytest.approx(1.0 - 0.5 ** 0.5, abs=1e-6)


def test_contrastive_loss_pairs_rows_only_within_a_source():
    # Rows 0, 1 from one rank, row 2 from another. Unit features: cos(0, 1) = 0, row 2 alone.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    same_class = torch.tensor([4, 4, 4])
    # within the first source: one pair (counted both ways), same class, 1 - cos = 1; the lone row adds 0
    assert float(contrastive_loss(features, same_class, 0.4, [2, 1])) == pytest.approx(1.0)
    # one source of three rows: pairs (0,1)=1, (0,2)=0, (1,2)=1, each both ways -> mean 4 / 6
    assert float(contrastive_loss(features, same_class, 0.4)) == pytest.approx(4.0 / 6)


def test_experts_are_heterogeneous(backbone):
    shapes = {name: sorted(tuple(p.shape) for p in create_expert(name, info=backbone.info,
                                                                  num_classes=NUM_CLASSES).parameters())
              for name in list_experts()}
    assert len({tuple(s) for s in shapes.values()}) == len(shapes)


# --- TransFG ---------------------------------------------------------------------------------

def test_transfg_selects_argmax_rollout_tokens():
    torch.manual_seed(0)
    rollout, pre_last = torch.rand(2, 3, 6), torch.randn(2, 7, 4)
    sequence = select_parts(rollout, pre_last)
    assert sequence.shape == (2, 4, 4)
    for b in range(2):
        torch.testing.assert_close(sequence[b, 0], pre_last[b, 0])
        for h in range(3):
            torch.testing.assert_close(sequence[b, 1 + h], pre_last[b, 1 + rollout[b, h].argmax()])


def test_transfg_on_vit_uses_rollout_and_copies_last_block():
    name, options = BACKBONES["vit"]
    backbone = Backbone(name, **options)
    expert = create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES)
    assert expert.required_features == {"rollout", "pre_last"}
    for (key, copied), original in zip(expert.part_block.state_dict().items(),
                                       backbone.model.blocks[-1].state_dict().values()):
        torch.testing.assert_close(copied, original, rtol=0, atol=0)
    assert expert.part_block.attn.qkv.weight is not backbone.model.blocks[-1].attn.qkv.weight


def test_transfg_substitute_on_cnn_is_declared_and_logged(caplog):
    name, options = BACKBONES["cnn"]
    backbone = Backbone(name, **options)
    transfg._substitute_logged = False
    with caplog.at_level(logging.INFO, logger="mgmoe_ds.experts.transfg"):
        expert = create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES)
        create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES)
    assert expert.required_features == {"tokens"}
    assert sum("learned queries" in r.getMessage() for r in caplog.records) == 1
    assert "Substitute" in transfg.__doc__ and "learned queries" in expert_class("transfg").__doc__
    # the part block runs at the substitute's own width, not the backbone's (1280 on Lite0)
    narrow = create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES, dim=16)
    assert narrow.part_block.attn.qkv.in_features == 16 and narrow.queries.shape[1] == 16
    tokens = torch.randn(3, 5, backbone.info.token_dim)
    assert narrow({"tokens": tokens}, None).logits.shape == (3, NUM_CLASSES)


def test_contrastive_loss_cases():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # same-class pair (0, 1): cos 1 -> 0; pairs with class 1: cos 0 -> max(0 - 0.4, 0) = 0.
    assert contrastive_loss(features, torch.tensor([0, 0, 1]), 0.4).item() == pytest.approx(0.0)
    # all different classes, (0, 1) cos 1 -> 0.6 on 2 of 6 ordered pairs.
    assert contrastive_loss(features, torch.tensor([0, 1, 2]), 0.4).item() == pytest.approx(0.2)
    assert contrastive_loss(features[:1], torch.tensor([0]), 0.4).item() == 0.0


# --- PIM -------------------------------------------------------------------------------------

def test_pim_selector_keeps_exactly_k_tokens_vectorised():
    torch.manual_seed(0)
    features, logits = torch.randn(3, 10, 4), torch.randn(3, 10, 6)
    selected, dropped = select_tokens(features, logits, k=4)
    assert selected.shape == (3, 4, 4)
    assert (dropped.sum(dim=1) == 6).all()
    confidence = logits.softmax(-1).amax(-1)
    for b in range(3):  # the batched result equals the per-image definition
        keep = confidence[b].topk(4).indices
        torch.testing.assert_close(selected[b], features[b, keep])
        assert set((~dropped[b]).nonzero().flatten().tolist()) == set(keep.tolist())


def test_pim_keeps_k_per_level(backbone):
    expert = create_expert("pim", info=backbone.info, num_classes=NUM_CLASSES, num_selects=(3, 2, 2, 1))
    levels = expert.pyramid(_payload(backbone, expert, 2))
    assert [expert.selects_for(i, t.shape[1]) for i, t in enumerate(levels)] == [3, 2, 2, 1]
    for i, tokens in enumerate(levels):
        kept, dropped = select_tokens(tokens, expert.token_heads[i](tokens), expert.selects_for(i, tokens.shape[1]))
        assert kept.shape[1] == expert.selects_for(i, tokens.shape[1])
        assert (dropped.sum(1) == tokens.shape[1] - kept.shape[1]).all()


# --- PMG -------------------------------------------------------------------------------------

def test_feature_jigsaw_permutes_blocks():
    torch.manual_seed(1)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    shuffled = feature_jigsaw(x, 2)
    blocks = lambda t: sorted(t[0, 0].reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4).tolist())
    assert blocks(shuffled) == blocks(x)  # the same 2x2 blocks, possibly moved
    assert torch.equal(feature_jigsaw(x, 1), x)
    assert effective_granularity(4, (6, 6)) == 3 and effective_granularity(2, (1, 1)) == 1


def test_pmg_predicts_the_mean_of_its_four_heads(backbone):
    # one head's scale, as the other experts' logits: the sum of four heads ran four times hotter
    expert = create_expert("pmg", info=backbone.info, num_classes=NUM_CLASSES).eval()
    payload = _payload(backbone, expert, 3)
    with torch.no_grad():
        pooled = [block(payload[k]) for block, k in zip(expert.blocks, ("level1", "level2", "level3"))]
        heads = [head(p) for head, p in zip(expert.level_heads, pooled)] + [expert.concat_head(torch.cat(pooled, 1))]
        torch.testing.assert_close(expert(payload, None).logits, torch.stack(heads).mean(0))
