"""Tests of the evaluation API on a real server with the dummy backend."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest

import agent_v2.server
from agent_v2.errors import ConfigError
from agent_v2.server import ServerSettings, create_app

SUBMIT = {"instance_id": "a", "container_id": "c-1", "mode": "test"}


async def _submit(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any] | None = None,
    **headers: str,
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{url}/v1/evaluations", json=body or SUBMIT, headers=headers
    ) as response:
        return response.status, await response.json()


async def _get(
    http: aiohttp.ClientSession, url: str, evaluation_id: str, wait: float = 0
) -> dict[str, Any]:
    async with http.get(
        f"{url}/v1/evaluations/{evaluation_id}", params={"wait": str(wait)}
    ) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def _wait_until_running(
    http: aiohttp.ClientSession, url: str, running: int
) -> None:
    for _ in range(500):
        async with http.get(f"{url}/healthz") as response:
            if (await response.json())["running"] >= running:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {running} evaluations running")


async def test_submit_then_long_poll_gives_the_outcome(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """POST /v1/evaluations answers 202 with an id; GET ?wait= returns the outcome."""
    async with start_server(datasets=[memory_dataset()]) as url:
        status, accepted = await _submit(http, url)
        assert status == 202
        assert accepted["status"] == "queued"

        view = await _get(http, url, accepted["id"], wait=30)
        assert view["status"] == "succeeded"
        assert view["request"]["dataset_name"] == "toy"
        assert view["request"]["split"] == "test"
        assert view["attempts"] == 1
        assert view["outcome"]["success"] is True
        assert view["outcome"]["reward"] == 1.0
        assert view["outcome"]["device"] in ("cpu:0", "cpu:1")


async def test_legacy_evaluate_v3_answers_the_flat_outcome(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """/evaluate_v3 blocks until done, ignores unknown keys and defaults the rest."""
    body = {"instance_id": "a", "container_id": "c-1", "mode": "benchmark", "x": 1}
    async with (
        start_server(datasets=[memory_dataset()]) as url,
        http.post(f"{url}/evaluate_v3", json=body) as response,
    ):
        outcome = await response.json()

    assert response.status == 200
    assert outcome["success"] is True
    assert outcome["speedup"] == pytest.approx(1.0)
    assert 0 < outcome["reward"] <= 1
    for key in ("error", "error_detail", "build_output", "exit_code", "timed_out"):
        assert key in outcome
    assert "gpu_id" in outcome and "stdout" in outcome and "stderr" in outcome


async def test_legacy_call_needs_dataset_name_when_several_are_served(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Without dataset_name and with two datasets served, the answer names the field."""
    datasets = [memory_dataset("one"), memory_dataset("two")]
    async with start_server(datasets=datasets) as url:
        async with http.post(f"{url}/evaluate_v3", json=SUBMIT) as response:
            assert response.status == 400
            error = await response.json()
        assert error["success"] is False
        assert error["field"] == "dataset_name"

        named = {**SUBMIT, "dataset_name": "two"}
        async with http.post(f"{url}/evaluate_v3", json=named) as response:
            assert response.status == 200
            assert (await response.json())["success"] is True


