"""The demo: an embedded server grading scripted agents' changes to the demo dataset.

``run_demo`` is what ``agent-v2 demo`` calls; ``docs/demo.md`` describes the
dataset and its variants, ``docs/evaluate.md`` the command.
"""

from __future__ import annotations

from agent_v2._demo._agent import AgentResult, Phase, run_agent
from agent_v2._demo._runner import (
    DemoObserver,
    DemoOptions,
    DemoReport,
    missing_toolchain,
    run_demo,
)
from agent_v2._demo._variants import (
    BUNDLED_VARIANTS,
    Variant,
    load_variants,
    select_variants,
)

__all__ = [
    "BUNDLED_VARIANTS",
    "AgentResult",
    "DemoObserver",
    "DemoOptions",
    "DemoReport",
    "Phase",
    "Variant",
    "load_variants",
    "missing_toolchain",
    "run_agent",
    "run_demo",
    "select_variants",
]
