"""The ``distill`` block in training: load the teacher, compute its predictions on this rank's
training samples once (or find them stored), and turn each batch's labels into distilled targets.

The teacher is a run folder or an ``mgmoe export`` file of this product (loaded with every
expert in this process, routed as it was trained: ``inference.load_trained``), or a timm
classifier (``distill.timm_model``) with a local weights file for exactly the dataset's classes.
It sees the training images through its own eval transform (``cache.views == 1``) or through
``cache.views`` augmented views of the training transform, drawn with the seeds of the feature
cache's views (the same crops when the teacher preprocesses as the student does). Batches of
cached features use the view they show; batches of freshly augmented images the mean over views.
The maths is in ``mgmoe_ds.distillation``; no ``torch.distributed`` here (each rank predicts its
own shards).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from mgmoe_ds.config import DistillConfig, RunConfig
from mgmoe_ds.distillation import (TeacherError, TeacherPredictions, cosine_loss, distilled_targets,
                                   load_predictions, mixed_like, predictions_key)
from mgmoe_ds.train.stage_features import augmented_view, fixed_order

LOG = logging.getLogger("mgmoe")


@dataclass
class Teacher:
    """A loaded teacher: ``predict(images) -> (B, C)`` logits in the run's class order."""

    predict: Callable[[Tensor], Tensor]
    identity: str  # what its predictions depend on besides the images (weights digest, routing, class map)
    img_size: int
    transform_options: dict[str, Any]
    description: str


def load_teacher(settings: DistillConfig, class_names: list[str], img_size: int, device: torch.device) -> Teacher:
    """The teacher of ``settings`` on ``device``, in eval mode; its logits in ``class_names``' order.

    Raises:
        TeacherError: the file is missing or unreadable, or its classes are not the dataset's.
    """
    from mgmoe_ds.feature_cache import weights_digest

    where = f"mgmoe.distill.teacher = {settings.teacher}"
    if settings.timm_model is not None:
        from mgmoe_ds.backbone import timm_preprocessing

        model = _timm_teacher(settings, len(class_names), where).to(device).eval()
        size = settings.img_size or img_size
        identity = f"timm:{settings.timm_model}|{weights_digest(model)}"
        return Teacher(lambda images: model(images), identity, size, timm_preprocessing(model),
                       f"timm {settings.timm_model} from {settings.teacher}")
    from mgmoe_ds.inference import InferenceError, load_trained
    from mgmoe_ds.typed_json import ConfigError

    try:
        model, meta = load_trained(settings.teacher)
    except (InferenceError, ConfigError) as err:
        raise TeacherError(f"mgmoe.distill.teacher: {' '.join(str(err).split())}") from None
    missing = [name for name in class_names if name not in meta.class_names]
    if missing:
        raise TeacherError(f"{where}: the teacher does not know class {missing[0]!r} ({len(missing)} of the "
                           f"dataset's {len(class_names)} classes missing); distil from a model of this label space")
    order = torch.tensor([meta.class_names.index(name) for name in class_names], device=device)  # (C,)
    model, routing = model.to(device), meta.routing  # the routing moves its tensors to the images' device
    clusters = routing.clusters
    centroids = "" if clusters is None else hashlib.sha256(clusters.centroids.float().numpy().tobytes()).hexdigest()
    identity = f"mgmoe|{weights_digest(model)}|{routing.to_json()}|{centroids}|{order.tolist()}"

    def predict(images: Tensor) -> Tensor:
        return model(images, routing=routing).logits.float()[:, order]  # (B, C) in the run's class order

    return Teacher(predict, identity, meta.preprocessing.img_size, meta.preprocessing.transform_options(),
                   f"{meta.final_stage or 'mgmoe'} model {settings.teacher}")


def _timm_teacher(settings: DistillConfig, num_classes: int, where: str) -> nn.Module:
    import timm

    from mgmoe_ds.backbone_weights import BackboneError, _read_state_dict

    path = Path(settings.teacher)
    try:
        model = timm.create_model(settings.timm_model, pretrained=False, num_classes=num_classes)
        state = _read_state_dict(path)
    except (BackboneError, RuntimeError, OSError) as err:
        raise TeacherError(f"{where}: {' '.join(str(err).split())}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TeacherError(f"{where}: weights do not match timm {settings.timm_model} with {num_classes} classes: "
                           f"{' '.join(str(err).split())[:300]}") from None
    return model


