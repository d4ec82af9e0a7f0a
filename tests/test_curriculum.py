"""The curriculum: the stage registry, the three MG-MoE stages, clustering and the cluster teacher."""

import pytest
import torch

from mgmoe_ds.config import RunConfig, StageConfig, config_from_dict
from mgmoe_ds.curriculum import ClusterState, Stage, create_stage, list_stages, register_stage
from mgmoe_ds.curriculum.clustering import assign_clusters, kmeans
from mgmoe_ds.curriculum.residual import cluster_expert_count
from mgmoe_ds.curriculum.teacher import cluster_expert_scores, cluster_teacher, teacher_kl
from mgmoe_ds.moe.routing import RoutingRequest

RUN = RunConfig()


def clusters_with_teacher(teacher: torch.Tensor) -> ClusterState:
    """Two clusters at (0, 0) and (10, 10) whose teachers are the rows of ``teacher``."""
    c = teacher.shape[0]
    return ClusterState(centroids=torch.tensor([[0.0, 0.0], [10.0, 10.0]])[:c], teacher=teacher,
                        scores=teacher.log(), val_counts=torch.ones(c), train_counts=torch.ones(c))


def test_the_registry_holds_the_three_stages_and_refuses_a_second_of_a_name():
    assert {"warmup", "routing", "residual"} <= set(list_stages())
    with pytest.raises(ValueError, match="curriculum stage 'warmup' is already registered by WarmupStage"):
        register_stage("warmup")(type("Again", (Stage,), {}))


def test_each_stage_trains_routes_and_weighs_losses_as_the_curriculum_says():
    warm = create_stage(StageConfig("warmup", epochs=1), RUN, base_lr=1e-3)
    assert warm.routing(None) == RoutingRequest.dense(uniform_weights=True)
    assert "router" not in warm.group_lr and {"backbone", "experts", "expert_heads"} <= set(warm.group_lr)
    assert warm.loss_weights() == {"*.load_balance": 0.0, "*.z_loss": 0.0}  # the frozen router's losses off
    routing = create_stage(StageConfig("routing", epochs=1), RUN, base_lr=1e-3)
    assert routing.group_lr["router"] == pytest.approx(1e-3) and routing.group_lr["backbone"] == pytest.approx(1e-4)
    assert routing.routing(None) == RoutingRequest() and routing.loss_weights() == {"kl": RUN.curriculum.kl_weight}
    residual = create_stage(StageConfig("residual", epochs=1), RUN, base_lr=1e-3)
    assert set(residual.group_lr) == {"router", "expert_heads"} and not residual.trains_backbone
    assert residual.group_options("expert_heads") == {"weight_decay": 0.0}
    custom = create_stage(StageConfig("residual", epochs=1, lr={"router": 0.0, "expert_heads": 5e-4},
                                      loss_weights={"kl": 3.0}), RUN, 1e-3)
    assert custom.group_lr == {"expert_heads": 5e-4}  # lr 0 freezes a group
    assert custom.loss_weights() == {"kl": 3.0}  # the user's weights come last


def test_routing_stage_adds_kl_to_each_images_cluster_teacher():
    stage = create_stage(StageConfig("routing", epochs=1), RUN, 1e-3)
    teacher = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    pooled = torch.tensor([[0.5, 0.0], [9.0, 9.5]])  # nearest clusters 0 and 1

    class Out:
        route = type("Route", (), {"probs": torch.tensor([[0.5, 0.5], [0.5, 0.5]])})
    Out.pooled = pooled
    kl = stage.extra_losses(Out, clusters_with_teacher(teacher))["kl"]
    expected = (teacher * (teacher / 0.5).log()).sum(1).mean()  # KL(teacher || uniform), cluster by cluster
    assert float(kl) == pytest.approx(float(expected), rel=1e-5)
    assert stage.extra_losses(Out, None) == {}  # no clusters yet: no KL


def test_residual_stage_routes_each_cluster_to_its_top_experts_and_freezes_the_other_heads():
    run = config_from_dict({"moe": {"top_k": 2}})
    stage = create_stage(StageConfig("residual", epochs=1), run, 1e-3)
    teacher = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.25, 0.05]])
    clusters = clusters_with_teacher(teacher)
    request = stage.routing(clusters)
    assert request.clusters.cluster_experts.tolist() == [[0, 1], [1, 2]]
    assert request.dropless  # frozen routing trains as evaluation routes it: no capacity drops
    resolved = request.resolve(torch.tensor([[1.0, 1.0], [11.0, 9.0]]), num_experts=4)
    assert resolved.allowed_experts.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert stage.frozen_heads(clusters, 4) == {3}  # expert 3 is in no cluster's top 2
    assert stage.inference_routing(clusters).to_json() == request.to_json()  # evaluated as trained
    assert stage.to_json(clusters)["unfrozen_heads"] == [0, 1, 2]


class _Hooks:
    def __init__(self):
        self.clusters, self.recomputed = None, 0

    def recompute_clusters(self):
        self.recomputed += 1


