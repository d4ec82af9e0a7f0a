"""The box task: a tower that regresses where the bird is from the shared backbone's tokens.

Multi-task training of a box beside the classes (complete-IoU for the box, cross-entropy for the
class) gives the shared features a localisation signal; field pipelines also want the box, to
crop, count and review by it. The tower is not routed: it reads the shared backbone's final
tokens, so every image gets a box whichever experts it is routed to (and whether or not capacity
dropped it), it needs no second expert-parallel exchange, and the localisation gradient reaches
what every expert shares, the backbone. No ``torch.distributed`` here.

Boxes are ``(x1, y1, x2, y2)`` normalised to [0, 1] of the model's input image, as the data
pipeline delivers them (``batch["boxes"]``, with ``batch["has_box"]`` masking images without one).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area, complete_box_iou_loss

BOX_FEATURE = "tokens"  # the backbone feature the tower reads: (B, N, C) final tokens on their (H, W) grid


class BoxTower(nn.Module):
    """Final tokens -> one box per image.

    A token-wise projection keeps every token's position; the projected map is average-pooled to
    a fixed ``grid`` x ``grid`` layout (resolution-independent), flattened, and an MLP regresses
    the box centre and size (sigmoid: inside the image), returned as corners.

    Args:
        token_dim: C of the backbone's tokens.
        token_grid: (H, W) of the token map, H * W == N.
        channels: channels of the projected map.
        grid: side of the pooled layout the MLP reads.
        hidden: width of the MLP.
    """

    def __init__(self, token_dim: int, token_grid: tuple[int, int], *, channels: int = 64, grid: int = 7,
                 hidden: int = 256) -> None:
        super().__init__()
        self.token_grid = tuple(token_grid)
        self.grid = grid
        self.project = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, channels), nn.GELU())
        self.regress = nn.Sequential(nn.Linear(channels * grid * grid, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, 4) boxes ``(x1, y1, x2, y2)`` in [0, 1]."""
        batch, num_tokens, _ = tokens.shape
        height, width = self.token_grid
        if num_tokens != height * width:
            raise ValueError(f"BoxTower: {num_tokens} tokens, but the grid is {height} x {width}")
        projected = self.project(tokens)  # (B, N, c)
        feature_map = projected.transpose(1, 2).reshape(batch, -1, height, width)  # (B, c, H, W)
        pooled = F.adaptive_avg_pool2d(feature_map, self.grid).flatten(1)  # (B, c * g * g)
        centre_size = torch.sigmoid(self.regress(pooled).float())  # (B, 4): cx, cy, w, h in [0, 1]
        return centre_size_to_corners(centre_size)


def centre_size_to_corners(centre_size: Tensor) -> Tensor:
    """(..., 4) ``(cx, cy, w, h)`` -> (..., 4) ``(x1, y1, x2, y2)``, clipped to [0, 1]."""
    centre, size = centre_size[..., :2], centre_size[..., 2:]  # (..., 2) each
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1).clamp(0.0, 1.0)  # (..., 4)


def box_loss_sum(predicted: Tensor, boxes: Tensor, has_box: Tensor) -> Tensor:
    """Sum over the images with a box of the complete-IoU loss (fp32); images without one add 0.

    Args:
        predicted: (B, 4) the tower's boxes.
        boxes: (B, 4) the true boxes (any values where ``has_box`` is False).
        has_box: (B,) bool.
    """
    mask = has_box.to(predicted.device, torch.bool)  # (B,)
    whole_image = predicted.new_tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float32)  # (4,)
    # (B, 4): a box-less row gets a valid stand-in target, so its (masked) loss is finite
    target = torch.where(mask[:, None], boxes.to(predicted.device, torch.float32), whole_image)
    per_image = complete_box_iou_loss(predicted.float(), target, reduction="none")  # (B,)
    return (per_image * mask.float()).sum()


def box_loss(predicted: Tensor, boxes: Tensor, has_box: Tensor, normaliser: Optional[float | Tensor] = None) -> Tensor:
    """The box task's loss: ``box_loss_sum / normaliser``.

    ``normaliser`` defaults to this batch's number of boxes (at least 1): the mean over them. In
    data-parallel training the trainer passes the mean count per rank over all ranks instead, so
    that the ranks' averaged gradients are those of the mean over every box of the global batch,
    however the boxes are spread over ranks.
    """
    if normaliser is None:
        normaliser = has_box.sum().clamp_min(1)
    return box_loss_sum(predicted, boxes, has_box) / normaliser


@torch.no_grad()
def box_iou_per_image(predicted: Tensor, boxes: Tensor) -> Tensor:
    """(B,) IoU of each predicted box with its true box (both (B, 4) corners)."""
    predicted, boxes = predicted.float(), boxes.float().to(predicted.device)
    corners_min = torch.maximum(predicted[:, :2], boxes[:, :2])  # (B, 2)
    corners_max = torch.minimum(predicted[:, 2:], boxes[:, 2:])  # (B, 2)
    intersection = (corners_max - corners_min).clamp(min=0).prod(dim=1)  # (B,)
    union = box_area(predicted) + box_area(boxes) - intersection  # (B,)
    return intersection / union.clamp_min(1e-12)


@torch.no_grad()
def box_statistics(predicted: Tensor, boxes: Tensor, has_box: Tensor) -> Tensor:
    """(3,) float64 over the images with a box: their number, their IoU sum, how many have IoU >= 0.5."""
    mask = has_box.to(predicted.device, torch.bool)  # (B,)
    iou = box_iou_per_image(predicted[mask], boxes.to(predicted.device)[mask]).double()  # (b,)
    return torch.stack([mask.sum().double(), iou.sum(), (iou >= 0.5).sum().double()]).cpu()