class Distiller:
    """The teacher's side of one rank's training: its stored predictions and each batch's targets.

    Args:
        config: the run configuration (``distill`` set).
        data: the run's ``RunData``.
        root: the folder of stored predictions (``cache.dir`` or ``RUN/feature_cache``).
        device: the rank's device.
        is_main: rank 0 (logs and progress bars).
    """

    def __init__(self, config: RunConfig, data: Any, root: Path, *, device: torch.device, is_main: bool) -> None:
        assert config.distill is not None
        self.config, self.settings, self.data, self.root = config, config.distill, data, Path(root)
        self.device, self.is_main = device, is_main
        self.predictions: Optional[TeacherPredictions] = None
        self.reused = False  # the last prepare found the predictions stored

    @property
    def cosine(self) -> bool:
        return self.settings.cosine

    def prepare(self, input_dtype: torch.dtype = torch.float32) -> TeacherPredictions:
        """Finds this rank's stored predictions or computes them (a progress bar on rank 0)."""
        from mgmoe_ds.data import dataset_source

        started = time.perf_counter()
        teacher = load_teacher(self.settings, list(self.data.class_names), self.config.model.img_size, self.device)
        views = self.config.cache.views
        loader = self._loader(teacher, views)
        key = predictions_key(teacher.identity, transform=f"{loader.stream.transform!r}|input={input_dtype}",
                              manifest=dataset_source(self.data.dataset).content_bytes(), split="train",
                              rank=self.data.rank, world_size=self.data.world_size, views=views,
                              seed=self.config.train.seed)
        folder = self.root / f"teacher-{key}"
        found = load_predictions(folder)
        reused = found is not None and found.key == key
        if not reused:
            found = self._compute(teacher, loader, views, key, input_dtype).save(folder)
        self.predictions, self.reused = found, reused
        if self.is_main:
            LOG.info("distill: teacher %s, predictions %s (%d samples x %d view(s); %s in %.1fs)", teacher.description,
                     key[:12], len(found.keys), found.num_views, "reused" if reused else "computed",
                     time.perf_counter() - started)
        return found

    def targets(self, batch: dict, targets: Tensor, lam: Optional[float] = None) -> Tensor:
        """(B, C) distilled targets of ``batch`` whose label targets are ``targets`` ((B,) labels, or
        (B, C) after Mixup/CutMix with ``lam``), on ``targets``' device."""
        if self.predictions is None:
            raise TeacherError("distill: the teacher's predictions were not prepared (Distiller.prepare)")
        views = batch.get("views")
        probs = self.predictions.probs(batch["keys"], views, self.settings.temperature).to(targets.device)  # (B, C)
        return distilled_targets(targets, mixed_like(probs, lam), weight=self.settings.weight,
                                 smoothing=self.settings.label_smoothing)

    def losses(self, logits: Tensor, targets: Tensor, sample_weights: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The distillation's own losses beside the soft cross-entropy: ``distill.cosine`` when on,
        each image weighted by ``sample_weights`` (B,) when given."""
        return {"distill.cosine": cosine_loss(logits, targets, sample_weights)} if self.settings.cosine else {}

    # -- internals -------------------------------------------------------------------------------

    def _loader(self, teacher: Teacher, views: int):
        from mgmoe_ds.data import make_loader

        data = self.config.data
        loader, _ = make_loader(self.data.dataset, "train", batch_size=self.data.micro_batch, img_size=teacher.img_size,
                                train=views > 1, rank=self.data.rank, world_size=self.data.world_size,
                                num_workers=data.num_workers, epoch_seed=self.config.train.seed, shuffle=False,
                                persistent_workers=False, transform_options=teacher.transform_options)
        return loader

    @torch.no_grad()
    def _compute(self, teacher: Teacher, loader: Any, views: int, key: str, input_dtype: torch.dtype):
        from tqdm.auto import tqdm

        capacity = self.data.samples_per_rank("train")
        bar = tqdm(total=capacity * views, desc="distill: teacher predictions", unit="img",
                   disable=not self.is_main, dynamic_ncols=True)
        keys: list[str] = []
        per_view: list[Tensor] = []
        for view in range(views):
            rows, seen = [], []
            # the eval transform, or the training transform seeded as the feature cache's views are
            for batch in (fixed_order(loader) if views == 1 else augmented_view(loader, view, self.config.train.seed)):
                images = batch["images"].to(self.device, dtype=input_dtype)
                rows.append(teacher.predict(images).float().cpu())  # (B, C)
                seen += list(batch["keys"])
                bar.update(len(batch["keys"]))
            if view == 0:
                keys = seen
            elif seen != keys:
                raise TeacherError(f"distill: view {view} reads the samples in another order than view 0; the "
                                   f"loader must not shuffle")
            if not rows:
                raise TeacherError(f"distill: rank {self.data.rank} has no training sample for the teacher")
            per_view.append(torch.cat(rows))  # (N, C)
        bar.close()
        return TeacherPredictions(key, torch.stack(per_view), keys)  # (V, N, C)
