
import pytest
import torch

from mgmoe_ds.config import StageConfig
from mgmoe_ds.curriculum import (
    allowed_from_clusters,
    assign_clusters,
    cluster_expert_count,
    cluster_expert_scores,
    cluster_teacher,
    kmeans,
    plan_stage,
    teacher_kl,
    top_experts_per_cluster,
)


def test_stage_plans_route_and_train_what_the_curriculum_says():
    warm = plan_stage(StageConfig("warmup", epochs=1), base_lr=1e-3)
    assert (warm.mode, warm.uniform_weights, warm.uses_teacher, warm.frozen_routing) == ("dense", True, False, False)
    assert "router" not in warm.group_lr and {"backbone", "experts", "expert_heads"} <= set(warm.group_lr)
    routing = plan_stage(StageConfig("routing", epochs=1), base_lr=1e-3)
    assert routing.mode == "topk" and routing.uses_teacher and routing.group_lr["router"] == pytest.approx(1e-3)
    residual = plan_stage(StageConfig("residual", epochs=1), base_lr=1e-3)
    assert residual.frozen_routing and set(residual.group_lr) == {"router", "expert_heads"}
    custom = plan_stage(StageConfig("residual", epochs=1, lr={"router": 0.0, "expert_heads": 5e-4}), 1e-3)
    assert custom.group_lr == {"expert_heads": 5e-4}  # lr 0 freezes
    with pytest.raises(ValueError, match="unknown parameter group 'head'"):
        plan_stage(StageConfig("residual", epochs=1, lr={"head": 1e-3}), 1e-3)


def test_teacher_and_kl_on_a_hand_made_case():
    # Two clusters, three experts. Cluster 0's validation images: expert 2 is best; cluster 1: expert 0.
    loglik = torch.tensor([
        [-2.0, -1.0, -0.1],  # cluster 0
        [-2.0, -1.0, -0.3],  # cluster 0
        [-0.2, -3.0, -1.0],  # cluster 1
    ])
    clusters = torch.tensor([0, 0, 1])
    scores, counts = cluster_expert_scores(loglik, clusters, 3)
    torch.testing.assert_close(scores[0], torch.tensor([-2.0, -1.0, -0.2]))
    torch.testing.assert_close(scores[1], torch.tensor([-0.2, -3.0, -1.0]))
    # cluster 2 has no validation image: it falls back to the mean over all images
    torch.testing.assert_close(scores[2], loglik.mean(0))
    assert counts.tolist() == [2.0, 1.0, 0.0]
    teacher = cluster_teacher(scores, temperature=0.5)
    expected0 = torch.softmax(torch.tensor([-2.0, -1.0, -0.2]) / 0.5, 0)
    torch.testing.assert_close(teacher[0], expected0)
    assert top_experts_per_cluster(teacher, 2)[:2].tolist() == [[2, 1], [0, 2]]
    # KL(teacher || router) is zero when the router equals the teacher, positive otherwise
    router = teacher[clusters]
    assert teacher_kl(router, teacher[clusters]).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_runs_from_the_teacher_to_the_router_on_a_hand_computed_case():
    # teacher (0.8, 0.2), router (0.5, 0.5):
    #   KL(teacher || router) = 0.8 ln(0.8 / 0.5) + 0.2 ln(0.2 / 0.5) = 0.376003 - 0.183258 = 0.192745
    #   KL(router || teacher) = 0.5 ln(0.5 / 0.8) + 0.5 ln(0.5 / 0.2) = -0.235002 + 0.458145 = 0.223144
    teacher = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    router = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    # the mean over the two images: (0.192745 + 0) / 2
    assert teacher_kl(router, teacher).item() == pytest.approx(0.192745 / 2, abs=1e-6)
    assert teacher_kl(teacher, router).item() == pytest.approx(0.223144 / 2, abs=1e-6)  # swapped: the other KL


def test_kmeans_finds_separated_clusters_and_reduces_sums():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(30, 2, generator=g) for c in centres])
    found = kmeans(points, 3, seed=1, initial=points[[0, 30, 60]])
    order = assign_clusters(centres, found)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(found[order], centres, atol=0.3, rtol=0)
    # A doubling all_reduce (as if two identical ranks) gives the same centroids.
    doubled = kmeans(points, 3, initial=points[[0, 30, 60]], all_reduce=lambda t: 2 * t)
    torch.testing.assert_close(doubled, found)


def test_allowed_mask_from_clusters():
    mask = allowed_from_clusters(torch.tensor([1, 0]), torch.tensor([[0, 3], [2, 1]]), 4)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_the_residual_stage_keeps_top_2_experts_per_cluster_or_top_k_above_2():
    assert [cluster_expert_count(k, 4) for k in (1, 2, 3, 4)] == [2, 2, 3, 4]
    assert cluster_expert_count(2, 1) == 1
