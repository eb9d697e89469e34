"""End-to-end grading through the server: real C code, local backend, timeouts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FAST_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    return total;
}
"""

SLOWER_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int repeat = 0; repeat < 64; repeat++) { /* four times the original work */
        total = 0;
        for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    }
    return total;
}
"""

WRONG_KERNEL = FAST_KERNEL.replace("return total;", "return total + 1;")


async def _evaluate(
    http: aiohttp.ClientSession,
    url: str,
    files: dict[str, str],
    mode: str = "benchmark",
) -> dict[str, Any]:
    """Create a container, write ``files`` into it, grade it; return the outcome."""
    body = {"instance_id": "sum_squares", "dataset_name": "csum"}
    async with http.post(f"{url}/v1/containers", json=body) as response:
        container_id = (await response.json())["container_id"]
    for name, text in files.items():
        async with http.post(
            f"{url}/v1/containers/{container_id}/exec",
            json={"command": f"cat > {name}", "stdin": text},
        ) as response:
            assert (await response.json())["exit_code"] == 0

    request = {"instance_id": "sum_squares", "container_id": container_id, "mode": mode}
    async with http.post(f"{url}/evaluate_v3", json=request) as response:
        assert response.status == 200
        outcome: dict[str, Any] = await response.json()
        return outcome


@pytest.fixture
async def c_server(start_server: Any, c_dataset: Path) -> Any:
    async with start_server(
        datasets=[f"csum={c_dataset}"], backend="local", devices="cpu:1"
    ) as url:
        yield url


async def test_a_faster_correct_change_earns_speedup_and_reward(
    c_server: str, http: aiohttp.ClientSession
) -> None:
    """Removing the wasted work: success, speedup > 1, reward above the base."""
    outcome = await _evaluate(http, c_server, {"kernel.c": FAST_KERNEL})

    assert outcome["success"] is True, outcome
    assert outcome["error"] is None
    assert outcome["speedup"] > 1
    assert outcome["reward"] > 0.1
    assert outcome["device"] == "cpu:0"
    assert "BM_sum_squares" in outcome["benchmarks"]


async def test_a_slower_correct_change_earns_only_the_base_reward(
    c_server: str, http: aiohttp.ClientSession
) -> None:
    """A correct change that is 4 times slower: success, speedup < 1, base reward."""
    outcome = await _evaluate(http, c_server, {"kernel.c": SLOWER_KERNEL})

    assert outcome["success"] is True, outcome
    assert outcome["speedup"] < 1
    assert outcome["reward"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"kernel.c": "this is not C"}, "build_failed"),
        ({"kernel.c": WRONG_KERNEL}, "tests_failed"),
        (
            {"kernel.c": WRONG_KERNEL, "test_main.c": "int main(void){return 0;}\n"},
            "tests_failed",
        ),
    ],
    ids=["does-not-build", "fails-tests", "edits-its-tests"],
)
async def test_broken_changes_earn_nothing(
    c_server: str, http: aiohttp.ClientSession, files: dict[str, str], error: str
) -> None:
    """Changes that do not build or fail the (restored) tests get reward 0."""
    outcome = await _evaluate(http, c_server, files)

    assert outcome["success"] is False
    assert outcome["error"] == error
    assert outcome["reward"] == 0.0
    assert outcome["speedup"] == -1.0
    assert outcome["infra_failure"] is False
    if "test_main.c" in files:
        assert outcome["protected_files_restored"] == ["test_main.c"]


async def test_test_mode_passes_unchanged_code_with_reward_one(
    c_server: str, http: aiohttp.ClientSession
) -> None:
    """Test mode on the unmodified instance: reward 1.0 and speedup -1.0."""
    outcome = await _evaluate(http, c_server, {}, mode="test")

    assert (outcome["success"], outcome["reward"], outcome["speedup"]) == (
        True,
        1.0,
        -1.0,
    )


async def test_an_evaluation_past_its_timeout_is_killed_and_timed_out(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """A test command that runs forever ends as timed_out at the request's timeout."""
    dataset = memory_dataset(test_command="sleep 60")
    async with start_server(datasets=[dataset], backend="local") as url:
        async with http.post(f"{url}/v1/containers", json={"instance_id": "a"}) as r:
            container_id = (await r.json())["container_id"]
        request = {
            "instance_id": "a",
            "container_id": container_id,
            "mode": "test",
            "timeout": 1,
        }
        async with http.post(f"{url}/evaluate_v3", json=request) as response:
            outcome = await response.json()

    assert outcome["success"] is False
    assert outcome["timed_out"] is True
    assert outcome["error"] == "timed_out"


async def test_no_free_device_before_the_acquire_timeout_is_device_unavailable(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With the only device busy, gpu_acquire_timeout ends in device_unavailable."""
    async with start_server(
        datasets=[memory_dataset()], devices="cpu:1", dummy_latency=60
    ) as url:
        busy = {"instance_id": "a", "container_id": "c-1"}
        async with http.post(f"{url}/v1/evaluations", json=busy) as response:
            busy_id = (await response.json())["id"]

        waiting = {**busy, "gpu_acquire_timeout": 0.3}
        async with http.post(f"{url}/evaluate_v3", json=waiting) as response:
            outcome = await response.json()
        async with http.delete(f"{url}/v1/evaluations/{busy_id}"):
            pass

    assert outcome["success"] is False
    assert outcome["error"] == "device_unavailable"
    assert outcome["infra_failure"] is True


async def _evaluate_memory_instance(
    http: aiohttp.ClientSession, url: str
) -> dict[str, Any]:
    """Grade instance ``a`` of a memory dataset in test mode; return the outcome."""
    async with http.post(f"{url}/v1/containers", json={"instance_id": "a"}) as r:
        container_id = (await r.json())["container_id"]
    request = {"instance_id": "a", "container_id": container_id, "mode": "test"}
    async with http.post(f"{url}/evaluate_v3", json=request) as response:
        outcome: dict[str, Any] = await response.json()
        return outcome


async def test_a_gpu_lease_sets_visible_devices_for_the_commands(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With gpu:3, commands see CUDA/HIP_VISIBLE_DEVICES=3 and gpu_id is 3."""
    check = 'test "$CUDA_VISIBLE_DEVICES" = 3 && test "$HIP_VISIBLE_DEVICES" = 3'
    dataset = memory_dataset(test_command=check)
    async with start_server(
        datasets=[dataset], backend="local", devices="gpu:3"
    ) as url:
        outcome = await _evaluate_memory_instance(http, url)

    assert outcome["success"] is True, outcome
    assert (outcome["gpu_id"], outcome["device"]) == (3, "gpu:3")


async def test_a_cpu_slot_pins_the_commands_to_its_cores(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With one slot per core, every command of an evaluation runs on one core."""
    cores = len(os.sched_getaffinity(0))
    dataset = memory_dataset(test_command='test "$(nproc)" = 1')
    async with start_server(
        datasets=[dataset], backend="local", devices=f"cpu:{cores}"
    ) as url:
        outcome = await _evaluate_memory_instance(http, url)

    assert outcome["success"] is True, outcome
    assert outcome["gpu_id"] is None
