"""A plain homogeneous head on the pooled features, for scaling to many experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from mgmoe_ds.backbone import BackboneInfo
from mgmoe_ds.experts import register_expert
from mgmoe_ds.experts.base import AT_LEAST_ONE, RATE, Expert, ExpertOptions, ExpertOutput, Segments, stochastic_depth


@dataclass(frozen=True)
class MLPOptions(ExpertOptions):
    hidden_dim: Optional[int] = None  # hidden width; None: the pooled width
    dropout: float = 0.0  # dropout before the classifier (training only, as nn.Dropout does)
    drop_path: float = 0.0  # stochastic depth: share of images whose hidden features are dropped (training only)

    def validate(self) -> None:
        AT_LEAST_ONE.check(self, "hidden_dim")
        RATE.check(self, "dropout", "drop_path")


@register_expert("mlp")
class MLPExpert(Expert):
    """LayerNorm, Linear, GELU, (dropout,) Linear on ``"pooled"``. No auxiliary loss.

    Stochastic depth (``drop_path``): the head has no residual branch, so its one branch, the
    hidden features, is dropped whole for a random share of the images in training (their logits
    are then the classifier's bias: the expert sits that image out), the others scaled up.

    Args:
        info: the backbone's description.
        num_classes: classes to predict.
        **options: the fields of ``MLPOptions``.
    """

    required_features = frozenset({"pooled"})
    options_class = MLPOptions

    def __init__(self, *, info: BackboneInfo, num_classes: int, hidden_dim: Optional[int], dropout: float,
                 drop_path: float):
        super().__init__()
        hidden_dim = hidden_dim or info.pooled_dim
        self.norm = nn.LayerNorm(info.pooled_dim)
        self.fc = nn.Linear(info.pooled_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.drop_path = stochastic_depth(drop_path)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, payload: dict[str, Tensor], targets: Optional[Tensor],
                segments: Segments = None) -> ExpertOutput:
        x = self.drop(self.drop_path(self.act(self.fc(self.norm(payload["pooled"])))))  # (n, hidden)
        return ExpertOutput(logits=self.head(x), aux_losses={})

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())
