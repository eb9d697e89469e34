"""``agent-v2 bench``: side-by-side client and server benchmarks on loopback.

Use::

    results = asyncio.run(run_bench(BenchConfig()))
    write_results(results, Path("benchmarks/results"))
    markdown = render_markdown(results)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent_v2._bench._config import BenchConfig
    from agent_v2._bench._report import render_markdown, write_results
    from agent_v2._bench._scenarios import run_bench

__all__ = ["BenchConfig", "render_markdown", "run_bench", "write_results"]

# NOTE: resolved lazily, because every client child imports this package on
# its way to ``_worker``: an eager import would load aiohttp and pydantic into
# the children of the ``requests`` variants and inflate their peak RSS.
_HOMES = {
    "BenchConfig": "agent_v2._bench._config",
    "render_markdown": "agent_v2._bench._report",
    "run_bench": "agent_v2._bench._scenarios",
    "write_results": "agent_v2._bench._report",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its private module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
