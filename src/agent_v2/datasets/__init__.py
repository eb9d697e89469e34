"""Datasets of instances: loading, validation and the bundled demo."""

from __future__ import annotations

from agent_v2.datasets._loader import (
    bundled_dataset_path,
    load_dataset,
    parse_dataset_spec,
)
from agent_v2.datasets._model import Dataset, Instance, ProtectedFilesPolicy

__all__ = [
    "Dataset",
    "Instance",
    "ProtectedFilesPolicy",
    "bundled_dataset_path",
    "load_dataset",
    "parse_dataset_spec",
]
