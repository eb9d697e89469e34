"""Devices: the exclusive resources an evaluation leases while it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["DeviceLease"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceLease:
    """One device held by one evaluation.

    ``kind`` is ``gpu`` or ``cpu``; ``name`` is how logs and outcomes show it
    (``gpu:1``, ``cpu:0``). ``env`` holds variables every command of the
    evaluation gets (``CUDA_VISIBLE_DEVICES`` and ``HIP_VISIBLE_DEVICES`` for a
    GPU); ``cpus`` the cores commands are pinned to, or ``None`` for no pinning.
    """

    kind: str
    name: str
    gpu_id: int | None = None
    cpus: frozenset[int] | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
