"""Tests for the reward policy: its range, shape and configuration."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_v2.errors import ConfigError
from agent_v2.evaluation import RewardPolicy


def test_default_policy_figures() -> None:
    """The default policy gives the figures its docstring promises."""
    policy = RewardPolicy()

    assert policy.reward(0.5) == pytest.approx(0.1)
    assert policy.reward(1.0) == pytest.approx(0.1)
    assert policy.reward(1.5) == pytest.approx(0.37, abs=0.01)
    assert policy.reward(2.0) == pytest.approx(0.55)
    assert policy.reward(4.0) == pytest.approx(1.0)
    assert policy.reward(100.0) == pytest.approx(1.0)


@pytest.mark.parametrize("speedup", [0.0, -1.0, math.nan, -math.inf])
def test_meaningless_speedups_earn_the_base(speedup: float) -> None:
    """Zero, negative and NaN speedups earn the base reward, never an error."""
    assert RewardPolicy().reward(speedup) == pytest.approx(0.1)


@given(
    base=st.floats(min_value=0.0, max_value=1.0),
    target=st.floats(min_value=1.001, max_value=1e6),
    low=st.floats(min_value=1e-9, max_value=1e9),
    high=st.floats(min_value=1e-9, max_value=1e9),
)
def test_reward_is_monotonic_and_in_range(
    base: float, target: float, low: float, high: float
) -> None:
    """For any valid policy the reward is in [base, 1] and never falls with speedup."""
    policy = RewardPolicy(base=base, target_speedup=target)
    low, high = min(low, high), max(low, high)

    assert base - 1e-12 <= policy.reward(low) <= policy.reward(high) + 1e-12
    assert policy.reward(high) <= 1.0 + 1e-12


def test_from_mapping_reads_a_manifest_object() -> None:
    """A manifest's reward_policy object sets the base and the target."""
    policy = RewardPolicy.from_mapping({"base": 0, "target_speedup": "2"})

    assert policy == RewardPolicy(base=0.0, target_speedup=2.0)
    assert policy.reward(2.0) == pytest.approx(1.0)
    assert RewardPolicy.from_mapping({}) == RewardPolicy()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"base": 1.5}, "reward_policy.base must be in"),
        ({"base": -0.1}, "reward_policy.base must be in"),
        ({"target_speedup": 1.0}, "target_speedup must be greater than 1"),
        ({"target_speedup": "fast"}, "must be numbers"),
        ({"scale": 2}, "unknown keys ['scale']"),
    ],
)
def test_invalid_policies_are_config_errors(
    data: dict[str, object], expected: str
) -> None:
    """Out-of-range values and unknown keys raise ConfigError naming them."""
    with pytest.raises(ConfigError) as caught:
        RewardPolicy.from_mapping(data)

    assert expected in str(caught.value)
