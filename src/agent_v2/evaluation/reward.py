"""The reward policy: from an outcome's success and speedup to a reward in [0, 1].

The default policy, for benchmark mode::

    reward = 0                                        build or tests failed
    reward = base + (1 - base) * clamp(log(s) / log(target), 0, 1)   otherwise

with ``s`` the speedup, ``base`` = 0.1 (a correct change that is not faster
still earns a little) and ``target`` = 4.0 (a 4x speedup earns the full
reward). It is monotonic in ``s``: 1.0x and slower give 0.1, 1.5x gives
about 0.37, 2x gives 0.55, 4x and faster give 1.0. In test mode a passing
evaluation earns 1.0; in build mode a successful build earns 1.0.

A dataset sets its own policy with a ``reward_policy`` object in its manifest,
for example ``{"base": 0.0, "target_speedup": 2.0}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from agent_v2.errors import ConfigError

__all__ = ["DEFAULT_BASE_REWARD", "DEFAULT_TARGET_SPEEDUP", "RewardPolicy"]

DEFAULT_BASE_REWARD = 0.1
DEFAULT_TARGET_SPEEDUP = 4.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardPolicy:
    """Turns a successful benchmark's speedup into a reward in [0, 1]."""

    base: float = DEFAULT_BASE_REWARD
    target_speedup: float = DEFAULT_TARGET_SPEEDUP

    def __post_init__(self) -> None:
        if not 0.0 <= self.base <= 1.0:
            raise ConfigError(f"reward_policy.base must be in [0, 1], got {self.base}")
        if not self.target_speedup > 1.0:
            raise ConfigError(
                "reward_policy.target_speedup must be greater than 1, "
                f"got {self.target_speedup}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RewardPolicy:
        """Build a policy from a manifest's ``reward_policy`` object."""
        unknown = set(data) - {"base", "target_speedup"}
        if unknown:
            raise ConfigError(
                f"reward_policy has unknown keys {sorted(unknown)}; "
                "expected 'base' and 'target_speedup'"
            )
        try:
            return cls(**{key: float(value) for key, value in data.items()})
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"reward_policy values must be numbers: {exc}") from exc

    def reward(self, speedup: float) -> float:
        """Return the reward of a correct change with this speedup."""
        if not speedup > 0 or math.isnan(speedup):
            return self.base
        gain = math.log(speedup) / math.log(self.target_speedup)
        gain = min(1.0, max(0.0, gain))
        return self.base + (1.0 - self.base) * gain
