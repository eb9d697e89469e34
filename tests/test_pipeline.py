"""Tests for the grading pipeline on real C instances and the local backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_v2._devices import DeviceLease
from agent_v2.datasets import Dataset, Instance, bundled_dataset_path, load_dataset
from agent_v2.evaluation import (
    MemoryBaselineCache,
    _pipeline,
    baseline_key,
    grade,
    instance_digest,
)
from agent_v2.protocol import Mode, Outcome
from agent_v2.sandbox import BASE_REF, Isolation, LocalBackend

CPU = DeviceLease(kind="cpu", name="cpu:0")
WORK = 3_000_000  # LCG steps per pass: 4 passes take a few tens of milliseconds

# The instance: checksum() repeats its work PASSES times; fewer passes give the
# same result faster, more give it slower.
KERNEL = """\
#define PASSES {passes}
unsigned long long checksum(unsigned long n)
{{
    unsigned long long result = 0;
    for (int pass = 0; pass < PASSES; pass++) {{
        unsigned long long x = 1, sum = 0;
        for (unsigned long i = 0; i < n; i++) {{
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            sum += x >> 33;
        }}
        result = sum{tamper};
    }}
    return result;
}}
"""

MAIN = """\
#include <stdio.h>
#include <stdlib.h>
unsigned long long checksum(unsigned long n);
int main(int argc, char **argv)
{
    printf("%llu\\n", checksum(strtoul(argv[1], NULL, 10)));
    return 0;
}
"""

BENCH = """\
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <time.h>
unsigned long long checksum(unsigned long n);
static volatile unsigned long long sink;
static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
int main(void)
{
    double times[5];
    printf("some log line {not json}\\n{\\n \\"benchmarks\\": [\\n");
    sink = checksum(@WORK@);
    for (int r = 0; r < 5; r++) {
        double start = now_ms();
        sink = checksum(@WORK@);
        times[r] = now_ms() - start;
        printf("  {\\"name\\": \\"BM_checksum\\", \\"run_type\\": \\"iteration\\", "
               "\\"real_time\\": %f, \\"time_unit\\": \\"ms\\"},\\n", times[r]);
    }
    for (int i = 1; i < 5; i++)
        for (int j = i; j > 0 && times[j - 1] > times[j]; j--) {
            double t = times[j];
            times[j] = times[j - 1];
            times[j - 1] = t;
        }
    printf("  {\\"name\\": \\"BM_checksum_median\\", "
           "\\"run_name\\": \\"BM_checksum\\", \\"run_type\\": \\"aggregate\\", "
           "\\"aggregate_name\\": \\"median\\", "
           "\\"real_time\\": %f, \\"time_unit\\": \\"ms\\"}\\n ]\\n}\\n", times[2]);
    return 0;
}
""".replace("@WORK@", str(WORK))


def _checksum(n: int) -> int:
    """Compute what checksum(n) returns, to write the instance's tests."""
    mask = 2**64 - 1
    x, total = 1, 0
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & mask
        total = (total + (x >> 33)) & mask
    return total


TEST_SH = f"""\
#!/bin/sh
[ "$(./main 10)" = "{_checksum(10)}" ] || {{ echo "checksum(10) is wrong"; exit 1; }}
[ "$(./main 1000)" = "{_checksum(1000)}" ] || {{ echo "checksum(1000) wrong"; exit 1; }}
echo "tests passed"
"""


def _kernel(passes: int = 4, tamper: str = "") -> str:
    return KERNEL.format(passes=passes, tamper=tamper)


def _hang() -> str:
    """Return a kernel that never returns."""
    declaration = "    unsigned long long result = 0;"
    return _kernel().replace(declaration, f"    for (;;);\n{declaration}")


