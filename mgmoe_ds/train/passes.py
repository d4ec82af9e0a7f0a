"""Passes over a split during training: validation, the k-means over training images and the
cluster teacher's statistics, with the same number of batches on every rank.

Images or, while a stage keeps the backbone frozen, the eval-transform feature caches
(``train/stage_features.py``). The reductions across ranks go through the run's
``Collectives``; this module imports no ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from mgmoe_ds.box_tower import box_statistics
from mgmoe_ds.config import RunConfig
from mgmoe_ds.curriculum import ClusterState
from mgmoe_ds.curriculum.clustering import ClusteringRecord, assign_clusters, cluster_means, kmeans
from mgmoe_ds.curriculum.refinement import cluster_purity, knn_refine
from mgmoe_ds.curriculum.teacher import cluster_expert_scores, cluster_teacher, expert_scores
from mgmoe_ds.metrics import topk_correct
from mgmoe_ds.moe.routing import RoutingRequest


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model's arguments for a batch of images or of cached features (``"features"``)."""
    if "features" in batch:
        return {"images": None, "features": {k: v.to(device, dtype=dtype, non_blocking=True)
                                             for k, v in batch["features"].items()}}
    return {"images": batch["images"].to(device, dtype=dtype, non_blocking=True)}


class TrainingPasses:
    """Evaluation and clustering passes of one rank.

    Args:
        config: the run configuration.
        model: the ``MGMoE``.
        data: the run's ``RunData``.
        features: the run's ``StageFeatures``.
        comm: the run's ``Collectives``.
        device, input_dtype: where and in what dtype batches enter the model.
    """

    def __init__(self, config: RunConfig, model: Any, data: Any, features: Any, comm: Any, *,
                 device: torch.device, input_dtype: torch.dtype) -> None:
        self.config, self.model, self.data, self.features, self.comm = config, model, data, features, comm
        self.device, self.input_dtype = device, input_dtype

    def forward(self, batch: dict, targets: Optional[torch.Tensor] = None, routing: Optional[RoutingRequest] = None,
                module: Any = None):
        """``module`` (the model, or its DeepSpeed engine) on a batch of images or cached features."""
        return (module or self.model)(targets=targets, routing=routing,
                                      **model_inputs(batch, self.device, self.input_dtype))

    def batches(self, split: str, stage: Any) -> Iterator[dict]:
        """``split`` through the eval transform, the same number of batches on every rank (a rank
        that runs out gets empty batches): cached features while ``stage`` keeps the backbone
        frozen, else images."""
        cache = self.features.eval_cache(split, stage)
        if cache is None:
            for batch in self.comm.agreed(self.data.eval_loaders[split], pad=True):
                yield batch or self._empty_batch()
            return
        from mgmoe_ds.feature_cache import batches_per_epoch

        n, size = cache.num_samples, self.data.micro_batch
        for b in range(self.comm.reduce_int(batches_per_epoch(n, size), "max")):
            rows = torch.arange(min(b * size, n), min((b + 1) * size, n))  # (B,), empty past the end
            yield {"features": cache.gather(rows, torch.zeros_like(rows)), "labels": cache.labels[rows]}

    @torch.no_grad()
    def evaluate(self, split: str, routing: RoutingRequest, stage: Any = None,
                 class_counts: Optional[list[int]] = None) -> dict[str, Any]:
        """Top-1/top-5/loss on ``split`` with ``routing``, dropless as ``mgmoe eval`` and inference route
        (from the eval caches while ``stage`` keeps the backbone frozen). With ``class_counts`` (training
        images per class), also top-1 per long-tail bucket, as ``mgmoe eval`` reports it."""
        self.model.eval()
        routing = self._dropless(routing)
        totals = torch.zeros(4, dtype=torch.float64)  # images, top1, top5, loss sum
        box_totals = torch.zeros(3, dtype=torch.float64)  # images with a box, IoU sum, IoU >= 0.5
        by_class = torch.zeros(2, self.model.num_classes, dtype=torch.float64, device=self.device)  # images, correct
        for batch in self.batches(split, stage):
            labels = batch["labels"].to(self.device)
            out = self.forward(batch, routing=routing)
            if labels.numel():
                top1, top5 = topk_correct(out.logits.float(), labels, (1, 5))
                loss = F.cross_entropy(out.logits.float(), labels, reduction="sum")
                totals += torch.tensor([labels.numel(), top1, top5, float(loss)], dtype=torch.float64)
                if class_counts is not None:  # per class, on the device: no copy per batch
                    correct = (out.logits.argmax(-1) == labels).double()  # (B,)
                    by_class[0].index_add_(0, labels, torch.ones_like(correct))
                    by_class[1].index_add_(0, labels, correct)
            if out.boxes is not None and "has_box" in batch:
                box_totals += box_statistics(out.boxes, batch["boxes"], batch["has_box"])
        totals = self.comm.sum(totals)
        n = max(1.0, float(totals[0]))
        result: dict[str, Any] = {"images": int(totals[0]), "top1": float(totals[1]) / n,
                                  "top5": float(totals[2]) / n, "loss": float(totals[3]) / n}
        if self.model.box_tower is not None:  # every rank has the tower, or none: the same collectives
            box_totals = self.comm.sum(box_totals)
            boxed = max(1.0, float(box_totals[0]))
            result.update({"box_images": int(box_totals[0]), "mean_iou": float(box_totals[1]) / boxed,
                           "iou50": float(box_totals[2]) / boxed})
        if class_counts is not None:
            from mgmoe_ds.evaluation.metrics import bucket_top1, long_tail_buckets

            by_class = self.comm.sum(by_class).cpu()  # every rank passes class_counts, or none does
            buckets, _ = long_tail_buckets(class_counts)
            result["buckets"] = bucket_top1(by_class[0], by_class[1], buckets)
        return result

    def _dropless(self, routing: RoutingRequest) -> dict[str, RoutingRequest]:
        """``routing`` for the head, and each backbone MoE layer's default routing, all without a
        capacity limit: the model built for ``mgmoe eval`` and inference is dropless in every layer,
        so evaluation during training must not drop a backbone token either."""
        from mgmoe_ds.model import HEAD_LAYER

        requests = {name: RoutingRequest().without_drops() for name in self.model.token_moe_layers()}
        requests[HEAD_LAYER] = routing.without_drops()
        return requests

    def pooled_features(self, stage: Any) -> torch.Tensor:
        """(N, D) pooled backbone features of this rank's training images (eval transform)."""
        return self.labelled_features(stage)[0]

    @torch.no_grad()
    def labelled_features(self, stage: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's training images (eval transform): pooled backbone features (N, D) and labels (N,)."""
        self.model.eval()
        feats, labels = [], []
        routing = self._dropless(RoutingRequest())
        for batch in self.batches("train", stage):
            inputs = model_inputs(batch, self.device, self.input_dtype)
            features, _ = self.model.forward_backbone(inputs["images"], cached=inputs.get("features"), routing=routing)
            pooled = features["pooled"]
            feats.append(pooled.float().cpu())
            labels.append(batch["labels"].long().cpu())
        if not feats:
            return torch.zeros(0, self.model.backbone.info.pooled_dim), torch.zeros(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def val_expert_stats(self, stage: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per validation image: pooled features (N, D) and each expert's score (N, E), by
        ``curriculum.teacher_score``: log p(true class), p(true class), or 1 when right, else 0."""
        self.model.eval()
        num_experts = self.model.num_experts
        pooled, scores = [], []
        for batch in self.batches(self.data.val_split, stage):
            labels = batch["labels"].to(self.device)
            out = self.forward(batch, routing=self._dropless(RoutingRequest.dense()))
            per_expert = torch.zeros(labels.shape[0], num_experts, out.expert_logits.shape[-1],
                                     device=labels.device)  # (B, E, C)
            per_expert.scatter_(1, out.route.expert_indices[:, :, None].expand_as(out.expert_logits),
                                out.expert_logits.float())
            scores.append(expert_scores(per_expert, labels, self.config.curriculum.teacher_score).cpu())
            pooled.append(out.pooled.float().cpu())
        return torch.cat(pooled), torch.cat(scores)

    def clusters(self, stage: Any, seed: int) -> ClusterState:
        """k-means over every rank's training images (centroids drawn by rank 0 from ``seed``), with
        ``curriculum.clustering = "kmeans+knn"`` refined by each image's nearest neighbours among every
        rank's images, then each cluster's teacher from the validation images' per-expert scores."""
        cur = self.config.curriculum
        train_pooled, train_labels = self.labelled_features(stage)
        initial = torch.zeros(cur.num_clusters, train_pooled.shape[1])
        if self.comm.rank == 0:
            g = torch.Generator().manual_seed(seed)
            picks = torch.randperm(train_pooled.shape[0], generator=g)[:cur.num_clusters]
            initial = train_pooled[picks][torch.arange(cur.num_clusters) % max(1, len(picks))]
        initial = self.comm.broadcast_from_main(initial)
        centroids = kmeans(train_pooled, cur.num_clusters, all_reduce=self.comm.sum, initial=initial)
        assignment = assign_clusters(train_pooled, centroids)  # (N,)
        purity = partial(cluster_purity, labels=train_labels, num_clusters=cur.num_clusters,
                         num_classes=self.model.num_classes, all_reduce=self.comm.sum)
        train_counts = self.comm.sum(torch.bincount(assignment, minlength=cur.num_clusters).float())
        record = ClusteringRecord(cur.clustering, train_counts, *purity(assignment))
        if cur.clustering == "kmeans+knn":
            centroids, train_counts, record = self._refine(train_pooled, assignment, centroids, record, purity)
        val_pooled, per_image = self.val_expert_stats(stage)
        scores, val_counts = cluster_expert_scores(per_image, assign_clusters(val_pooled, centroids), cur.num_clusters,
                                                   self.comm.sum)
        teacher = cluster_teacher(scores, cur.teacher_temperature)
        return ClusterState(centroids, teacher, scores, val_counts, train_counts, record)

    def _refine(self, train_pooled: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor,
                record: ClusteringRecord, purity: Callable[..., tuple[torch.Tensor, float]]
                ) -> tuple[torch.Tensor, torch.Tensor, ClusteringRecord]:
        """The k-means clusters refined by nearest neighbours (``refinement.knn_refine``) over every
        rank's images: each rank refines its own, the centroids are the means of every rank's
        non-outliers (a cluster left empty keeps its k-means centroid). Returns the centroids (C, D),
        the non-outliers per cluster (C,) and ``record`` with its knn fields."""
        cur = self.config.curriculum
        # every rank's images and k-means clusters, in rank order (the torch search runs on the
        # device when faiss is not installed)
        everyone = self.comm.all_gather_rows(train_pooled).to(self.device)  # (N_all, D)
        kmeans_clusters = self.comm.all_gather_rows(assignment[:, None]).to(self.device)[:, 0]  # (N_all,)
        first = int(self.comm.per_rank([train_pooled.shape[0]])[:self.comm.rank].sum())  # this rank's first row
        refined, outlier = knn_refine(everyone, kmeans_clusters, cur.num_clusters, cur.knn_neighbours,
                                      cur.knn_agreement, rows=range(first, first + train_pooled.shape[0]))
        refined, outlier = refined.cpu(), outlier.cpu()  # (N,), (N,)
        kept = ~outlier
        centroids, counts = cluster_means(train_pooled[kept], refined[kept], centroids, self.comm.sum)
        outliers = self.comm.sum(torch.bincount(assignment[outlier], minlength=cur.num_clusters).float())  # (C,)
        refined_purity, refined_overall = purity(refined, valid_mask=kept)
        return centroids, counts, replace(record, neighbours=cur.knn_neighbours, agreement=cur.knn_agreement,
                                          outliers=outliers, refined_sizes=counts, refined_purity=refined_purity,
                                          refined_overall_purity=refined_overall)

    def _empty_batch(self) -> dict:
        size = self.config.model.img_size
        return {"images": torch.zeros(0, 3, size, size), "labels": torch.zeros(0, dtype=torch.long)}
