"""A scripted agent: start a container, apply a variant's patch, submit it."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import Any

from agent_v2._demo._variants import DEMO_DATASET, DEMO_SPLIT, Variant
from agent_v2.client import EvalClient
from agent_v2.errors import ClientError
from agent_v2.eval_utils import SUBMITTED, evaluate_info

__all__ = ["AgentResult", "Phase", "run_agent"]

logger = logging.getLogger(__name__)

APPLY_COMMAND = "git apply --whitespace=nowarn"
"""Reads the patch from stdin, as an agent would pipe a diff it wrote."""

APPLY_TIMEOUT = 60.0


class Phase(enum.Enum):
    """Where a scripted agent is."""

    WAITING = "waiting"
    PREPARING = "preparing"
    SUBMITTED = "submitted"
    DONE = "done"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentResult:
    """What one scripted agent got for its variant.

    ``error`` is the outcome's error code (or ``patch_failed`` /
    ``agent_failed`` / the client's failure when there was no outcome);
    ``seconds`` is the evaluation's own time on the server, queueing aside;
    ``problem`` says why the outcome is not what the variant must get.
    """

    variant: Variant
    reward: float
    speedup: float
    error: str | None
    detail: str | None
    seconds: float | None
    problem: str | None

    @property
    def as_expected(self) -> bool:
        """Return whether the outcome is what the variant must get."""
        return self.problem is None


async def run_agent(
    client: EvalClient,
    variant: Variant,
    *,
    keep_container: bool = False,
    on_phase: Callable[[Variant, Phase], None] | None = None,
) -> AgentResult:
    """Play an agent that makes the variant's change and submits it."""

    def phase(value: Phase) -> None:
        if on_phase is not None:
            on_phase(variant, value)

    phase(Phase.PREPARING)
    try:
        created = await client.create_container(
            variant.instance_id, dataset_name=DEMO_DATASET, split=DEMO_SPLIT
        )
    except ClientError as exc:
        return _failed(variant, "agent_failed", f"cannot start a container: {exc}")

    try:
        return await _change_and_submit(client, variant, created.container_id, phase)
    finally:
        if not keep_container:
            await _remove(client, created.container_id)


async def _change_and_submit(
    client: EvalClient,
    variant: Variant,
    container_id: str,
    phase: Callable[[Phase], None],
) -> AgentResult:
    """Apply the patch in the container, then submit it with evaluate_info."""
    if variant.patch is not None:
        patch = await asyncio.to_thread(variant.patch.read_text, encoding="utf-8")
        try:
            applied = await client.exec(
                container_id, APPLY_COMMAND, stdin=patch, timeout=APPLY_TIMEOUT
            )
        except ClientError as exc:
            return _failed(variant, "agent_failed", f"cannot run git apply: {exc}")
        if applied.exit_code != 0:
            why = f"{APPLY_COMMAND} exited with {applied.exit_code}: "
            return _failed(variant, "patch_failed", why + applied.stderr[-500:])

    phase(Phase.SUBMITTED)
    reward, speedup, info = await evaluate_info(
        SUBMITTED,
        None,
        container_id,
        variant.instance_id,
        DEMO_DATASET,
        DEMO_SPLIT,
        client.base_url,
    )
    error, detail = _error_of(info)
    return AgentResult(
        variant=variant,
        reward=reward,
        speedup=speedup,
        error=error,
        detail=detail,
        seconds=_evaluation_seconds(info),
        problem=variant.check(error=error, speedup=speedup),
    )


def _error_of(info: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return the outcome's error code and detail from evaluation_info."""
    if info["meta"]["success"]:
        return None, None
    extracted = info["extracted"]
    if isinstance(extracted.get("error"), str):
        return extracted["error"], extracted.get("error_detail")
    # No outcome: the client failed ("timeout: ...", "http_status_503: ...").
    message = str(info["meta"]["error"])
    return message.partition(":")[0], message


def _evaluation_seconds(info: dict[str, Any]) -> float | None:
    """Return the evaluation's total time from the outcome's timings."""
    body = info["response"]["json"]
    timings = body.get("timings") if isinstance(body, dict) else None
    total = timings.get("total") if isinstance(timings, dict) else None
    if isinstance(total, int | float) and not isinstance(total, bool):
        return float(total)
    return None


def _failed(variant: Variant, error: str, detail: str) -> AgentResult:
    """Return the result of an agent that could not submit."""
    logger.warning("%s: %s", variant.label, detail)
    return AgentResult(
        variant=variant,
        reward=0.0,
        speedup=-1.0,
        error=error,
        detail=detail,
        seconds=None,
        problem=f"expected {variant.expected}, but the agent failed: {detail}",
    )


async def _remove(client: EvalClient, container_id: str) -> None:
    """Remove the agent's container; a failure only costs disk space."""
    try:
        await client.remove_container(container_id)
    except ClientError as exc:
        logger.warning("could not remove container %s: %s", container_id, exc)
