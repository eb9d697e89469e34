"""The catalog: finds the instance a request names among the served datasets."""

from __future__ import annotations

from collections.abc import Sequence

from agent_v2.datasets import Dataset, Instance
from agent_v2.server._errors import InvalidRequest, UnknownDataset

__all__ = ["Catalog"]


class Catalog:
    """The datasets a server serves, by name."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self._datasets = {dataset.name: dataset for dataset in datasets}

    @property
    def names(self) -> list[str]:
        """Return the served dataset names, sorted."""
        return sorted(self._datasets)

    def dataset(self, name: str | None) -> Dataset:
        """Return a dataset by name; without a name, the only one served."""
        if name is None:
            if len(self._datasets) == 1:
                return next(iter(self._datasets.values()))
            raise InvalidRequest(
                f"dataset_name is required: this server serves {self.names}",
                field="dataset_name",
            )
        try:
            return self._datasets[name]
        except KeyError:
            raise UnknownDataset(
                f"no dataset {name!r} is served; served: {self.names}",
                field="dataset_name",
            ) from None

    def resolve(
        self, instance_id: str, dataset_name: str | None, split: str | None
    ) -> Instance:
        """Return the instance; raise InstanceNotFound or UnknownDataset."""
        return self.dataset(dataset_name).get(instance_id, split)
