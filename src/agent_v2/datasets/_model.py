"""Instances and datasets as the server sees them, after loading."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent_v2.errors import InstanceNotFound
from agent_v2.evaluation._benchmark import BenchmarkStatistic
from agent_v2.evaluation.reward import RewardPolicy

__all__ = ["Dataset", "Instance", "ProtectedFilesPolicy"]

DEFAULT_SPLIT = "test"


class ProtectedFilesPolicy(enum.StrEnum):
    """What grading does when an agent changed a protected file."""

    RESTORE = "restore"  # put the base version back, note it, grade on
    FAIL = "fail"  # end with error ``protected_files_modified``


@dataclasses.dataclass(frozen=True, kw_only=True)
class Instance:
    """One task of a dataset, with its commands already rendered."""

    dataset_name: str
    instance_id: str
    split: str = DEFAULT_SPLIT
    repo_path: Path | None = None
    build_command: str | None = None
    test_command: str | None = None
    benchmark_command: str | None = None
    timeout: float | None = None
    protected_files: tuple[str, ...] = ()
    image_name: str | None = None
    workdir: str | None = None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        """Return ``(dataset_name, split, instance_id)``."""
        return (self.dataset_name, self.split, self.instance_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dataset:
    """A named set of instances, with the settings shared by all of them."""

    name: str
    path: Path | None
    instances: Mapping[tuple[str, str], Instance]
    reward_policy: RewardPolicy = dataclasses.field(default_factory=RewardPolicy)
    protected_files_policy: ProtectedFilesPolicy = ProtectedFilesPolicy.RESTORE
    benchmark_statistic: BenchmarkStatistic = BenchmarkStatistic.MEDIAN

    @property
    def splits(self) -> list[str]:
        """Return the splits this dataset has, sorted."""
        return sorted({split for split, _ in self.instances})

    def get(self, instance_id: str, split: str | None = None) -> Instance:
        """Return one instance; ``split`` defaults to ``test``."""
        key = (split or DEFAULT_SPLIT, instance_id)
        try:
            return self.instances[key]
        except KeyError:
            raise InstanceNotFound(
                f"dataset {self.name!r} has no instance {instance_id!r} "
                f"in split {key[0]!r}"
            ) from None
