"""Stochastic depth: each expert's ``drop_path`` option and the backbone's ``drop_path_rate``."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from mgmoe_ds.backbone import Backbone
from mgmoe_ds.config import config_from_dict
from mgmoe_ds.experts import ExpertError, create_expert, list_experts

NUM_CLASSES = 5
VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2))
# Each expert's other random draws off (part dropout, dropout), so that only stochastic depth is left;
# PMG's jigsaw draws only with targets, and these forwards have none.
QUIET = {"mpsa": {"part_drop": 0.0, "dropout": 0.0}, "pim": {"dropout": 0.0}}


@pytest.fixture(scope="module")
def vit() -> Backbone:
    torch.manual_seed(0)
    return Backbone(VIT[0], **VIT[1]).eval()


def _payload(backbone: Backbone, expert: nn.Module, n: int) -> dict[str, torch.Tensor]:
    size = backbone.info.img_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone(images, need=expert.required_features)


def _logits(expert: nn.Module, payload: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return expert(payload, None).logits


@pytest.mark.parametrize("name", list_experts())
def test_drop_path_acts_in_training_only_and_zero_draws_nothing(vit, name):
    quiet = QUIET.get(name, {})
    plain = create_expert(name, info=vit.info, num_classes=NUM_CLASSES, **quiet)
    dropping = create_expert(name, info=vit.info, num_classes=NUM_CLASSES, drop_path=0.5, **quiet)
    with torch.no_grad():  # off the zero-initialised heads (MPSA's), so that a dropped branch shows in the logits
        for parameter in plain.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    dropping.load_state_dict(plain.state_dict())  # the same weights (stochastic depth has none)
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    assert any(isinstance(m, DropPath) and m.drop_prob == 0.5 for m in dropping.modules())
    payload = _payload(vit, plain, 8)

    reference = _logits(plain.eval(), payload, seed=0)
    torch.testing.assert_close(_logits(dropping.eval(), payload, seed=1), reference, rtol=0, atol=0)
    plain.train()
    dropping.train()
    # at rate 0 training computes what evaluation does, whatever the seed: no stochastic depth
    torch.testing.assert_close(_logits(plain, payload, seed=1), reference)
    torch.testing.assert_close(_logits(plain, payload, seed=2), reference)
    dropped = _logits(dropping, payload, seed=1)
    assert torch.equal(dropped, _logits(dropping, payload, seed=1))  # reproducible from the seed
    assert not torch.allclose(dropped, reference)
    assert not torch.allclose(dropped, _logits(dropping, payload, seed=2))


@pytest.mark.parametrize("name", list_experts())
def test_drop_path_trains_a_single_image(vit, name):
    expert = create_expert(name, info=vit.info, num_classes=NUM_CLASSES, drop_path=0.5).train()
    targets = torch.tensor([1])
    for seed in range(3):  # dropped or not
        torch.manual_seed(seed)
        out = expert(_payload(vit, expert, 1), targets)
        loss = nn.functional.cross_entropy(out.logits, targets) + sum(out.aux_losses.values())
        assert torch.isfinite(loss)
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in expert.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_experts())
def test_drop_path_rate_is_range_checked(name):
    with pytest.raises(ExpertError) as error:
        create_expert(name, info=None, num_classes=NUM_CLASSES, drop_path=1.0)
    assert str(error.value) == f"expert {name!r}: drop_path = 1.0: expected a number in [0, 1)"


def test_mlp_drops_whole_images(vit):
    # no residual branch: a dropped image's hidden features are zero, so its logits are the bias
    expert = create_expert("mlp", info=vit.info, num_classes=NUM_CLASSES, drop_path=0.5).train()
    logits = _logits(expert, _payload(vit, expert, 16), seed=0)
    sat_out = (logits == expert.head.bias.detach()).all(dim=1)  # (16,)
    assert 0 < int(sat_out.sum()) < 16


def test_transfg_part_block_takes_the_experts_rate_not_the_backbones():
    backbone = Backbone(VIT[0], **VIT[1], drop_path_rate=0.2)
    assert backbone.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    default = create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES)
    assert isinstance(default.part_block.drop_path1, nn.Identity) and isinstance(default.part_block.drop_path2,
                                                                                 nn.Identity)
    own = create_expert("transfg", info=backbone.info, num_classes=NUM_CLASSES, drop_path=0.1)
    assert own.part_block.drop_path1.drop_prob == own.part_block.drop_path2.drop_prob == 0.1
    cnn = Backbone("resnet18", img_size=32)
    substitute = create_expert("transfg", info=cnn.info, num_classes=NUM_CLASSES, dim=16, drop_path=0.3)
    assert substitute.part_block.drop_path1.drop_prob == substitute.part_block.drop_path2.drop_prob == 0.3


def test_vit_backbone_drop_path_rate_grows_linearly_over_the_blocks():
    config = config_from_dict({"model": {"backbone": VIT[0], "backbone_options": {"drop_path_rate": 0.1}}})
    assert config.model.backbone_options == {"drop_path_rate": 0.1}
    torch.manual_seed(0)
    backbone = Backbone(VIT[0], **VIT[1], **config.model.backbone_options)
    blocks = backbone.model.blocks
    assert isinstance(blocks[0].drop_path1, nn.Identity)  # timm's rule: 0 at the first block ...
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in blocks[1:]]
    assert [r for pair in rates for r in pair] == pytest.approx([0.1 / 3] * 2 + [0.2 / 3] * 2 + [0.1] * 2)  # ... to the rate
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def pooled(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return backbone(images, need={"pooled"})["pooled"]

    backbone.eval()
    torch.testing.assert_close(pooled(1), pooled(2), rtol=0, atol=0)
    backbone.train()
    assert not torch.allclose(pooled(1), pooled(2))


def test_efficientnet_backbone_drop_path_rate_grows_with_the_block_index():
    backbone = Backbone("tf_efficientnet_lite0", img_size=64, drop_path_rate=0.2)
    blocks = [block for stage in backbone.model.blocks for block in stage]
    rates = [block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0 for block in blocks]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    assert rates == pytest.approx([0.2 * i / len(blocks) for i in range(len(blocks))])
