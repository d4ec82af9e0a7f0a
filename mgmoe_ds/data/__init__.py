"""Data: shards (build, verify, registry), the streaming pipeline, transforms and the demo birds."""

from .demo import build_demo
from .formats import FORMATS, DataError, Item, Listing, read_listing
from .pipeline import DataInfo, ShardLoader, make_loader
from .sources import DatasetSource, dataset_source, resolve_source
from .stream import SkipCounter
from .registry import DEFAULT_REGISTRY, load_registry, register_dataset
from .shards import build_shards, load_manifest
from .transforms import create_transform, decode_image
from .verify import verify_dataset

__all__ = [
    "DEFAULT_REGISTRY", "FORMATS", "DataError", "DataInfo", "DatasetSource", "Item", "Listing", "ShardLoader",
    "SkipCounter", "build_demo", "dataset_source", "build_shards", "create_transform", "decode_image", "load_manifest", "load_registry",
    "make_loader", "read_listing", "register_dataset", "resolve_source", "verify_dataset",
]
