"""``mgmoe export``: one ``.safetensors`` file with every expert, the router and the backbone.

The file holds the model's state dict under ``model.`` (global expert ids, whatever expert-
parallel size the run trained with) and, when the model routes at cluster level, the centroids
and each cluster's allowed experts under ``routing.``. Its string metadata carries JSON: the
mgmoe config block, the class names, the preprocessing and the routing policy, so that
``mgmoe predict`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mgmoe_ds.inference import InferenceMeta, export_tensors, load_trained


def save_export(model, meta: InferenceMeta, out: str | Path) -> Path:
    """Writes ``model`` and ``meta`` to ``out`` (a ``.safetensors`` file); returns the path."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = export_tensors(model, meta)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(out)  # a crash mid-write never leaves a truncated file under the final name
    return out


def export_model(checkpoint: str | Path, out: str | Path, tag: Optional[str] = None) -> Path:
    """Consolidates a run folder's checkpoint (any expert-parallel size) into one exported file.

    Args:
        checkpoint: the run folder (or an exported file, which is re-exported).
        out: the ``.safetensors`` file to write.
        tag: checkpoint tag; default the run's last good checkpoint.
    """
    model, meta = load_trained(checkpoint, tag=tag)
    return save_export(model, meta, out)
