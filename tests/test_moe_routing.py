"""Routing requests: what each mode resolves to, and cluster-level routing on a hand-made case."""

import pytest
import torch

from mgmoe_ds.moe.routing import ClusterRouting, RoutingRequest, nearest_centroid


def test_cluster_routing_allows_each_image_only_its_clusters_experts():
    routing = ClusterRouting(centroids=torch.tensor([[0.0, 0.0], [10.0, 0.0]]),
                             cluster_experts=torch.tensor([[0, 3], [2, 1]]))
    images = torch.tensor([[9.0, 1.0], [1.0, -1.0]])  # nearest: cluster 1, cluster 0
    assert nearest_centroid(images, routing.centroids).tolist() == [1, 0]
    assert routing.allowed(images, 4).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_requests_resolve_to_modes_masks_and_k():
    pooled = torch.zeros(3, 2)
    single = RoutingRequest.single(2).resolve(pooled, 4)
    assert single.mode == "single" and single.allowed_experts.tolist() == [False, False, True, False]
    dense = RoutingRequest.dense(uniform_weights=True).resolve(pooled, 4)
    assert (dense.mode, dense.uniform_weights, dense.allowed_experts) == ("dense", True, None)
    subset = RoutingRequest(top_k=1, allowed_experts=torch.tensor([True, False, True, False]))
    clusters = ClusterRouting(torch.zeros(1, 2), torch.tensor([[1, 2]]))
    both = subset.__class__(top_k=3, allowed_experts=subset.allowed_experts, clusters=clusters).resolve(pooled, 4)
    assert both.allowed_experts.tolist() == [[False, False, True, False]] * 3  # the subset and the cluster's pair
    assert both.max_top_k == 2  # K is at most a cluster's number of experts
    with pytest.raises(ValueError, match="single_expert = 5: expected 0..3"):
        RoutingRequest.single(5).resolve(pooled, 4)
    with pytest.raises(ValueError, match="exactly in mode 'single'"):
        RoutingRequest(mode="topk", single_expert=1)
