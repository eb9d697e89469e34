"""Wire models shared by the client and the evaluation server.

Every JSON body that crosses the HTTP API is one of these models, so the
server validates with the same definitions the client parses with, and the
OpenAPI document is generated from them.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_EVALUATION_TIMEOUT",
    "DEFAULT_EXEC_TIMEOUT",
    "DEFAULT_GPU_ACQUIRE_TIMEOUT",
    "MAX_BATCH_SUBMISSIONS",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_WAIT_IDS",
    "MAX_WAIT_SECONDS",
    "BatchItem",
    "BatchSubmission",
    "BatchSubmitRequest",
    "BatchSubmitResponse",
    "ContainerCreated",
    "ContainerRequest",
    "ErrorBody",
    "ErrorCode",
    "EvaluationAccepted",
    "EvaluationRequest",
    "EvaluationView",
    "ExecRequest",
    "ExecResult",
    "Health",
    "Mode",
    "Outcome",
    "Status",
    "WaitRequest",
    "WaitResponse",
]

DEFAULT_EVALUATION_TIMEOUT = 1800.0
DEFAULT_GPU_ACQUIRE_TIMEOUT = 300.0
DEFAULT_EXEC_TIMEOUT = 600.0
MAX_WAIT_SECONDS = 300.0
MAX_WAIT_IDS = 1000
MAX_BATCH_SUBMISSIONS = 1000
MAX_IDEMPOTENCY_KEY = 256
MAX_TIMEOUT = 86400.0


class Mode(enum.StrEnum):
    """What an evaluation does."""

    BUILD = "build"
    TEST = "test"
    BENCHMARK = "benchmark"


class Status(enum.StrEnum):
    """Where an evaluation is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class ErrorCode(enum.StrEnum):
    """Machine-readable reasons in ``Outcome.error`` and ``ErrorBody.error``."""

    BUILD_FAILED = "build_failed"
    TESTS_FAILED = "tests_failed"
    BENCHMARK_FAILED = "benchmark_failed"
    TIMED_OUT = "timed_out"
    DEVICE_UNAVAILABLE = "device_unavailable"
    CONTAINER_NOT_FOUND = "container_not_found"
    INSTANCE_NOT_FOUND = "instance_not_found"
    PROTECTED_FILES_MODIFIED = "protected_files_modified"
    CANCELLED = "cancelled"
    INVALID_REQUEST = "invalid_request"
    INTERNAL_ERROR = "internal_error"
    # Errors that only answer HTTP requests; they never end an evaluation.
    NOT_FOUND = "not_found"
    QUEUE_FULL = "queue_full"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    SHUTTING_DOWN = "shutting_down"
    STORE_UNAVAILABLE = "store_unavailable"
    OVERLOADED = "overloaded"
    REQUEST_TIMEOUT = "request_timeout"


_Id = Annotated[str, Field(min_length=1, max_length=256)]
_Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluationRequest(_Model):
    """A submission to grade: body of ``POST /v1/evaluations`` and ``/evaluate_v3``."""

    instance_id: _Id
    container_id: _Id
    mode: Mode = Mode.BENCHMARK
    dataset_name: _Id | None = None
    split: _Id | None = None
    timeout: _Timeout | None = Field(
        default=None, description="Seconds the evaluation may run once it has a device."
    )
    gpu_acquire_timeout: Annotated[float, Field(ge=0, le=MAX_TIMEOUT)] | None = Field(
        default=None,
        description="Seconds the evaluation may wait for a device once accepted.",
    )


class Outcome(BaseModel):
    """The result of one evaluation; the flat body ``/evaluate_v3`` answers with."""

    model_config = ConfigDict(extra="allow")

    success: bool
    error: str | None = None
    error_detail: str | None = None
    infra_failure: bool = False
    reward: float = 0.0
    speedup: float = -1.0
    exit_code: int | None = None
    timed_out: bool = False
    gpu_id: int | None = None
    device: str | None = None
    mode: Mode | None = None
    build_output: str = ""
    stdout: str = ""
    stderr: str = ""
    protected_files_restored: list[str] = Field(default_factory=list)
    benchmarks: dict[str, float] = Field(
        default_factory=dict,
        description="Per benchmark, baseline time over candidate time.",
    )
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds spent per step, and in total."
    )


class EvaluationAccepted(_Model):
    """Answer of ``POST /v1/evaluations`` (202)."""

    id: str
    status: Status


class EvaluationView(BaseModel):
    """An evaluation as ``GET /v1/evaluations/{id}`` shows it."""

    id: str
    status: Status
    request: EvaluationRequest
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    outcome: Outcome | None = None


class WaitRequest(_Model):
    """Body of ``POST /v1/evaluations/wait``."""

    ids: list[_Id] = Field(min_length=1, max_length=MAX_WAIT_IDS)
    timeout: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS)] = 30.0


class WaitResponse(BaseModel):
    """The finished evaluations among those asked for, and the rest by id."""

    evaluations: list[EvaluationView]
    pending: list[str]
    unknown: list[str] = Field(default_factory=list)


class ContainerRequest(_Model):
    """Body of ``POST /v1/containers``."""

    instance_id: _Id
    dataset_name: _Id | None = None
    split: _Id | None = None


class ContainerCreated(BaseModel):
    """Answer of ``POST /v1/containers`` (201)."""

    container_id: str
    dataset_name: str
    split: str
    instance_id: str


class ExecRequest(_Model):
    """Body of ``POST /v1/containers/{id}/exec``."""

    command: Annotated[str, Field(min_length=1, max_length=1_000_000)]
    stdin: str | None = None
    timeout: _Timeout | None = None


class ExecResult(BaseModel):
    """What a command run in a container did."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    duration: float = 0.0
    truncated: bool = False


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer; flat, so legacy clients read it as a failed outcome."""

    model_config = ConfigDict(extra="allow")

    success: bool = False
    error: str
    error_detail: str
    field: str | None = None


def _printable(key: str) -> str:
    if not key.isprintable():
        raise ValueError("must be printable characters")
    return key


_Key = Annotated[
    str,
    Field(min_length=1, max_length=MAX_IDEMPOTENCY_KEY),
    AfterValidator(_printable),
]


class BatchSubmission(EvaluationRequest):
    """One submission of a batch: the request and its own idempotency key."""

    idempotency_key: _Key


class BatchSubmitRequest(_Model):
    """Body of ``POST /v1/evaluations/batch``."""

    evaluations: list[BatchSubmission] = Field(
        min_length=1, max_length=MAX_BATCH_SUBMISSIONS
    )


class BatchItem(BaseModel):
    """What became of one submission of a batch.

    ``status_code`` is what ``POST /v1/evaluations`` would have answered for
    it alone: 202 or 200 with ``accepted``, or an error status with ``error``
    (and ``retry_after`` for 429 and 503).
    """

    status_code: int
    accepted: EvaluationAccepted | None = None
    error: ErrorBody | None = None
    retry_after: int | None = None


class BatchSubmitResponse(BaseModel):
    """Answer of ``POST /v1/evaluations/batch``: one item per submission, in order."""

    results: list[BatchItem]


class Health(BaseModel):
    """Answer of ``GET /healthz``."""

    status: str
    version: str
    backend: str
    queued: int
    running: int
    devices_total: int
    devices_free: int
    uptime: float


def dump(model: BaseModel) -> dict[str, Any]:
    """Return a model as a JSON-ready dict."""
    return model.model_dump(mode="json")
