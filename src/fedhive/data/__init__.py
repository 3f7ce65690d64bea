"""Data sets and non-IID partitioners for simulations.

Importing this package needs only numpy; ``mnist1d``, ``scikit-learn`` and ``torch`` are
imported by the loaders that use them, when called.
"""

from __future__ import annotations

from fedhive.data.datasets import (
    DATASETS,
    Dataset,
    default_cache_dir,
    from_arrays,
    from_torch_dataset,
    load_dataset,
    load_digits,
    load_folder,
    load_mnist1d,
    synthetic,
)
from fedhive.data.partition import (
    Partition,
    dirichlet,
    format_partition_table,
    iid,
    natural,
    quantity_skew,
    shards,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "Partition",
    "default_cache_dir",
    "dirichlet",
    "format_partition_table",
    "from_arrays",
    "from_torch_dataset",
    "iid",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_mnist1d",
    "natural",
    "quantity_skew",
    "shards",
    "synthetic",
]
