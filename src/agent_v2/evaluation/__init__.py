"""Grading: the pipeline per mode, benchmark parsing and the reward policy."""

from __future__ import annotations

from agent_v2.evaluation.reward import RewardPolicy

__all__ = ["RewardPolicy"]
