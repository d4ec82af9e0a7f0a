"""Backbone: per-family feature shapes, attention rollout, the cut that a feature cache sits at."""

from __future__ import annotations

import math

import pytest
import torch

from mgmoe_ds.backbone import LEVEL_KEYS, Backbone, BackboneError, attention_rollout_cls

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=4, embed_dim=64, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=64, window_size=2, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))),
    "resnet": ("resnet18", dict(img_size=64)),
    "convnext": ("convnext_atto", dict(img_size=64)),
    "efficientnet": ("tf_efficientnet_lite0", dict(img_size=64)),
}


@pytest.fixture(scope="module")
def tiny_vit() -> Backbone:
    torch.manual_seed(0)
    name, options = TINY["vit"]
    return Backbone(name, **options).eval()


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_features_match_info(family):
    name, options = TINY[family]
    backbone = Backbone(name, **options).eval()
    info = backbone.info
    out = backbone(torch.randn(2, 3, 64, 64), need=info.available)
    assert set(out) == set(info.available)
    assert out["pooled"].shape == (2, info.pooled_dim)
    assert out["tokens"].shape == (2, info.num_tokens, info.token_dim)
    assert math.prod(info.token_grid) == info.num_tokens
    for key, channels, size in zip(LEVEL_KEYS, info.level_channels, info.level_sizes):
        assert out[key].shape == (2, channels, *size)
    assert info.has_cls == (family == "vit")
    if family == "vit":
        assert info.level_indices == (0, 1, 2, 3)
        assert out["rollout"].shape == (2, info.num_heads, info.num_tokens)
        assert out["pre_last"].shape == (2, 1 + info.num_tokens, info.token_dim)
    else:
        assert info.family in ("swin", "cnn") and info.last_block is None
        assert info.level_sizes[0][0] > info.level_sizes[-1][0]  # hierarchical: last four stages


def test_only_requested_features_are_returned(tiny_vit):
    fused_before = [block.attn.fused_attn for block in tiny_vit.model.blocks]
    out = tiny_vit(torch.randn(2, 3, 64, 64), need={"pooled", "level2"})
    assert set(out) == {"pooled", "level2"}
    tiny_vit(torch.randn(1, 3, 64, 64), need={"rollout"})
    assert [block.attn.fused_attn for block in tiny_vit.model.blocks] == fused_before  # restored


def test_vit_levels_evenly_spaced_ending_at_last_block():
    backbone = Backbone("vit_tiny_patch16_224", img_size=32, depth=12, embed_dim=32, num_heads=2)
    assert backbone.info.level_indices == (2, 5, 8, 11)


def test_unavailable_feature_is_one_line_error():
    name, options = TINY["resnet"]
    with pytest.raises(BackboneError, match="rollout") as error:
        Backbone(name, **options)(torch.randn(1, 3, 64, 64), need={"rollout"})
    assert "\n" not in str(error.value)


def _naive_attention(block, x):
    """Attention probabilities recomputed from the block's own weights, (B, H, T, T)."""
    attn = block.attn
    b, t, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)


def test_rollout_equals_naive_product_of_attention_matrices(tiny_vit):
    images = torch.randn(2, 3, 64, 64)
    model = tiny_vit.model
    with torch.no_grad():
        out = tiny_vit(images, need={"rollout", "pre_last"})
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        attentions = []
        for block in model.blocks[:-1]:
            attentions.append(_naive_attention(block, x))
            x = block(x)
    product = attentions[0]
    for attn in attentions[1:]:
        product = attn @ product  # P = A_{L-2} ... A_0, full (T, T) matrices
    torch.testing.assert_close(out["rollout"], product[:, :, 0, 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pre_last"], x, rtol=1e-5, atol=1e-6)


def test_rollout_row_vector_matches_matrix_product():
    torch.manual_seed(0)
    attentions = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(4)]
    product = attentions[3] @ attentions[2] @ attentions[1] @ attentions[0]
    torch.testing.assert_close(attention_rollout_cls(attentions), product[:, :, 0, 1:])


# ---------------------------------------------------------------------------------------------
# A cut inside the backbone (cache.depth): the lower part a feature cache stores, the top above it


@pytest.fixture(scope="module")
def tiny_lite() -> Backbone:
    torch.manual_seed(0)
    return Backbone("tf_efficientnet_lite0", img_size=64).eval()


@pytest.mark.parametrize("cut_after", range(7))
def test_the_top_run_on_the_lower_parts_output_is_the_whole_backbone(tiny_lite, cut_after):
    cut = Backbone("tf_efficientnet_lite0", img_size=64, cut_after=cut_after).eval()
    cut.load_state_dict(tiny_lite.state_dict())
    images = torch.randn(2, 3, 64, 64)
    need = tiny_lite.info.available
    with torch.no_grad():
        whole = tiny_lite(images, need)
        lower = cut.forward_lower(images, need)
        rebuilt = cut.forward_upper(lower, need)
        # the activation at the cut, by timm's own blocks run by hand
        x = tiny_lite.model.bn1(tiny_lite.model.conv_stem(images))
        for block in tiny_lite.model.blocks[:cut_after + 1]:
            x = block(x)
    assert torch.equal(lower["cut"], x)
    assert rebuilt.keys() == whole.keys()
    for key in whole:
        assert torch.equal(rebuilt[key], whole[key]), key
    # levels at or above the cut are recomputed by the top, not stored: level i sits after blocks
    # 1, 2, 4, 6 (timm's stage ends), so a cut after block 3 stores level0 and level1
    stored_levels = {k for k in lower if k != "cut"}
    assert stored_levels == {k for k, block in zip(LEVEL_KEYS, (1, 2, 4, 6)) if block < cut_after}


def test_the_top_and_the_lower_part_split_the_backbones_parameters(tiny_lite):
    cut = Backbone("tf_efficientnet_lite0", img_size=64, cut_after=4)
    names = {id(p): n for n, p in cut.named_parameters()}
    top = {names[id(p)] for module in cut.top_modules() for p in module.parameters()}
    lower = {names[id(p)] for p in cut.lower_modules().parameters()}
    expected_top = {n for n in names.values() if n.startswith(("model.blocks.5.", "model.blocks.6.", "model.conv_head.",
                                                               "model.bn2."))}
    assert top == expected_top and top and not top & lower and top | lower == set(names.values())
    assert not Backbone("tf_efficientnet_lite0", img_size=64).top_modules()


@pytest.mark.parametrize("name, options, cut_after, message", [
    ("tf_efficientnet_lite0", {}, 7, "mgmoe.cache.depth = 7: 'tf_efficientnet_lite0' has blocks 0..6"),
    ("vit_tiny_patch16_224", dict(depth=4, embed_dim=64, num_heads=2), 1,
     "mgmoe.cache.depth = 1: a cut inside the backbone needs a timm EfficientNet (e.g. tf_efficientnet_lite0); "
     "'vit_tiny_patch16_224' is a VisionTransformer"),
])
def test_a_cut_the_backbone_cannot_take_is_one_line(name, options, cut_after, message):
    with pytest.raises(BackboneError) as err:
        Backbone(name, img_size=64, cut_after=cut_after, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
