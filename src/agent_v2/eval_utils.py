"""Drop-in ``evaluate_info`` / ``evaluate``: the compatibility contract.

Existing agent code calls::

    reward, speedup, info = await evaluate_info(
        exit_status, result, container_id, instance_id,
        dataset_name, split, eval_server_url,
    )

These functions never raise for runtime failures: any failure returns
``(0.0, -1.0, info)`` with the reason in ``info["meta"]``. Only programming
errors raise (``TypeError`` for a wrong argument type, ``ValueError`` for an
invalid URL or an empty id of a submitted run).

``info["request"]["url"]`` is the URL the evaluation was submitted to:
``{eval_server_url}/v1/evaluations`` on a server with the versioned API,
``{eval_server_url}/evaluate_v3`` on a legacy one (and when no request was
made). ``info["request"]["payload"]`` is always the legacy body.

Underneath is one :class:`~agent_v2.client.EvalClient` per server URL,
sharing one session per event loop, configured from ``AGENT_V2_*``
environment variables (see ``ClientConfig.from_env``) unless
:func:`configure` was called.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, NamedTuple

from agent_v2.client import ClientConfig, EvalClient, SessionPool, validate_base_url
from agent_v2.client._client import LEGACY_PATH, EvaluationResult, Trace
from agent_v2.errors import (
    ClientError,
    HTTPStatusError,
    ProtocolError,
    RequestTimeout,
)
from agent_v2.protocol import EvaluationRequest, Mode

__all__ = [
    "SUBMITTED",
    "SubmissionResult",
    "configure",
    "default_client",
    "evaluate",
    "evaluate_info",
    "evaluate_info_sync",
    "evaluate_many",
]

logger = logging.getLogger(__name__)

SUBMITTED = "Submitted"
STDOUT_PREVIEW_CHARS = 200
_FAILURE = (0.0, -1.0)
_DETAIL_FIELDS = ("error_detail", "build_output", "stdout", "stderr")


class SubmissionResult(NamedTuple):
    """One item of :func:`evaluate_many`: the submission and what it got."""

    submission: Mapping[str, Any]
    reward: float
    speedup: float
    info: dict[str, Any]


class _DefaultClients:
    """One EvalClient per server URL, all sharing one session pool."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.sessions = SessionPool(config.limits)
        self._clients: dict[str, EvalClient] = {}
        self._lock = threading.Lock()

    def client(self, base_url: str) -> EvalClient:
        with self._lock:
            client = self._clients.get(base_url)
            if client is None:
                client = EvalClient(
                    base_url, config=self.config, sessions=self.sessions
                )
                self._clients[base_url] = client
            return client


_defaults: _DefaultClients | None = None
_defaults_lock = threading.Lock()


def configure(config: ClientConfig | None = None) -> None:
    """Set the config of the clients behind the compatibility functions.

    ``None`` makes the next call read the environment again. Sessions already
    open keep their old limits until their event loop shuts down.
    """
    global _defaults
    if config is not None and not isinstance(config, ClientConfig):
        raise TypeError(f"config must be a ClientConfig or None, got {config!r}")
    with _defaults_lock:
        _defaults = None if config is None else _DefaultClients(config)


def default_client(eval_server_url: str) -> EvalClient:
    """Return the client the compatibility functions use for this server."""
    global _defaults
    base_url = validate_base_url(eval_server_url, "eval_server_url")
    with _defaults_lock:
        if _defaults is None:
            _defaults = _DefaultClients(ClientConfig.from_env())
        defaults = _defaults
    return defaults.client(base_url)


async def evaluate(
    exit_status: str | None,
    result: Any,
    container_id: str,
    instance_id: str,
    dataset_name: str | None,
    split: str | None,
    eval_server_url: str,
) -> tuple[float, float]:
    """Grade a submission and return ``(reward, speedup)``; see evaluate_info."""
    reward, speedup, _ = await evaluate_info(
        exit_status,
        result,
        container_id,
        instance_id,
        dataset_name,
        split,
        eval_server_url,
    )
    return reward, speedup