def test_stage_hooks_recompute_clusters_when_the_stage_needs_them():
    hooks = _Hooks()
    create_stage(StageConfig("routing", epochs=1), RUN, 1e-3).on_epoch_start(hooks)  # every epoch
    create_stage(StageConfig("warmup", epochs=1), RUN, 1e-3).on_epoch_start(hooks)  # never
    residual = create_stage(StageConfig("residual", epochs=1), RUN, 1e-3)
    residual.on_stage_start(hooks)  # no clusters yet: computed
    hooks.clusters = object()
    residual.on_stage_start(hooks)  # clusters from stage 1: computed again, on the backbone stage 2 freezes
    assert hooks.recomputed == 3


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
    assert clusters_with_teacher(teacher[:2]).top_experts(2).tolist() == [[2, 1], [0, 2]]
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


def test_cluster_state_round_trips_through_its_state_dict():
    state = clusters_with_teacher(torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    again = ClusterState.from_state_dict(state.state_dict())
    assert all(torch.equal(getattr(again, k), v) for k, v in state.state_dict().items())


def test_the_residual_stage_keeps_top_2_experts_per_cluster_or_top_k_above_2():
    assert [cluster_expert_count(k, 4) for k in (1, 2, 3, 4)] == [2, 2, 3, 4]
    assert cluster_expert_count(2, 1) == 1


def test_the_teacher_grades_experts_by_log_likelihood_probability_or_accuracy():
    import math

    from mgmoe_ds.curriculum.teacher import expert_scores

    # one image of class 1, two experts: expert 0 says (0.2, 0.8), expert 1 says (0.6, 0.4)
    logits = torch.tensor([[[0.0, math.log(4.0)], [math.log(1.5), 0.0]]])  # (1, 2, 2)
    labels = torch.tensor([1])
    torch.testing.assert_close(expert_scores(logits, labels, "log_likelihood"), torch.tensor([[math.log(0.8), math.log(0.4)]]))
    torch.testing.assert_close(expert_scores(logits, labels, "probability"), torch.tensor([[0.8, 0.4]]))
    torch.testing.assert_close(expert_scores(logits, labels, "accuracy"), torch.tensor([[1.0, 0.0]]))


def test_an_expert_no_cluster_puts_in_its_top_k_is_named_with_its_score_and_chance():
    import math

    teacher = torch.tensor([[0.5, 0.3, 0.15, 0.05],  # top 2: experts 0, 1
                            [0.2, 0.1, 0.6, 0.1]])  # top 2: experts 2, 0 -> expert 3 is in no top 2
    scores = torch.tensor([[-0.2, -0.5, -0.9, -2.0],
                           [-0.4, -1.0, -0.1, -2.4]])
    state = ClusterState(torch.zeros(2, 3), teacher, scores, val_counts=torch.tensor([3.0, 1.0]),
                         train_counts=torch.tensor([30.0, 10.0]))
    assert state.left_out(2) == [3] and state.left_out(3) == [] and state.left_out(1) == [1, 3]
    assert state.to_json()["left_out_of_top2"] == [3]
    line = state.left_out_warning(2, ["mpsa", "pmg", "transfg", "pim"], num_classes=12, score="log_likelihood")
    # validation-weighted mean score of pim: (3 * -2.0 + 1 * -2.4) / 4 = -2.1; chance log(1/12) = -2.48
    assert line.startswith("no cluster's teacher puts pim (validation log_likelihood -2.1, teacher weight at most "
                           "0.10) among its top 2 (chance log_likelihood -2.48)")
    assert f"{math.log(1 / 12):.3g}" == "-2.48"
    assert state.left_out_warning(3, ["mpsa", "pmg", "transfg", "pim"], 12, "log_likelihood") is None


def test_at_a_cut_the_backbones_top_trains_with_the_backbone_unless_a_stage_says_otherwise():
    cut = config_from_dict({"cache": {"depth": 4}})
    warm = create_stage(StageConfig("warmup", epochs=1), cut, base_lr=1e-3)
    assert warm.group_lr["backbone_top"] == warm.group_lr["backbone"] == pytest.approx(1e-3)
    top_only = create_stage(StageConfig("warmup", epochs=1, lr={"backbone_top": 2e-4, "experts": 1e-3}), cut, 1e-3)
    assert top_only.group_lr == {"backbone_top": 2e-4, "experts": 1e-3} and not top_only.trains_backbone
    frozen_top = create_stage(StageConfig("warmup", epochs=1, lr={"backbone": 1e-3, "backbone_top": 0.0}), cut, 1e-3)
    assert frozen_top.group_lr == {"backbone": 1e-3}
    assert "backbone_top" not in create_stage(StageConfig("warmup", epochs=1), RUN, base_lr=1e-3).group_lr


# ---------------------------------------------------------------------------------------------
# moe.routing = "cluster": the cluster -> experts gate as a routing mode of its own

GATE_TEACHER = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.25, 0.05]])  # top 2: cluster 0 {0, 1}, 1 {1, 2}
ROUTER_INPUT = torch.tensor([[1.0, 1.0], [11.0, 9.0], [-1.0, 0.5], [9.0, 12.0]])  # clusters 0, 1, 0, 1


