"""Grading whole runs: a submissions file in, durable results and a summary out.

``evaluate_file`` is what ``agent-v2 evaluate`` calls; ``embedded_server``
also serves ``agent-v2 demo``. The file formats are described in
``docs/evaluate.md``.
"""

from __future__ import annotations

from agent_v2._runs._embedded import EmbeddedOptions, EmbeddedServer, embedded_server
from agent_v2._runs._grader import (
    DEFAULT_CONCURRENCY,
    RunObserver,
    RunOptions,
    check_server,
    evaluate_file,
    grade_run,
)
from agent_v2._runs._results import ResultsFile, record_key
from agent_v2._runs._submissions import (
    Malformed,
    Submission,
    key_digest,
    parse_line,
)
from agent_v2._runs._summary import (
    OutcomeSummary,
    Problem,
    RunCounts,
    RunSummary,
    summarize_results,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "EmbeddedOptions",
    "EmbeddedServer",
    "Malformed",
    "OutcomeSummary",
    "Problem",
    "ResultsFile",
    "RunCounts",
    "RunObserver",
    "RunOptions",
    "RunSummary",
    "Submission",
    "check_server",
    "embedded_server",
    "evaluate_file",
    "grade_run",
    "key_digest",
    "parse_line",
    "record_key",
    "summarize_results",
]