async def evaluate_info(
    exit_status: str | None,
    result: Any,
    container_id: str,
    instance_id: str,
    dataset_name: str | None,
    split: str | None,
    eval_server_url: str,
) -> tuple[float, float, dict[str, Any]]:
    """Grade a submission; return ``(reward, speedup, evaluation_info)``.

    A run whose ``exit_status`` is not ``"Submitted"`` is not sent anywhere.
    Every failure returns ``(0.0, -1.0, info)``; see the module docstring.
    """
    _check_types(exit_status, container_id, instance_id, dataset_name, split)
    client = default_client(eval_server_url)
    payload = _legacy_payload(container_id, instance_id, dataset_name, split)
    info = _new_info(client, payload, exit_status)

    if exit_status != SUBMITTED:
        info["meta"]["reason"] = (
            f"not_submitted: exit_status is {exit_status!r}, not {SUBMITTED!r}; "
            "no evaluation was requested"
        )
        logger.debug("not evaluating %s: %s", container_id, info["meta"]["reason"])
        return (*_FAILURE, info)

    # Built outside the try: an id the protocol refuses is the caller's bug.
    request = EvaluationRequest.model_validate(payload)
    trace = Trace(url=client.base_url + LEGACY_PATH)
    try:
        evaluated = await client.evaluate_traced(request, trace)
    except ClientError as exc:
        _report_client_error(info, trace, exc)
        return (*_FAILURE, info)
    except Exception as exc:
        _report_unexpected(info, trace, exc)
        return (*_FAILURE, info)
    return _report_outcome(info, evaluated)