def _make_dataset(
    root: Path,
    *,
    policy: str = "restore",
    bench_marker: Path | None = None,
    record: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Dataset:
    """Write the instance's files and a manifest under ``root``; load it."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    sources = {"kernel.c": _kernel(), "main.c": MAIN, "bench.c": BENCH}
    for name, text in {**sources, "test.sh": TEST_SH, **(files or {})}.items():
        (repo / name).write_text(text)

    benchmark = "./bench"
    if bench_marker is not None:
        benchmark = f"echo run >> {bench_marker} && ./bench"
    manifest = {
        "defaults": {
            "build_command": "cc -O0 -o main main.c kernel.c"
            " && cc -O0 -o bench bench.c kernel.c",
            "test_command": "sh test.sh",
            "benchmark_command": benchmark,
            "protected_files": ["test.sh", "bench.c", "main.c"],
        },
        "reward_policy": {"base": 0.1, "target_speedup": 4.0},
        "protected_files_policy": policy,
        "instances": [
            {"instance_id": "checksum", "repo_path": "repo", **(record or {})}
        ],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(manifest))
    return load_dataset("pipeline", path)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(tmp_path / "work")
    await local.open()
    try:
        yield local
    finally:
        await local.close()


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    return _make_dataset(tmp_path / "dataset")


def _instance(dataset: Dataset) -> Instance:
    return dataset.get("checksum")


async def _container(backend: LocalBackend, instance: Instance, **files: str) -> str:
    """Create the agent's container and write the files the agent changed."""
    container_id = await backend.create(instance)
    for name, text in files.items():
        result = await backend.exec(
            container_id, f"cat > {name}", stdin=text.encode(), timeout=30
        )
        assert result.ok, result.stderr
    return container_id


async def _grade(
    backend: LocalBackend,
    dataset: Dataset,
    container_id: str,
    *,
    mode: Mode = Mode.BENCHMARK,
    time_limit: float = 90.0,
    cache: MemoryBaselineCache | None = None,
    lease: DeviceLease = CPU,
) -> Outcome:
    return await grade(
        backend=backend,
        dataset=dataset,
        instance=_instance(dataset),
        container_id=container_id,
        mode=mode,
        lease=lease,
        timeout=time_limit,
        baselines=cache if cache is not None else MemoryBaselineCache(),
    )


async def test_faster_correct_change_gets_speedup_and_reward(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """A change doing 4x less work, same result: speedup > 1 and reward > 0.1."""
    cid = await _container(backend, _instance(dataset), **{"kernel.c": _kernel(1)})

    outcome = await _grade(backend, dataset, cid)

    assert outcome.success, outcome.error_detail
    assert outcome.error is None and not outcome.infra_failure
    assert outcome.speedup > 1.5
    assert outcome.reward > 0.1
    assert outcome.reward == dataset.reward_policy.reward(outcome.speedup)
    assert set(outcome.benchmarks) == {"BM_checksum"}
    assert outcome.exit_code == 0
    assert "BM_checksum" in outcome.stdout
    assert outcome.mode is Mode.BENCHMARK and outcome.device == "cpu:0"
    assert {"build", "tests", "benchmark", "baseline", "total"} <= set(outcome.timings)
    assert outcome.protected_files_restored == []


async def test_slower_change_gets_speedup_below_one(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """A correct change doing 2x more work gets speedup < 1 and the base reward."""
    cid = await _container(backend, _instance(dataset), **{"kernel.c": _kernel(8)})

    outcome = await _grade(backend, dataset, cid)

    assert outcome.success, outcome.error_detail
    assert outcome.speedup < 0.9
    assert outcome.reward == pytest.approx(dataset.reward_policy.base)


async def test_change_that_does_not_build(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """A syntax error ends in build_failed, the compiler output in build_output."""
    broken = _kernel().replace("return result;", "return result")
    cid = await _container(backend, _instance(dataset), **{"kernel.c": broken})

    outcome = await _grade(backend, dataset, cid)

    assert not outcome.success
    assert outcome.error == "build_failed"
    assert not outcome.infra_failure
    assert outcome.exit_code not in (0, None)
    assert "error" in outcome.build_output
    assert (outcome.reward, outcome.speedup) == (0.0, -1.0)
    assert "tests" not in outcome.timings


async def test_change_that_fails_tests(backend: LocalBackend, dataset: Dataset) -> None:
    """A wrong result ends in tests_failed, with the tests' output."""
    wrong = _kernel(1, tamper=" + 1")
    cid = await _container(backend, _instance(dataset), **{"kernel.c": wrong})

    outcome = await _grade(backend, dataset, cid)

    assert outcome.error == "tests_failed"
    assert not outcome.infra_failure
    assert outcome.exit_code == 1
    assert "checksum(10) is wrong" in outcome.stdout
    assert (outcome.reward, outcome.speedup) == (0.0, -1.0)


async def test_edited_tests_are_restored_then_fail(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """Edited tests and a deleted protected file are restored; the tests then fail."""
    files = {"kernel.c": _kernel(1, tamper=" + 1"), "test.sh": "exit 0\n"}
    cid = await _container(backend, _instance(dataset), **files)
    await backend.exec(cid, "rm main.c && git add -A && git commit -qm x", timeout=30)

    outcome = await _grade(backend, dataset, cid)

    assert outcome.protected_files_restored == ["main.c", "test.sh"]
    assert outcome.error == "tests_failed"
    assert "protected_files" in outcome.timings
    check = await backend.exec(
        cid, "git diff --stat agent-v2-base -- test.sh main.c", timeout=30
    )
    assert check.stdout == ""


async def test_edited_tests_fail_under_the_fail_policy(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """With policy ``fail`` an edited test ends in protected_files_modified."""
    dataset = _make_dataset(tmp_path / "strict", policy="fail")
    cid = await _container(backend, _instance(dataset), **{"test.sh": "exit 0\n"})

    outcome = await _grade(backend, dataset, cid, mode=Mode.TEST)

    assert outcome.error == "protected_files_modified"
    assert not outcome.infra_failure
    assert "test.sh" in (outcome.error_detail or "")
    assert "build" not in outcome.timings


async def test_unchanged_protected_files_are_left_alone(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """Test mode on the unmodified instance: reward 1.0, speedup -1, no restore."""
    cid = await _container(backend, _instance(dataset))

    outcome = await _grade(backend, dataset, cid, mode=Mode.TEST)

    assert outcome.success
    assert (outcome.reward, outcome.speedup) == (1.0, -1.0)
    assert outcome.protected_files_restored == []
    assert "tests passed" in outcome.stdout
    assert "benchmark" not in outcome.timings


async def test_build_mode_rewards_a_build(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """Build mode stops after the build; a build that works earns 1.0."""
    wrong = _kernel(1, tamper=" + 1")
    cid = await _container(backend, _instance(dataset), **{"kernel.c": wrong})

    outcome = await _grade(backend, dataset, cid, mode=Mode.BUILD)

    assert outcome.success
    assert (outcome.reward, outcome.speedup) == (1.0, -1.0)
    assert outcome.mode is Mode.BUILD
    assert set(outcome.timings) == {"protected_files", "build", "total"}


async def test_timeout_kills_and_reports_timed_out(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """A hanging test run past the evaluation timeout ends in timed_out."""
    cid = await _container(backend, _instance(dataset), **{"kernel.c": _hang()})

    outcome = await _grade(backend, dataset, cid, time_limit=3.0)

    assert outcome.error == "timed_out"
    assert outcome.timed_out
    assert not outcome.infra_failure
    assert "tests" in (outcome.error_detail or "")
    assert outcome.timings["total"] < 30  # generous: the machine is shared


async def test_missing_container(backend: LocalBackend, dataset: Dataset) -> None:
    """An unknown container id ends in container_not_found, not the system's fault."""
    outcome = await _grade(backend, dataset, "local-0000")

    assert outcome.error == "container_not_found"
    assert not outcome.infra_failure
    assert "local-0000" in (outcome.error_detail or "")


async def test_malformed_container_id(backend: LocalBackend, dataset: Dataset) -> None:
    """A container id that could escape the workdir ends in invalid_request."""
    outcome = await _grade(backend, dataset, "../etc")

    assert outcome.error == "invalid_request"
    assert not outcome.infra_failure


async def test_benchmark_crash_is_the_agents_fault(
    backend: LocalBackend, dataset: Dataset
) -> None:
    """A kernel that passes tests but crashes the benchmark: benchmark_failed."""
    crash = _kernel(1).replace(
        "    unsigned long long result = 0;",
        "    unsigned long long result = 0;\n    if (n > 100000) return *(volatile"
        " unsigned long long *)0;",
    )
    cid = await _container(backend, _instance(dataset), **{"kernel.c": crash})

    outcome = await _grade(backend, dataset, cid)

    assert outcome.error == "benchmark_failed"
    assert not outcome.infra_failure
    assert outcome.exit_code not in (0, None)


async def test_baseline_that_cannot_build_is_the_systems_fault(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """When the unmodified code fails to build, the failure is infra_failure."""
    dataset = _make_dataset(
        tmp_path / "bad-base", files={"kernel.c": "this is not C\n"}
    )
    cid = await _container(backend, _instance(dataset), **{"kernel.c": _kernel(1)})

    outcome = await _grade(backend, dataset, cid)

    assert outcome.error == "benchmark_failed"
    assert outcome.infra_failure
    assert "baseline" in (outcome.error_detail or "")


async def test_benchmark_mode_without_benchmark_command(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """An instance without benchmark_command cannot be graded in benchmark mode."""
    dataset = _make_dataset(tmp_path / "nobench", record={"benchmark_command": None})
    cid = await _container(backend, _instance(dataset))

    outcome = await _grade(backend, dataset, cid)

    assert outcome.error == "benchmark_failed"
    assert outcome.infra_failure
    assert "no benchmark_command" in (outcome.error_detail or "")


async def test_lease_environment_and_gpu_reach_the_commands(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """Commands get the lease's env; the outcome names the GPU."""
    record = {"test_command": 'test "$CUDA_VISIBLE_DEVICES" = 3 && sh test.sh'}
    dataset = _make_dataset(tmp_path / "gpu", record=record)
    lease = DeviceLease(
        kind="gpu", name="gpu:3", gpu_id=3, env={"CUDA_VISIBLE_DEVICES": "3"}
    )
    cid = await _container(backend, _instance(dataset))

    outcome = await _grade(backend, dataset, cid, mode=Mode.TEST, lease=lease)

    assert outcome.success, outcome.error_detail
    assert (outcome.gpu_id, outcome.device) == (3, "gpu:3")


async def test_lease_cores_pin_the_commands(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """Commands run on the lease's cores only."""
    dataset = _make_dataset(tmp_path / "pinned", record={"test_command": "nproc"})
    lease = DeviceLease(kind="cpu", name="cpu:0", cpus=frozenset({0}))
    cid = await _container(backend, _instance(dataset))

    outcome = await _grade(backend, dataset, cid, mode=Mode.TEST, lease=lease)

    assert outcome.success, outcome.error_detail
    assert outcome.stdout.strip() == "1"


async def test_baseline_is_measured_once(tmp_path: Path) -> None:
    """Concurrent and later evaluations of one instance share one baseline run."""
    # NOTE: the marker lies outside every container, where a confined command
    # cannot write; this test is about caching, so it runs unconfined.
    backend = LocalBackend(tmp_path / "work", isolation=Isolation(enabled=False))
    await backend.open()
    try:
        await _check_baseline_once(backend, tmp_path)
    finally:
        await backend.close()


async def _check_baseline_once(backend: LocalBackend, tmp_path: Path) -> None:
    """Grade three containers of one instance; count the benchmark runs."""
    marker = tmp_path / "benchmark-runs"
    dataset = _make_dataset(tmp_path / "once", bench_marker=marker)
    instance = _instance(dataset)
    cache = MemoryBaselineCache()
    cids = [await _container(backend, instance) for _ in range(3)]

    outcomes = await asyncio.gather(
        *(_grade(backend, dataset, cid, cache=cache) for cid in cids[:2])
    )
    outcomes.append(await _grade(backend, dataset, cids[2], cache=cache))

    assert all(outcome.success for outcome in outcomes), outcomes
    assert marker.read_text().count("run") == 3 + 1  # 3 candidates, 1 baseline
    key = baseline_key(dataset, instance, CPU, instance_digest(instance))
    assert await cache.get_baseline(key) is not None
    assert sum("baseline" in outcome.timings for outcome in outcomes) >= 1
    assert "baseline" not in outcomes[2].timings


async def test_an_edited_instance_measures_its_baseline_again(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """The same dataset loaded again reuses its baseline; once the instance's
    files change, the baseline is measured anew, not taken from the cache."""
    root = tmp_path / "edited"
    cache = MemoryBaselineCache()

    async def grade_fresh(dataset: Dataset) -> Outcome:
        container_id = await _container(backend, _instance(dataset))
        return await _grade(backend, dataset, container_id, cache=cache)

    first = await grade_fresh(_make_dataset(root))
    again = await grade_fresh(load_dataset("pipeline", root / "dataset.json"))
    (root / "repo" / "kernel.c").write_text(_kernel(passes=5))
    edited = await grade_fresh(load_dataset("pipeline", root / "dataset.json"))

    assert all(o.success for o in (first, again, edited)), (first, again, edited)
    measured = ["baseline" in o.timings for o in (first, again, edited)]
    assert measured == [True, False, True]
    assert len(cache) == 2


async def test_cancellation_propagates(backend: LocalBackend, dataset: Dataset) -> None:
    """Cancelling a grade raises CancelledError instead of returning an outcome."""
    cid = await _container(backend, _instance(dataset), **{"kernel.c": _hang()})

    task = asyncio.create_task(_grade(backend, dataset, cid, mode=Mode.TEST))
    await asyncio.sleep(1.0)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task


def test_base_ref_matches_the_sandbox() -> None:
    """The pipeline compares with the same base tag every backend creates."""
    assert _pipeline._BASE_REF == BASE_REF


@pytest.mark.parametrize("instance_id", ["count_primes", "matmul"])
async def test_bundled_sample_instances_grade(
    backend: LocalBackend, instance_id: str
) -> None:
    """Each bundled sample instance, unmodified, grades in benchmark mode."""
    dataset = load_dataset("sample", bundled_dataset_path("sample"))
    instance = dataset.get(instance_id)
    cid = await backend.create(instance)

    outcome = await grade(
        backend=backend,
        dataset=dataset,
        instance=instance,
        container_id=cid,
        mode=Mode.BENCHMARK,
        lease=CPU,
        timeout=120.0,
        baselines=MemoryBaselineCache(),
    )

    assert outcome.success, outcome.error_detail
    assert outcome.speedup > 0
    assert len(outcome.benchmarks) == 2
    assert (
        "all tests passed" in (await backend.exec(cid, "sh test.sh", timeout=30)).stdout
    )


def _repetitions(*milliseconds: float) -> str:
    """Return Google Benchmark JSON of BM_x's repetitions and their median."""
    entries: list[dict[str, Any]] = [
        {"name": "BM_x", "run_type": "iteration", "real_time": ms, "time_unit": "ms"}
        for ms in milliseconds
    ]
    entries.append(
        {
            "name": "BM_x_median",
            "run_name": "BM_x",
            "run_type": "aggregate",
            "aggregate_name": "median",
            "real_time": sorted(milliseconds)[len(milliseconds) // 2],
            "time_unit": "ms",
        }
    )
    return json.dumps({"benchmarks": entries})


@pytest.mark.parametrize(("statistic", "expected"), [("median", 2.0), ("min", 0.5)])
async def test_the_dataset_chooses_the_benchmark_statistic(
    tmp_path: Path, backend: LocalBackend, statistic: str, expected: float
) -> None:
    """Baseline and candidate times are both taken with the dataset's statistic."""
    repo = tmp_path / "stat" / "repo"
    repo.mkdir(parents=True)
    (repo / "times.json").write_text(_repetitions(10, 40, 40))
    manifest = {
        "benchmark_statistic": statistic,
        "defaults": {"benchmark_command": "cat times.json"},
        "instances": [{"instance_id": "checksum", "repo_path": "repo"}],
    }
    path = tmp_path / "stat" / "dataset.json"
    path.write_text(json.dumps(manifest))
    dataset = load_dataset("stat", path)
    cid = await _container(
        backend, _instance(dataset), **{"times.json": _repetitions(20, 20, 20)}
    )

    outcome = await _grade(backend, dataset, cid)

    assert outcome.success, outcome.error_detail
    assert outcome.speedup == pytest.approx(expected)
