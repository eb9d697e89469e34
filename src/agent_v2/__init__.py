"""agent_v2: grade the work of many coding agents at once."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
