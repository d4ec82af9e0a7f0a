"""mgmoe-ds: a routed multi-granularity mixture of heterogeneous experts on DeepSpeed."""

__version__ = "0.1.0"
