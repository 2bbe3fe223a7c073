"""The data layer: IDX files, the dataset registry, verified downloads, tensors in memory.

Attributes load lazily so that `mnistlab data list` and friends never import torch.
"""

from typing import Any

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "get_spec", "load_dataset"]


def __getattr__(name: str) -> Any:
    if name in ("Dataset", "load_dataset"):
        from mnistlab.data import dataset

        return getattr(dataset, name)
    if name in ("DATASETS", "DatasetSpec", "get_spec"):
        from mnistlab.data import registry

        return getattr(registry, name)
    raise AttributeError(name)
