"""Data: shards (build, verify, registry), the streaming pipeline, transforms and the demo birds."""

from .boxes import check_box
from .demo import build_demo
from .formats import FORMATS, UNLABELLED_SPLIT, DataError, Item, Listing, read_listing
from .pipeline import DataInfo, ShardLoader, make_loader
from .sources import DatasetSource, dataset_source, resolve_source
from .stream import SkipCounter
from .registry import DEFAULT_REGISTRY, load_registry, register_dataset
from .shards import build_shards, load_manifest
from .transforms import ImageTransform, create_transform, decode_image, image_size
from .unlabelled import read_unlabelled
from .verify import verify_dataset

__all__ = [
    "DEFAULT_REGISTRY", "FORMATS", "UNLABELLED_SPLIT", "DataError", "DataInfo", "DatasetSource", "ImageTransform",
    "Item", "Listing", "ShardLoader", "SkipCounter", "build_demo", "build_shards", "check_box", "create_transform",
    "dataset_source", "decode_image", "image_size", "load_manifest", "load_registry", "make_loader", "read_listing",
    "read_unlabelled", "register_dataset", "resolve_source", "verify_dataset",
]