async def test_unknown_instance_dataset_and_container_are_refused_at_submit(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Submits naming nothing served get 404s (or 400 for a malformed id)."""
    cases = [
        ({**SUBMIT, "instance_id": "zz"}, 404, "instance_not_found", "instance_id"),
        ({**SUBMIT, "dataset_name": "zz"}, 404, "instance_not_found", "dataset_name"),
        ({**SUBMIT, "split": "train"}, 404, "instance_not_found", "instance_id"),
        ({**SUBMIT, "container_id": "../x"}, 400, "invalid_request", "container_id"),
    ]
    async with start_server(datasets=[memory_dataset()]) as url:
        for body, status, error, field in cases:
            got_status, answer = await _submit(http, url, body)
            assert (got_status, answer["error"], answer["field"]) == (
                status,
                error,
                field,
            ), body


async def test_unknown_container_is_refused_when_the_backend_knows_only_its_own(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With the local backend an id never created gets 404 container_not_found."""
    async with start_server(datasets=[memory_dataset()], backend="local") as url:
        status, answer = await _submit(http, url, {**SUBMIT, "container_id": "nope"})
    assert status == 404
    assert answer["error"] == "container_not_found"
    assert answer["field"] == "container_id"


async def test_a_batch_refuses_only_the_items_whose_container_is_unknown(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Unknown, repeated and bad container ids in one batch each get their own
    answer; the good submissions around them are accepted and graded."""
    async with start_server(datasets=[memory_dataset()], backend="local") as url:
        async with http.post(f"{url}/v1/containers", json={"instance_id": "a"}) as made:
            container = (await made.json())["container_id"]
        status, answer = await _batch(
            http,
            url,
            [
                {**SUBMIT, "container_id": container, "idempotency_key": "k1"},
                {**SUBMIT, "container_id": "nope", "idempotency_key": "k2"},
                {**SUBMIT, "container_id": "../x", "idempotency_key": "k3"},
                {**SUBMIT, "container_id": "nope", "idempotency_key": "k4"},
                {**SUBMIT, "container_id": container, "idempotency_key": "k5"},
            ],
        )
        assert status == 200
        items = answer["results"]
        assert [item["status_code"] for item in items] == [202, 404, 400, 404, 202]
        assert {items[1]["error"]["error"], items[3]["error"]["error"]} == {
            "container_not_found"
        }
        assert items[2]["error"]["field"] == "container_id"
        for item in (items[0], items[4]):
            view = await _get(http, url, item["accepted"]["id"], wait=60)
            assert view["status"] == "succeeded", view


async def test_same_idempotency_key_returns_the_same_evaluation_once(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Repeated and concurrent submits with one key make one evaluation."""
    async with start_server(datasets=[memory_dataset()]) as url:
        results = await asyncio.gather(
            *(_submit(http, url, **{"Idempotency-Key": "k-1"}) for _ in range(10))
        )
        assert sorted(status for status, _ in results) == [200] * 9 + [202]
        assert len({body["id"] for _, body in results}) == 1

        evaluation_id = results[0][1]["id"]
        await _get(http, url, evaluation_id, wait=30)
        status, again = await _submit(http, url, **{"Idempotency-Key": "k-1"})
        assert (status, again["id"], again["status"]) == (
            200,
            evaluation_id,
            "succeeded",
        )

        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert (
            'agent_v2_evaluations_finished_total{error="",status="succeeded"} 1.0'
            in (text)
        )


async def test_a_key_reused_for_another_submission_is_refused(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """A key first used for one body gets 409 with any other; nothing new runs."""
    key = {"Idempotency-Key": "k-reused"}
    async with start_server(datasets=[memory_dataset()]) as url:
        status, first = await _submit(http, url, SUBMIT, **key)
        assert status == 202

        # The dataset and split the server resolved may be named or left out.
        named = {**SUBMIT, "dataset_name": "toy", "split": "test"}
        status, same = await _submit(http, url, named, **key)
        assert (status, same["id"]) == (200, first["id"])

        for changed, field in [
            ({**SUBMIT, "mode": "build"}, "mode"),
            ({**SUBMIT, "container_id": "other"}, "container_id"),
            ({**SUBMIT, "timeout": 5}, "timeout"),
        ]:
            status, answer = await _submit(http, url, changed, **key)
            assert status == 409, changed
            assert answer["error"] == "idempotency_conflict"
            assert answer["field"] == "Idempotency-Key"
            assert field in answer["error_detail"]
            assert answer["id"] == first["id"]

        await _get(http, url, first["id"], wait=30)
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert (
            'agent_v2_evaluations_finished_total{error="",status="succeeded"} 1.0'
            in (text)
        )


async def _batch(
    http: aiohttp.ClientSession, url: str, evaluations: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{url}/v1/evaluations/batch", json={"evaluations": evaluations}
    ) as response:
        return response.status, await response.json()


async def test_a_batch_answers_each_submission_as_its_own_submit_would(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Each item gets its own status, in order; keys act as for single submits."""
    async with start_server(datasets=[memory_dataset()]) as url:
        status, first = await _submit(http, url, SUBMIT, **{"Idempotency-Key": "k0"})
        assert status == 202

        status, answer = await _batch(
            http,
            url,
            [
                {**SUBMIT, "idempotency_key": "k1"},
                {**SUBMIT, "instance_id": "zz", "idempotency_key": "k2"},
                {**SUBMIT, "idempotency_key": "k0"},  # submitted alone above
                {**SUBMIT, "mode": "build", "idempotency_key": "k0"},
                {**SUBMIT, "idempotency_key": "k1"},  # twice in one batch
                {**SUBMIT, "container_id": "c-2", "idempotency_key": "k3"},
            ],
        )
        assert status == 200
        items = answer["results"]
        assert [item["status_code"] for item in items] == [202, 404, 200, 409, 200, 202]
        assert items[1]["error"]["error"] == "instance_not_found"
        assert items[1]["error"]["field"] == "instance_id"
        assert items[2]["accepted"]["id"] == first["id"]
        assert items[3]["error"]["error"] == "idempotency_conflict"
        assert items[4]["accepted"]["id"] == items[0]["accepted"]["id"]

        for item in (items[0], items[5]):
            view = await _get(http, url, item["accepted"]["id"], wait=30)
            assert view["status"] == "succeeded"
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert (
            'agent_v2_evaluations_finished_total{error="",status="succeeded"} 3.0'
            in (text)
        )


async def test_a_batch_past_the_queue_limit_gets_429_items(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Submissions past max_queue get 429 with retry_after; the rest are kept."""
    async with start_server(
        datasets=[memory_dataset()], devices="cpu:1", dummy_latency=60, max_queue=2
    ) as url:
        evaluations = [
            {**SUBMIT, "container_id": f"c{i}", "idempotency_key": f"k{i}"}
            for i in range(6)
        ]
        status, answer = await _batch(http, url, evaluations)

    assert status == 200
    codes = [item["status_code"] for item in answer["results"]]
    # Accepted together, none has a device yet: two fill the queue.
    assert codes == [202, 202, 429, 429, 429, 429]
    refused = answer["results"][3]
    assert refused["error"]["error"] == "queue_full"
    assert refused["retry_after"] >= 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"evaluations": []}, "evaluations"),
        ({"evaluations": [{**SUBMIT}]}, "evaluations.0.idempotency_key"),
        (
            {"evaluations": [{**SUBMIT, "idempotency_key": "k", "mode": "x"}]},
            "evaluations.0.mode",
        ),
        (
            {"evaluations": [{**SUBMIT, "idempotency_key": "bad\nkey"}]},
            "evaluations.0.idempotency_key",
        ),
        (
            {
                "evaluations": [
                    {**SUBMIT, "container_id": f"c{i}", "idempotency_key": f"k{i}"}
                    for i in range(1001)
                ]
            },
            "evaluations",
        ),
    ],
)
async def test_a_bad_batch_is_refused_whole_naming_the_field(
    start_server: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    field: str,
) -> None:
    """A batch with one bad submission starts none and names what is wrong."""
    async with start_server(datasets=[memory_dataset()]) as url:
        async with http.post(f"{url}/v1/evaluations/batch", json=body) as response:
            status, answer = response.status, await response.json()
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()

    assert status == 400
    assert answer["error"] == "invalid_request"
    assert answer["field"] == field
    assert "agent_v2_evaluations_queued 0.0" in text