def gated_run(mode: str, *stages: str, **model):
    stages = stages or ("warmup", "routing", "residual")
    return config_from_dict({"model": model, "moe": {"top_k": 2, "routing": mode},
                             "curriculum": {"stages": [{"name": s, "epochs": 1} for s in stages]}})


@pytest.mark.parametrize("mode", ["topk", "cluster"])
def test_moe_routing_cluster_routes_the_routing_stage_through_the_residual_stages_gate(mode):
    run = gated_run(mode)
    clusters = clusters_with_teacher(GATE_TEACHER)
    routing, residual, warmup = (create_stage(StageConfig(name, epochs=1), run, 1e-3)
                                 for name in ("routing", "residual", "warmup"))
    gate = residual.routing(clusters)
    gate_mask = gate.resolve(ROUTER_INPUT, num_experts=4).allowed_experts  # (4, 4)
    assert gate_mask.tolist() == [[True, True, False, False], [False, True, True, False]] * 2
    for request in (routing.routing(clusters), routing.inference_routing(clusters)):
        allowed = request.resolve(ROUTER_INPUT, num_experts=4).allowed_experts
        if mode == "cluster":  # the same request as the residual stage's: same masks, kind, dropless
            assert request.to_json() == gate.to_json() and request.to_json()["kind"] == "cluster"
            assert torch.equal(allowed, gate_mask) and request.dropless
        else:  # the router's own Top-K over every expert
            assert request == RoutingRequest() and allowed is None and request.to_json()["kind"] == "topk"
    record = routing.to_json(clusters)
    assert record["moe_routing"] == mode and record["routing"]["kind"] == ("cluster" if mode == "cluster" else "topk")
    # before any clustering: Top-K either way; warm-up trains dense either way
    assert routing.routing(None) == RoutingRequest() and routing.inference_routing(None) == RoutingRequest()
    assert warmup.routing(clusters) == RoutingRequest.dense(uniform_weights=True)
    assert (warmup.inference_routing(clusters).clusters is not None) == (mode == "cluster")
    # the residual stage is the gate in both modes
    assert gate.to_json()["kind"] == "cluster"


def test_moe_routing_cluster_carries_into_a_fusion_stage_after_the_routing_stage():
    clusters = clusters_with_teacher(GATE_TEACHER)
    for mode in ("topk", "cluster"):
        run = gated_run(mode, "warmup", "routing", "fusion", fusion=True)
        fusion = create_stage(run.curriculum.stages[2], run, 1e-3)
        assert fusion.routed_as.name == "routing"
        assert (fusion.inference_routing(clusters).clusters is not None) == (mode == "cluster")
        assert fusion.routing(clusters).to_json() == fusion.routed_as.routing(clusters).to_json()


def test_the_gated_routing_stage_compares_the_teacher_over_each_images_allowed_experts():
    clusters = clusters_with_teacher(GATE_TEACHER)
    pooled = ROUTER_INPUT[:2]  # clusters 0 and 1
    allowed = torch.tensor([[True, True, False, False], [False, True, True, False]])
    logits = torch.tensor([[0.2, -0.1, 5.0, 1.0], [3.0, 0.0, 0.5, -1.0]]).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # the gated router's: zero outside the gate

    class Out:
        route = type("Route", (), {"probs": probs, "logits": logits})
    Out.pooled = pooled
    kl = {mode: float(create_stage(StageConfig("routing", epochs=1), gated_run(mode), 1e-3)
                      .extra_losses(Out, clusters)["kl"]) for mode in ("topk", "cluster")}
    inside = GATE_TEACHER * allowed / (GATE_TEACHER * allowed).sum(1, keepdim=True)  # renormalised over the gate
    expected = (inside * (inside.clamp_min(1e-12).log() - probs.clamp_min(1e-9).log())).sum(1).mean()
    assert kl["cluster"] == pytest.approx(float(expected), rel=1e-5)
    # "topk" compares the whole teacher: its mass outside the gate meets probability 0 there
    assert kl["topk"] > kl["cluster"] + 1.0


def test_moe_routing_cluster_needs_a_stage_that_clusters_and_is_one_line_otherwise():
    from mgmoe_ds.config import ConfigError

    assert gated_run("cluster").moe.routing == "cluster" and RUN.moe.routing == "topk"
    assert gated_run("cluster", "warmup", "residual").moe.routing == "cluster"  # residual clusters too
    assert gated_run("topk", "warmup").moe.routing == "topk"
    with pytest.raises(ConfigError) as err:
        gated_run("cluster", "warmup")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "mgmoe.moe.routing = 'cluster'" in message
    assert '"residual", "routing"' in message
    with pytest.raises(ConfigError, match="moe.routing = 'dense': expected \"topk\" or \"cluster\""):
        config_from_dict({"moe": {"routing": "dense"}})
