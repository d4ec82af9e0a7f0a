"""What a routed layer is asked to do: one request type for training, evaluation and inference.

A :class:`RoutingRequest` says how images choose experts: Top-K among the allowed ones, every
allowed expert (dense), or one expert alone; optionally with equal combine weights (warm-up)
and with a per-image set of allowed experts derived from cluster-level routing
(:class:`ClusterRouting`). The curriculum's stages, ``mgmoe eval``/``ablate`` and exported
models all build these; the layer resolves one against its router input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

RoutingMode = Literal["topk", "dense", "single"]


def nearest_centroid(features: Tensor, centroids: Tensor) -> Tensor:
    """(N, D), (C, D) -> (N,) index of the nearest centroid (Euclidean)."""
    distances = torch.cdist(features.float(), centroids.float().to(features.device))  # (N, C)
    return distances.argmin(dim=1)


@dataclass(frozen=True)
class ClusterRouting:
    """Cluster-level frozen routing: an image may use only the experts of its nearest cluster.

    Attributes:
        centroids: (C, D) cluster centroids of the router input (pooled backbone features).
        cluster_experts: (C, k) each cluster's allowed experts, best first.
    """

    centroids: Tensor
    cluster_experts: Tensor

    @property
    def experts_per_cluster(self) -> int:
        return int(self.cluster_experts.shape[1])

    def allowed(self, router_input: Tensor, num_experts: int) -> Tensor:
        """(B, D) router input -> (B, E) bool mask of each image's allowed experts."""
        clusters = nearest_centroid(router_input, self.centroids)  # (B,)
        mask = torch.zeros(clusters.shape[0], num_experts, dtype=torch.bool, device=router_input.device)  # (B, E)
        return mask.scatter_(1, self.cluster_experts.to(router_input.device)[clusters], True)

    def to_json(self) -> dict[str, Any]:
        return {"num_clusters": int(self.centroids.shape[0]), "cluster_experts": self.cluster_experts.tolist()}


@dataclass(frozen=True)
class ResolvedRouting:
    """A request resolved for one batch: what the layer's router needs."""

    mode: RoutingMode
    top_k: Optional[int]  # None: the layer's configured K
    allowed_experts: Optional[Tensor]  # (E,) or (B, E) bool, or None for all
    uniform_weights: bool
    max_top_k: Optional[int] = None  # K is at most this (a cluster's number of experts)
    dropless: bool = False  # no capacity limit


@dataclass(frozen=True)
class RoutingRequest:
    """How a routed layer should route a batch.

    Attributes:
        mode: "topk" (K of the allowed experts), "dense" (every allowed expert, no capacity
            limit) or "single" (``single_expert`` alone).
        top_k: K in "topk" mode; None: the layer's configured K.
        uniform_weights: combine the chosen experts with equal weights (warm-up).
        single_expert: the global expert id in "single" mode.
        allowed_experts: an optional (E,) bool mask of the experts any image may use.
        clusters: optional cluster-level routing (per-image allowed experts); K is then at most
            the cluster's number of experts.
        dropless: no capacity limit (every choice keeps its expert), as evaluation and inference
            route; a layer configured dropless is dropless whatever the request.
    """

    mode: RoutingMode = "topk"
    top_k: Optional[int] = None
    uniform_weights: bool = False
    single_expert: Optional[int] = None
    allowed_experts: Optional[Tensor] = None
    clusters: Optional[ClusterRouting] = None
    dropless: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("topk", "dense", "single"):
            raise ValueError(f"routing mode = {self.mode!r}: expected 'topk', 'dense' or 'single'")
        if (self.mode == "single") != (self.single_expert is not None):
            raise ValueError("routing: single_expert is given exactly in mode 'single'")

    @classmethod
    def dense(cls, uniform_weights: bool = False) -> "RoutingRequest":
        return cls(mode="dense", uniform_weights=uniform_weights)

    @classmethod
    def single(cls, expert: int) -> "RoutingRequest":
        return cls(mode="single", single_expert=expert)

    def with_top_k(self, top_k: Optional[int]) -> "RoutingRequest":
        return replace(self, top_k=top_k)

    def without_drops(self) -> "RoutingRequest":
        """The same routing with no capacity limit (how evaluation and inference route)."""
        return replace(self, dropless=True)

    def resolve(self, router_input: Tensor, num_experts: int) -> ResolvedRouting:
        """The request for a batch with router input (B, D)."""
        if self.mode == "single":
            if not 0 <= self.single_expert < num_experts:
                raise ValueError(f"single_expert = {self.single_expert}: expected 0..{num_experts - 1}")
            only = torch.zeros(num_experts, dtype=torch.bool, device=router_input.device)
            only[self.single_expert] = True
            return ResolvedRouting("single", None, only, False, dropless=True)
        if self.clusters is None:
            return ResolvedRouting(self.mode, self.top_k, self.allowed_experts, self.uniform_weights,
                                   dropless=self.dropless)
        allowed = self.clusters.allowed(router_input, num_experts)  # (B, E)
        if self.allowed_experts is not None:
            allowed = allowed & self.allowed_experts.to(allowed.device)
        return ResolvedRouting(self.mode, self.top_k, allowed, self.uniform_weights, self.clusters.experts_per_cluster,
                               self.dropless)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"mode": self.mode, "top_k": self.top_k, "kind": "cluster" if self.clusters else
                                  self.mode}
        if self.uniform_weights:
            record["uniform_weights"] = True
        if self.dropless:
            record["dropless"] = True
        if self.single_expert is not None:
            record["single_expert"] = self.single_expert
        if self.allowed_experts is not None:
            record["allowed_experts"] = torch.nonzero(self.allowed_experts).flatten().tolist()
        if self.clusters is not None:
            record.update(self.clusters.to_json())
        return record


# The head layer's request, or requests by layer name (the head's is ``model.HEAD_LAYER``; a backbone
# MoE layer's is its block's path, "blocks.5.1"); a layer with no request routes Top-K as configured.
Routing = Union[RoutingRequest, dict[str, RoutingRequest], None]


def request_for_layer(routing: Routing, layer: str) -> Optional[RoutingRequest]:
    """The request for the layer named ``layer``: its own by name, or the one request for every layer."""
    return routing.get(layer) if isinstance(routing, dict) else routing


def requests_by_name(routing: Routing) -> dict[str, RoutingRequest]:
    """The requests for the backbone's layers: only those given by name."""
    return routing if isinstance(routing, dict) else {}