async def test_wait_many_returns_when_the_first_one_finishes(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """POST /v1/evaluations/wait answers with the finished ones as soon as one is."""
    async with start_server(
        datasets=[memory_dataset()], devices="cpu:1", dummy_latency=0.2
    ) as url:
        ids = [(await _submit(http, url))[1]["id"] for _ in range(3)]
        body = {"ids": [*ids, "no-such-id"], "timeout": 60}
        async with http.post(f"{url}/v1/evaluations/wait", json=body) as response:
            assert response.status == 200
            answer = await response.json()

    finished = [view["id"] for view in answer["evaluations"]]
    assert finished and finished[0] == ids[0]
    assert all(view["status"] == "succeeded" for view in answer["evaluations"])
    assert set(finished) | set(answer["pending"]) == set(ids)
    assert answer["unknown"] == ["no-such-id"]


async def test_waits_time_out_with_nothing_finished(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Long polls on an evaluation that does not finish answer at their timeout."""
    async with start_server(datasets=[memory_dataset()], dummy_latency=60) as url:
        _, accepted = await _submit(http, url)
        body = {"ids": [accepted["id"]], "timeout": 0.2}
        async with http.post(f"{url}/v1/evaluations/wait", json=body) as response:
            answer = await response.json()
        assert answer == {"evaluations": [], "pending": [accepted["id"]], "unknown": []}

        view = await _get(http, url, accepted["id"], wait=0.2)
        assert view["status"] in ("queued", "running")
        assert view["outcome"] is None


async def test_cancel_kills_a_running_evaluation(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """DELETE ends a running evaluation as cancelled and frees its device."""
    async with start_server(
        datasets=[memory_dataset()], devices="cpu:1", dummy_latency=60
    ) as url:
        _, running = await _submit(http, url)
        await _wait_until_running(http, url, 1)
        _, queued = await _submit(http, url)

        for evaluation_id in (running["id"], queued["id"]):
            async with http.delete(f"{url}/v1/evaluations/{evaluation_id}") as response:
                assert response.status == 200
                view = await response.json()
            assert view["status"] == "cancelled"
            assert view["outcome"]["error"] == "cancelled"

        async with http.get(f"{url}/healthz") as response:
            health = await response.json()
        assert (health["queued"], health["running"], health["devices_free"]) == (
            0,
            0,
            1,
        )

        async with http.delete(f"{url}/v1/evaluations/{running['id']}") as response:
            assert response.status == 200  # cancelling again changes nothing
            assert (await response.json())["status"] == "cancelled"
        async with http.delete(f"{url}/v1/evaluations/nope") as response:
            assert response.status == 404
            assert (await response.json())["error"] == "not_found"


async def test_a_full_queue_answers_429_with_retry_after(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Past max_queue waiting evaluations, submits get 429 queue_full + Retry-After."""
    async with start_server(
        datasets=[memory_dataset()], devices="cpu:1", dummy_latency=60, max_queue=2
    ) as url:
        assert (await _submit(http, url))[0] == 202
        await _wait_until_running(http, url, 1)
        assert (await _submit(http, url))[0] == 202
        assert (await _submit(http, url))[0] == 202

        async with http.post(f"{url}/v1/evaluations", json=SUBMIT) as response:
            assert response.status == 429
            assert re.fullmatch(r"[1-9][0-9]*", response.headers["Retry-After"])
            answer = await response.json()
        assert answer["error"] == "queue_full"
        assert answer["success"] is False


async def test_healthz_metrics_and_openapi_answer(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """The operational endpoints answer with their documented shapes."""
    async with start_server(datasets=[memory_dataset()]) as url:
        async with http.get(f"{url}/healthz") as response:
            health = await response.json()
        assert health["status"] == "ok"
        assert health["backend"] == "dummy"
        assert health["devices_total"] == 2

        async with http.get(f"{url}/metrics") as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        for name in (
            "agent_v2_evaluations_queued",
            "agent_v2_evaluations_running",
            "agent_v2_device_leases_in_use",
            "agent_v2_evaluation_duration_seconds",
            'agent_v2_http_requests_total{method="GET",route="/healthz",status="200"}',
        ):
            assert name in text

        async with http.get(f"{url}/openapi.json") as response:
            document = await response.json()
        assert document["openapi"].startswith("3.1")


async def test_openapi_describes_exactly_the_routes_served(
    start_server: Any,
    memory_dataset: Any,
    server_settings: Any,
    http: aiohttp.ClientSession,
) -> None:
    """Every routed (method, path) is in /openapi.json, and nothing else is."""
    settings = server_settings(datasets=[memory_dataset()])
    routed = {
        (route.method.lower(), route.resource.canonical)
        for route in create_app(settings).router.routes()
        if route.resource is not None
    }
    async with start_server(settings) as url, http.get(f"{url}/openapi.json") as r:
        document = await r.json()

    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert documented == routed

    submit = document["paths"]["/v1/evaluations"]["post"]
    assert {"200", "202", "400", "404", "413", "415", "429"} <= set(submit["responses"])
    assert "Retry-After" in submit["responses"]["429"]["headers"]
    assert [p["name"] for p in submit["parameters"]] == ["Idempotency-Key"]
    exec_ = document["paths"]["/v1/containers/{id}/exec"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in exec_["parameters"]]
    for schema in ("EvaluationRequest", "ErrorBody", "WaitResponse", "Outcome"):
        assert any(
            name.startswith(schema) for name in document["components"]["schemas"]
        )


async def test_token_guards_every_route_but_healthz(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With a token, requests without 'Bearer <token>' get 401 JSON; healthz is open."""
    async with start_server(datasets=[memory_dataset()], token="s3cret") as url:
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}):
            async with http.post(
                f"{url}/v1/evaluations", json=SUBMIT, headers=headers
            ) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
                answer = await response.json()
            assert answer["error"] == "unauthorized"
            assert "s3cret" not in answer["error_detail"]

        good = {"Authorization": "Bearer s3cret"}
        async with http.get(f"{url}/metrics", headers=good) as response:
            assert response.status == 200
        async with http.get(f"{url}/openapi.json", headers=good) as response:
            document = await response.json()
        assert "bearer" in document["components"]["securitySchemes"]


def test_settings_refuse_a_public_host_without_token(memory_dataset: Any) -> None:
    """Binding a non-loopback address needs a token; the token never shows in repr."""
    with pytest.raises(ConfigError, match="without a token"):
        ServerSettings(datasets=[memory_dataset()], host="0.0.0.0")

    settings = ServerSettings(datasets=[memory_dataset()], host="0.0.0.0", token="t0k")
    assert "t0k" not in repr(settings)
    assert "***" in repr(settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_queue", 0),
        ("port", 70000),
        ("backend", "nope"),
        ("devices", "tpu:1"),
        ("evaluation_timeout", -1),
        ("datasets", []),
    ],
)
def test_settings_validate_at_construction(
    memory_dataset: Any, field: str, value: Any
) -> None:
    """Bad settings fail when built, with the offending field named."""
    fields: dict[str, Any] = {"datasets": [memory_dataset()], field: value}
    with pytest.raises(ConfigError):
        ServerSettings(**fields)


async def test_shutdown_answers_legacy_waiters_503_and_keeps_the_evaluation(
    start_server: Any,
    server_settings: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    """Stopping the server ends blocked legacy calls with 503; the evaluation
    stays in the store and finishes after the next start."""
    store = tmp_path / "shared.sqlite3"
    slow = server_settings(
        datasets=[memory_dataset()], store_path=store, dummy_latency=60
    )
    async with start_server(slow) as url:
        legacy = asyncio.create_task(http.post(f"{url}/evaluate_v3", json=SUBMIT))
        await _wait_until_running(http, url, 1)
    response = await legacy
    answer = await response.json()
    response.release()
    assert response.status == 503
    assert answer["error"] == "shutting_down"

    fast = server_settings(datasets=[memory_dataset()], store_path=store)
    async with start_server(fast) as url:
        body = {"ids": [answer["id"]], "timeout": 60}
        async with http.post(f"{url}/v1/evaluations/wait", json=body) as r:
            waited = await r.json()
    assert [view["status"] for view in waited["evaluations"]] == ["succeeded"]
    assert waited["evaluations"][0]["attempts"] == 2


def test_the_server_package_exports_these_names() -> None:
    """agent_v2.server's public surface is pinned."""
    assert sorted(agent_v2.server.__all__) == [
        "DevicePool",
        "EvaluationRecord",
        "EvaluationStore",
        "GradeFunction",
        "ServerSettings",
        "create_app",
        "make_backend",
        "parse_devices",
        "run_server",
        "serve",
    ]
