"""Issue 19 benchmark (in part): cluster purity before and after the nearest-neighbour refinement.

flowers12 (``../shared/data/flowers12``), all 50 training photos per species left after
``--val-per-class`` are carved off (the data of ``bench_few_images.py --train-per-class 0``, built
the same way in its own work folder). The pooled features of the config's frozen backbone
(``ds_configs/zero2.json``: EfficientNet-Lite0 with its offline ImageNet weights, eval transform at
the config's resolution) are clustered as the routing stage clusters them:

- ``kmeans``: ``curriculum.clustering.kmeans`` with C clusters (the config's
  ``curriculum.num_clusters`` and the number of species), 20 Lloyd iterations, initial centroids
  drawn from the seed, over ``--seeds`` seeds;
- ``kmeans+knn``: the same k-means, then ``curriculum.refinement.knn_refine`` with k neighbours
  and the agreement threshold (each pair in the table).

Purity (the share of images in their cluster's most common species, ``refinement.cluster_purity``)
is reported three ways: k-means over all images; the refined clusters over all images (outliers
kept in their refined cluster: the like-for-like comparison); the refined clusters without the
outliers (what the centroids are then computed from), with the share of images marked outliers.
Mean and standard deviation over the seeds. Markdown on stdout; ``bench/results/cluster_refinement.json``.

Usage::

    PYTHONPATH=. python bench/bench_cluster_refinement.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_few_images import build_data
from bench_transfer import prepare_work
from machine import command_line, machine_record, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ds_configs" / "zero2.json"
PAIRS = [(5, 0.5), (10, 0.5), (10, 0.7), (20, 0.5)]


def features(dataset: Path):
    """(N, D) pooled features and (N,) labels of the training split, and the extraction seconds."""
    import torch

    from mgmoe_ds.backbone import Backbone
    from mgmoe_ds.config import load_run_config
    from mgmoe_ds.data import make_loader

    config, _ = load_run_config(CONFIG, [])
    model = config.model
    backbone = Backbone(model.backbone, pretrained=model.pretrained, img_size=model.img_size,
                        **model.backbone_options).eval()
    loader, _ = make_loader(dataset, "train", batch_size=32, img_size=model.img_size, train=False, num_workers=1,
                            transform_options=backbone.preprocessing())
    started = time.perf_counter()
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(backbone(batch["images"], {"pooled"})["pooled"].float())
            labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels), time.perf_counter() - started, config.curriculum.num_clusters


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flowers12")
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mgmoe_bench_cluster_refinement"))
    args = parser.parse_args()
    args.seed, args.train_per_class = 0, 0
    from mgmoe_ds.curriculum.clustering import assign_clusters, kmeans
    from mgmoe_ds.curriculum.refinement import cluster_purity, knn_refine

    started = time.time()
    prepare_work(args.work, {"data": str(args.data.resolve()), "val_per_class": args.val_per_class},
                 ("images", "shards", "logs", "settings.json"), reuse=True)
    data, dataset = build_data(args, args.work)
    feats, labels, extract_s, config_clusters = features(dataset)
    num_classes = int(labels.max()) + 1
    rows = []
    for clusters in sorted({config_clusters, num_classes}):
        plain, refined_all, refined_kept, outlier_share = [], {p: [] for p in PAIRS}, {p: [] for p in PAIRS}, \
            {p: [] for p in PAIRS}
        for seed in range(args.seeds):
            centroids = kmeans(feats, clusters, seed=seed)
            assignment = assign_clusters(feats, centroids)  # (N,)
            plain.append(cluster_purity(assignment, labels, clusters, num_classes=num_classes)[1])
            for k, agreement in PAIRS:
                refined, outlier = knn_refine(feats, assignment, clusters, k, agreement)
                refined_all[(k, agreement)].append(cluster_purity(refined, labels, clusters, num_classes=num_classes)[1])
                refined_kept[(k, agreement)].append(cluster_purity(refined, labels, clusters, ~outlier,
                                                                   num_classes=num_classes)[1])
                outlier_share[(k, agreement)].append(float(outlier.float().mean()))
        rows.append({"clusters": clusters, "method": "kmeans", "purity_all": summary(plain)})
        for pair in PAIRS:
            rows.append({"clusters": clusters, "method": "kmeans+knn", "neighbours": pair[0], "agreement": pair[1],
                         "purity_all": summary(refined_all[pair]), "purity_kept": summary(refined_kept[pair]),
                         "outlier_share": summary(outlier_share[pair])})
    results = {"command": command_line("bench_cluster_refinement.py"),
               "images": int(labels.numel()), "species": num_classes, "splits": data["sizes"], "seeds": args.seeds,
               "extract_s": extract_s, "wall_s": time.time() - started,
               "machine": machine_record(), "rows": rows}
    out = write_results(results, "cluster_refinement")
    m = results["machine"]
    print(f"Command: {results['command']}\nMachine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, load "
          f"{m['loadavg'][0]:.2f}; features of {results['images']} training photos of {num_classes} species in "
          f"{extract_s:.0f} s; {args.seeds} seeds; total {results['wall_s']:.0f} s.\n")
    print("| C | method | k | agreement | purity, all images | purity without outliers | outliers |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        fmt = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
        if r["method"] == "kmeans":
            print(f"| {r['clusters']} | kmeans | - | - | {fmt(r['purity_all'])} | - | - |")
        else:
            print(f"| {r['clusters']} | kmeans+knn | {r['neighbours']} | {r['agreement']} | {fmt(r['purity_all'])} | "
                  f"{fmt(r['purity_kept'])} | {100 * r['outlier_share']['mean']:.1f}% |")
    print(f"\nraw results in {out}")


if __name__ == "__main__":
    main()
