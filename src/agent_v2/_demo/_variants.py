"""Demo variants: known changes to each instance and the outcome each must get."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent_v2.errors import ConfigError

__all__ = [
    "BUNDLED_VARIANTS",
    "DEMO_DATASET",
    "DEMO_SPLIT",
    "Variant",
    "load_variants",
    "select_variants",
]

DEMO_DATASET = "demo"
DEMO_SPLIT = "test"
BUNDLED_VARIANTS = (
    Path(__file__).parent.parent / "datasets" / "data" / "demo" / "variants"
) / "variants.json"

_FIELDS = frozenset({"patch", "error", "min_speedup", "max_speedup"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One known change to an instance and the outcome it must get.

    ``patch`` None means the unchanged code. ``error`` is the outcome's error
    code, None for a success, whose speedup must then lie within
    ``min_speedup`` and ``max_speedup`` when they are given.
    """

    instance_id: str
    name: str
    patch: Path | None
    error: str | None
    min_speedup: float | None = None
    max_speedup: float | None = None

    @property
    def label(self) -> str:
        """Return ``instance/variant``, how messages name it."""
        return f"{self.instance_id}/{self.name}"

    @property
    def expected(self) -> str:
        """Return the expected outcome in words."""
        if self.error is not None:
            return f"error {self.error}"
        bounds = []
        if self.min_speedup is not None:
            bounds.append(f"speedup >= {self.min_speedup:g}")
        if self.max_speedup is not None:
            bounds.append(f"speedup <= {self.max_speedup:g}")
        return "success" + (f" with {' and '.join(bounds)}" if bounds else "")

    def check(self, *, error: str | None, speedup: float) -> str | None:
        """Return why an outcome is not what this variant must get, or None."""
        if error != self.error:
            got = "success" if error is None else f"error {error}"
            return f"expected {self.expected}, got {got}"
        if error is not None:
            return None
        if self.min_speedup is not None and speedup < self.min_speedup:
            return f"speedup {speedup:.2f} is below the minimum {self.min_speedup:g}"
        if self.max_speedup is not None and speedup > self.max_speedup:
            return f"speedup {speedup:.2f} is above the maximum {self.max_speedup:g}"
        return None


def load_variants(path: Path) -> list[Variant]:
    """Read a variants file (format: docs/demo.md); patches resolve beside it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"variants file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read variants file {path}: {exc}") from None

    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, dict) or not instances:
        raise ConfigError(
            f"{path}: expected an object with a non-empty 'instances' object"
        )
    variants = []
    for instance_id, by_name in instances.items():
        if not isinstance(by_name, dict) or not by_name:
            raise ConfigError(
                f"{path}: instance {instance_id!r} must map variant names to "
                "expected outcomes"
            )
        for name, fields in by_name.items():
            where = f"{path}: {instance_id}/{name}"
            variants.append(_variant(where, path.parent, instance_id, name, fields))
    return variants


def _variant(
    where: str, folder: Path, instance_id: str, name: str, fields: Any
) -> Variant:
    """Validate one variant's fields."""
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected an object")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; use {sorted(_FIELDS)}")

    patch = fields.get("patch")
    if patch is not None and (not isinstance(patch, str) or not patch.strip()):
        raise ConfigError(f"{where}: 'patch' must be a file path or null")
    error = fields.get("error")
    if error is not None and (not isinstance(error, str) or not error.strip()):
        raise ConfigError(f"{where}: 'error' must be an error code or null")
    patch_path = None if patch is None else folder / patch
    if patch_path is not None and not patch_path.is_file():
        raise ConfigError(f"{where}: patch {patch_path} does not exist")

    return Variant(
        instance_id=instance_id,
        name=name,
        patch=patch_path,
        error=error,
        min_speedup=_bound(where, fields, "min_speedup"),
        max_speedup=_bound(where, fields, "max_speedup"),
    )


def _bound(where: str, fields: dict[str, Any], name: str) -> float | None:
    """Return an optional speedup bound: a positive, finite number."""
    value = fields.get(name)
    if value is None:
        return None
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {name!r} must be a positive number, got {value!r}")
    return float(value)


def select_variants(
    variants: Sequence[Variant],
    instances: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[Variant]:
    """Return the variants of the chosen instances and names (None: all)."""
    known_instances = list(dict.fromkeys(v.instance_id for v in variants))
    known_names = list(dict.fromkeys(v.name for v in variants))
    _check_known("instance", instances, known_instances)
    _check_known("variant", names, known_names)

    chosen = [
        variant
        for variant in variants
        if (instances is None or variant.instance_id in instances)
        and (names is None or variant.name in names)
    ]
    if not chosen:
        raise ConfigError("no variant matches the chosen instances and variants")
    return chosen


def _check_known(kind: str, given: Sequence[str] | None, known: list[str]) -> None:
    """Raise ConfigError for a chosen name the variants file does not have."""
    unknown = [name for name in given or () if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown {kind} {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(known)}"
        )