def evaluate_info_sync(
    exit_status: str | None,
    result: Any,
    container_id: str,
    instance_id: str,
    dataset_name: str | None,
    split: str | None,
    eval_server_url: str,
) -> tuple[float, float, dict[str, Any]]:
    """Run :func:`evaluate_info` for code that has no event loop.

    Raises RuntimeError when called from a running loop: await
    ``evaluate_info`` there instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "evaluate_info_sync() was called from a running event loop; "
            "use 'await evaluate_info(...)' there instead"
        )
    return asyncio.run(
        evaluate_info(
            exit_status,
            result,
            container_id,
            instance_id,
            dataset_name,
            split,
            eval_server_url,
        )
    )


async def evaluate_many(
    submissions: Iterable[Mapping[str, Any]],
    eval_server_url: str,
    *,
    concurrency: int = 100,
) -> AsyncGenerator[SubmissionResult, None]:
    """Yield a :class:`SubmissionResult` per submission, as each finishes.

    Each submission is a mapping with the keyword arguments of
    :func:`evaluate_info` except ``eval_server_url`` (``result`` may be
    absent). At most ``concurrency`` run at once; the input is read lazily.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise TypeError(f"concurrency must be an int, got {concurrency!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    validate_base_url(eval_server_url, "eval_server_url")

    pending: set[asyncio.Task[SubmissionResult]] = set()
    items = iter(submissions)
    try:
        while True:
            for submission in items:
                pending.add(asyncio.create_task(_one(submission, eval_server_url)))
                if len(pending) >= concurrency:
                    break
            if not pending:
                return
            done, pending = await asyncio.wait(
                pending, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _one(submission: Mapping[str, Any], eval_server_url: str) -> SubmissionResult:
    """Evaluate one mapping-shaped submission for evaluate_many."""
    if not isinstance(submission, Mapping):
        raise TypeError(f"each submission must be a mapping, got {submission!r}")
    try:
        reward, speedup, info = await evaluate_info(
            submission["exit_status"],
            submission.get("result"),
            submission["container_id"],
            submission["instance_id"],
            submission.get("dataset_name"),
            submission.get("split"),
            eval_server_url,
        )
    except KeyError as exc:
        raise TypeError(
            f"submission {dict(submission)!r} lacks the key {exc.args[0]!r}"
        ) from None
    return SubmissionResult(submission, reward, speedup, info)


def _check_types(
    exit_status: object,
    container_id: object,
    instance_id: object,
    dataset_name: object,
    split: object,
) -> None:
    """Raise TypeError for an argument of the wrong type, naming it."""
    required = {"container_id": container_id, "instance_id": instance_id}
    optional = {"exit_status": exit_status, "dataset_name": dataset_name}
    optional["split"] = split
    for name, value in required.items():
        if not isinstance(value, str):
            raise TypeError(
                f"{name} must be a str, got {type(value).__name__}: {value!r}"
            )
    for name, value in optional.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"{name} must be a str or None, got {type(value).__name__}: {value!r}"
            )


def _legacy_payload(
    container_id: str,
    instance_id: str,
    dataset_name: str | None,
    split: str | None,
) -> dict[str, Any]:
    """Return the legacy ``/evaluate_v3`` body for this submission."""
    payload: dict[str, Any] = {
        "instance_id": instance_id,
        "container_id": container_id,
        "mode": Mode.BENCHMARK.value,
    }
    if dataset_name is not None:
        payload["dataset_name"] = dataset_name
    if split is not None:
        payload["split"] = split
    return payload


def _new_info(
    client: EvalClient, payload: dict[str, Any], exit_status: str | None
) -> dict[str, Any]:
    """Return an evaluation_info dict describing a failure not yet known."""
    return {
        "request": {
            "url": client.base_url + LEGACY_PATH,
            "payload": payload,
            "timeout_sec": client.config.timeouts.total,
        },
        "response": {"status_code": None, "raw": None, "json": None},
        "meta": {
            "reason": None,
            "success": False,
            "error": None,
            "exit_status": exit_status,
            "api": None,
            "evaluation_id": None,
            "duration_sec": 0.0,
        },
        "extracted": {
            "reward": _FAILURE[0],
            "speedup": _FAILURE[1],
            "exit_code": None,
            "timed_out": False,
            "gpu_id": None,
            "stdout_preview": "",
        },
    }


def _report_outcome(
    info: dict[str, Any], evaluated: EvaluationResult
) -> tuple[float, float, dict[str, Any]]:
    """Fill ``info`` from an outcome; return the contract's tuple."""
    outcome = evaluated.outcome
    body = _json_or_none(evaluated.raw)
    info["request"]["url"] = evaluated.url
    info["response"] = {
        "status_code": evaluated.status_code,
        "raw": evaluated.raw,
        "json": body,
    }
    info["meta"].update(
        api=evaluated.api,
        evaluation_id=evaluated.evaluation_id,
        duration_sec=evaluated.duration,
        success=outcome.success,
    )
    info["extracted"].update(
        reward=outcome.reward,
        speedup=outcome.speedup,
        exit_code=outcome.exit_code,
        timed_out=outcome.timed_out,
        gpu_id=outcome.gpu_id,
        stdout_preview=outcome.stdout[:STDOUT_PREVIEW_CHARS],
    )

    if outcome.success:
        info["meta"]["reason"] = "evaluated"
        return outcome.reward, outcome.speedup, info

    info["meta"]["reason"] = "evaluation_failed"
    info["meta"]["error"] = outcome.error or "evaluation_failed"
    _extract_details(info, body)
    return (*_FAILURE, info)


def _report_client_error(info: dict[str, Any], trace: Trace, exc: ClientError) -> None:
    """Fill ``info`` for a failure of the client (HTTP, timeout, transport...)."""
    if isinstance(exc, HTTPStatusError):
        reason, error = "http_error", f"http_status_{exc.status}: {exc}"
    elif isinstance(exc, RequestTimeout):
        reason, error = "timeout", f"timeout: {exc}"
    elif isinstance(exc, ProtocolError):
        reason, error = "parse_error", f"parse_error: {exc}"
    else:
        reason, error = "client_error", f"client_error: {exc}"

    _fill_from_trace(info, trace)
    info["meta"].update(reason=reason, error=error)
    _extract_details(info, info["response"]["json"])


def _report_unexpected(info: dict[str, Any], trace: Trace, exc: Exception) -> None:
    """Fill ``info`` for an exception nobody planned for, with its traceback."""
    payload = info["request"]["payload"]
    logger.exception(
        "evaluation of container %s (instance %s) failed unexpectedly",
        payload["container_id"],
        payload["instance_id"],
    )
    _fill_from_trace(info, trace)
    info["meta"].update(
        reason="unexpected",
        error=f"unexpected: {type(exc).__name__}: {exc}",
        traceback=traceback.format_exc(),
    )


def _fill_from_trace(info: dict[str, Any], trace: Trace) -> None:
    """Copy what the client recorded about the last answer into ``info``."""
    info["request"]["url"] = trace.url
    info["meta"].update(api=trace.api, evaluation_id=trace.evaluation_id)
    info["response"] = {
        "status_code": trace.status_code,
        "raw": trace.raw,
        "json": _json_or_none(trace.raw),
    }


def _extract_details(info: dict[str, Any], body: Any) -> None:
    """Copy the failure details the server sent into ``info["extracted"]``."""
    if not isinstance(body, dict):
        return
    extracted = info["extracted"]
    if isinstance(body.get("error"), str):
        extracted["error"] = body["error"]
    for name in _DETAIL_FIELDS:
        if body.get(name) is not None:
            extracted[name] = body[name]
    if isinstance(body.get("stdout"), str):
        extracted["stdout_preview"] = body["stdout"][:STDOUT_PREVIEW_CHARS]


def _json_or_none(raw: str | None) -> Any:
    """Return ``raw`` parsed as JSON, or None when it is absent or not JSON."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None
