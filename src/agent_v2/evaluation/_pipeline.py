"""The grading pipeline: one evaluation of a container, from its build to a reward.

:func:`grade` runs the steps of a mode inside the agent's container through
a sandbox backend::

    check the container exists
    protected files: restore them from the base (or fail, per the dataset)
    build                                   every mode
    tests                                   test and benchmark modes
    benchmark, baseline, speedup, reward    benchmark mode

and turns what happened into an :class:`~agent_v2.protocol.Outcome`. The
agent's faults (a build that fails, tests that fail, a benchmark that
crashes) end with ``infra_failure`` false; the system's faults (a baseline
that cannot be measured, a sandbox that fails, a bug) with true.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
import weakref
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import TYPE_CHECKING, Protocol

from agent_v2.errors import ContainerNotFound, InvalidContainerId, SandboxError
from agent_v2.evaluation._benchmark import (
    BenchmarkOutputError,
    BenchmarkStatistic,
    parse_benchmark_output,
    speedup,
)
from agent_v2.evaluation._digest import instance_digest
from agent_v2.protocol import ErrorCode, Mode, Outcome

# NOTE: only for annotations: agent_v2.datasets imports agent_v2.evaluation
# (for the reward policy), and agent_v2.sandbox imports agent_v2.datasets, so
# importing either here at run time would be an import cycle.
if TYPE_CHECKING:
    from agent_v2._devices import DeviceLease
    from agent_v2.datasets import Dataset, Instance
    from agent_v2.sandbox import CommandResult, SandboxBackend

__all__ = [
    "OUTPUT_LIMIT",
    "BaselineCache",
    "MemoryBaselineCache",
    "baseline_key",
    "grade",
]

logger = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024
"""Characters kept of ``build_output``, ``stdout`` and ``stderr`` (the last ones)."""

INLINE_PARSE_CHARS = 16 * 1024
"""Benchmark output up to this size is parsed on the event loop."""

BACKEND_GRACE = 5.0
"""Seconds past the deadline we still wait for a backend call before giving up."""

_BASE_REF = "agent-v2-base"  # the tag every backend gives the base commit
# NOTE: the agent's own git configuration must not run code during grading
# (a post-checkout hook could rewrite the files just restored), and paths are
# literal: the loader checked that each protected path exists as written.
_GIT = "git --literal-pathspecs -c core.hooksPath=/dev/null"


class BaselineCache(Protocol):
    """Where measured baselines are kept between evaluations (the store)."""

    async def get_baseline(self, key: str) -> dict[str, float] | None:
        """Return the cached benchmark times (seconds by name), or None."""

    async def put_baseline(self, key: str, times: dict[str, float]) -> None:
        """Cache the benchmark times measured for ``key``."""


class MemoryBaselineCache:
    """A BaselineCache that lives as long as the object; for tests and scripts."""

    def __init__(self) -> None:
        self._times: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._times)

    async def get_baseline(self, key: str) -> dict[str, float] | None:
        """Return a copy of the cached times, or None."""
        times = self._times.get(key)
        return None if times is None else dict(times)

    async def put_baseline(self, key: str, times: dict[str, float]) -> None:
        """Keep a copy of the times."""
        self._times[key] = dict(times)


def baseline_key(
    dataset: Dataset, instance: Instance, lease: DeviceLease, digest: str
) -> str:
    """Return the cache key of an instance's baseline on a kind of device.

    ``digest`` is :func:`instance_digest` of the instance: an edited instance
    gets a new key, so times measured on its old files or commands are never
    reused.
    """
    key = f"{dataset.name}/{instance.split}/{instance.instance_id}/{lease.kind}"
    if dataset.benchmark_statistic is not BenchmarkStatistic.MEDIAN:
        key += f"/{dataset.benchmark_statistic}"  # times taken another way
    return f"{key}@{digest[:16]}"


async def grade(
    *,
    backend: SandboxBackend,
    dataset: Dataset,
    instance: Instance,
    container_id: str,
    mode: Mode,
    lease: DeviceLease,
    timeout: float,  # noqa: ASYNC109 - bounds the commands, which the backend kills
    baselines: BaselineCache,
) -> Outcome:
    """Grade the agent's container of ``instance`` in ``mode``; return the outcome.

    Every command runs with the lease's environment and cores, within what is
    left of ``timeout`` seconds. Failures become outcomes, never exceptions;
    only cancellation propagates (the backend kills the running commands).
    """
    grading = _Grading(
        backend=backend,
        dataset=dataset,
        instance=instance,
        container_id=container_id,
        mode=mode,
        lease=lease,
        timeout=timeout,
        baselines=baselines,
    )
    return await grading.run()


class _Failed(Exception):
    """Ends grading early with an error outcome."""

    def __init__(
        self,
        error: ErrorCode,
        detail: str,
        *,
        infra: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.infra = infra
        self.timed_out = timed_out


class _Grading:
    """One evaluation in progress: its inputs and what its steps found."""

    def __init__(
        self,
        *,
        backend: SandboxBackend,
        dataset: Dataset,
        instance: Instance,
        container_id: str,
        mode: Mode,
        lease: DeviceLease,
        timeout: float,
        baselines: BaselineCache,
    ) -> None:
        self.backend = backend
        self.dataset = dataset
        self.instance = instance
        self.container_id = container_id
        self.mode = Mode(mode)
        self.lease = lease
        self.timeout = timeout
        self.baselines = baselines

        self.deadline = asyncio.get_running_loop().time() + timeout
        self.timings: dict[str, float] = {}
        self.exit_code: int | None = None
        self.build_output = ""
        self.stdout = ""
        self.stderr = ""
        self.restored: list[str] = []
        self.benchmarks: dict[str, float] = {}

    async def run(self) -> Outcome:
        """Run the mode's steps and return the outcome, whatever happens."""
        started = time.monotonic()
        try:
            reward, value = await self._steps()
            outcome = self._outcome(None, reward=reward, speedup=value)
        except _Failed as failure:
            outcome = self._outcome(failure)
        except Exception as exc:
            outcome = self._outcome(self._unexpected(exc))
        outcome.timings["total"] = time.monotonic() - started
        return outcome

    async def _steps(self) -> tuple[float, float]:
        """Run the steps; return ``(reward, speedup)`` or raise _Failed."""
        await self._check_container()
        await self._protect_files()
        await self._build()
        if self.mode is Mode.BUILD:
            return 1.0, -1.0

        await self._test()
        if self.mode is Mode.TEST:
            return 1.0, -1.0

        value = await self._benchmark()
        return self.dataset.reward_policy.reward(value), value

    def _unexpected(self, exc: Exception) -> _Failed:
        """Return the failure for an exception no step turned into one."""
        if isinstance(exc, ContainerNotFound):
            return _Failed(ErrorCode.CONTAINER_NOT_FOUND, str(exc))
        if isinstance(exc, InvalidContainerId):
            return _Failed(ErrorCode.INVALID_REQUEST, str(exc))
        if isinstance(exc, SandboxError):
            logger.warning("sandbox error grading %s: %s", self.instance.key, exc)
            detail = f"sandbox error: {exc}"
            return _Failed(ErrorCode.INTERNAL_ERROR, detail, infra=True)

        logger.exception(
            "internal error grading %s in container %s",
            self.instance.key,
            self.container_id,
        )
        detail = f"internal error: {type(exc).__name__}: {exc}"
        return _Failed(ErrorCode.INTERNAL_ERROR, detail, infra=True)

    def _outcome(
        self, failure: _Failed | None, *, reward: float = 0.0, speedup: float = -1.0
    ) -> Outcome:
        """Return the outcome of a finished or failed evaluation."""
        return Outcome(
            success=failure is None,
            error=None if failure is None else failure.error.value,
            error_detail=None if failure is None else failure.detail,
            infra_failure=failure is not None and failure.infra,
            reward=reward,
            speedup=speedup,
            exit_code=self.exit_code,
            timed_out=failure is not None and failure.timed_out,
            gpu_id=self.lease.gpu_id,
            device=self.lease.name,
            mode=self.mode,
            build_output=self.build_output,
            stdout=self.stdout,
            stderr=self.stderr,
            protected_files_restored=self.restored,
            benchmarks=self.benchmarks,
            timings=dict(self.timings),
        )

    # -- steps ------------------------------------------------------------

    async def _check_container(self) -> None:
        """Fail with ``container_not_found`` unless the container exists."""
        async with self._bounded("container check"):
            found = await self.backend.exists(self.container_id)
        if not found:
            raise _Failed(
                ErrorCode.CONTAINER_NOT_FOUND,
                f"no container {self.container_id!r} in the {self.backend.kind} "
                "sandbox backend; submit the container_id the agent worked in",
            )

    async def _protect_files(self) -> None:
        """Put back every protected file the agent changed, or fail per policy."""
        # TODO(untrusted agents): git in the container is the agent's; one that
        # moves the base tag or rewrites protected files during the build goes
        # unnoticed. Comparing with the instance's own files would close this.
        paths = self.instance.protected_files
        if not paths:
            return
        with self._timed("protected_files"):
            changed = await self._changed_protected_files(paths)
            if not changed:
                return
            if self.dataset.protected_files_policy == "fail":
                raise _Failed(
                    ErrorCode.PROTECTED_FILES_MODIFIED,
                    f"the agent changed protected files {changed}; dataset "
                    f"{self.dataset.name!r} does not allow that",
                )
            await self._restore_protected_files(paths)
        self.restored = changed
        logger.debug("restored protected files %s of %s", changed, self.container_id)

    async def _changed_protected_files(self, paths: tuple[str, ...]) -> list[str]:
        """Return the protected files that differ from the base, or are new."""
        quoted = _quote(paths)
        script = (
            f"{_GIT} diff -z --name-only --no-renames {_BASE_REF} -- {quoted} && "
            f"{_GIT} ls-files -z --others --exclude-standard -- {quoted}"
        )
        result = await self._exec(self.container_id, script, "protected files")
        self._note_exit(result)
        self._check_time(result, "protected files")
        if not result.ok:
            raise _Failed(
                ErrorCode.PROTECTED_FILES_MODIFIED,
                f"could not compare the protected files with the base "
                f"{_BASE_REF!r} (git exited with code {result.exit_code}: "
                f"{_last_line(result.stderr)}); the container's git history "
                "must keep its base",
            )

        # NOTE: only entries inside the protected paths count, so noise on
        # stdout (a backend that prints anything) is never taken for a file.
        entries = {entry for entry in result.stdout.split("\0") if entry}
        return sorted(entry for entry in entries if _is_inside(entry, paths))

    async def _restore_protected_files(self, paths: tuple[str, ...]) -> None:
        """Make the protected paths exactly what the base has."""
        quoted = _quote(paths)
        script = (
            f"{_GIT} reset -q {_BASE_REF} -- {quoted} && "
            f"{_GIT} checkout {_BASE_REF} -- {quoted} && "
            f"{_GIT} clean -fdq -- {quoted}"
        )
        result = await self._exec(self.container_id, script, "protected files")
        self._note_exit(result)
        self._check_time(result, "protected files")
        if not result.ok:
            raise _Failed(
                ErrorCode.PROTECTED_FILES_MODIFIED,
                f"the agent changed protected files and restoring them from the "
                f"base failed (git exited with code {result.exit_code}: "
                f"{_last_line(result.stderr)})",
            )

    async def _build(self) -> None:
        """Run the build command; fail with ``build_failed`` when it fails."""
        command = self.instance.build_command
        if command is None:
            return
        with self._timed("build"):
            result = await self._exec(self.container_id, command, "build")
        self._note_exit(result)
        self.build_output = _tail(_joined(result.stdout, result.stderr))
        self._check_time(result, "build")
        if not result.ok:
            raise _Failed(
                ErrorCode.BUILD_FAILED,
                f"the build command exited with code {result.exit_code}; "
                "see build_output",
            )

    async def _test(self) -> None:
        """Run the tests; fail with ``tests_failed`` when they fail."""
        command = self.instance.test_command
        if command is None:
            return
        with self._timed("tests"):
            result = await self._exec(self.container_id, command, "tests")
        self._note_last_step(result)
        self._check_time(result, "tests")
        if not result.ok:
            raise _Failed(
                ErrorCode.TESTS_FAILED,
                f"the tests exited with code {result.exit_code}; see stdout and stderr",
            )

    async def _benchmark(self) -> float:
        """Benchmark the candidate, compare with the baseline; return the speedup."""
        command = self.instance.benchmark_command
        if command is None:
            raise _Failed(
                ErrorCode.BENCHMARK_FAILED,
                f"instance {self.instance.instance_id!r} of dataset "
                f"{self.dataset.name!r} has no benchmark_command, so it cannot be "
                "graded in benchmark mode; use mode 'test'",
                infra=True,
            )
        with self._timed("benchmark"):
            result = await self._exec(self.container_id, command, "benchmark")
        self._note_last_step(result)
        self._check_time(result, "benchmark")
        if not result.ok:
            raise _Failed(
                ErrorCode.BENCHMARK_FAILED,
                f"the benchmark command exited with code {result.exit_code}; "
                "see stdout and stderr",
            )
        candidate = await self._parse(result.stdout, "the benchmark output")

        baseline = await self._baseline()
        try:
            value, ratios = speedup(baseline, candidate)
        except BenchmarkOutputError as exc:
            raise _Failed(ErrorCode.BENCHMARK_FAILED, str(exc)) from None
        self.benchmarks = ratios
        return value

    # -- the baseline -------------------------------------------------------

    async def _baseline(self) -> dict[str, float]:
        """Return the cached baseline, measuring it first when nobody has."""
        key = baseline_key(
            self.dataset, self.instance, self.lease, await self._digest()
        )
        times = await self.baselines.get_baseline(key)
        if times is not None:
            return times

        with self._timed("baseline"):
            async with (
                self._bounded("baseline", infra=True),
                _BASELINE_LOCKS.hold((id(self.baselines), key)),
            ):
                # Another evaluation may have measured it while we waited.
                times = await self.baselines.get_baseline(key)
                if times is None:
                    times = await self._measure_baseline()
                    await self.baselines.put_baseline(key, times)
                    logger.info("measured baseline %s: %s", key, times)
        return times

    async def _digest(self) -> str:
        """Return the instance's digest, hashing its files once per loaded instance."""
        digest = _DIGESTS.get(self.instance)
        if digest is not None:
            return digest
        async with (
            self._bounded("baseline", infra=True),
            _DIGEST_LOCKS.hold(id(self.instance)),
        ):
            digest = _DIGESTS.get(self.instance)
            if digest is None:
                try:
                    digest = await asyncio.to_thread(instance_digest, self.instance)
                except OSError as exc:
                    raise _Failed(
                        ErrorCode.INTERNAL_ERROR,
                        f"cannot read the instance's files to key its baseline: {exc}",
                        infra=True,
                    ) from None
                _DIGESTS.put(self.instance, digest)
        return digest

    async def _measure_baseline(self) -> dict[str, float]:
        """Build and benchmark the unmodified instance in a fresh container."""
        container_id = await self.backend.create(self.instance)
        try:
            return await self._benchmark_fresh(container_id)
        except ContainerNotFound as exc:
            raise _Failed(
                ErrorCode.INTERNAL_ERROR,
                f"the baseline's container disappeared: {exc}",
                infra=True,
            ) from None
        finally:
            await self._remove_quietly(container_id)

    async def _benchmark_fresh(self, container_id: str) -> dict[str, float]:
        """Return the benchmark times of the unmodified code in ``container_id``."""
        build = self.instance.build_command
        if build is not None:
            result = await self._exec(container_id, build, "baseline build", True)
            self._check_time(result, "baseline build", infra=True)
            if not result.ok:
                raise _Failed(
                    ErrorCode.BENCHMARK_FAILED,
                    f"the unmodified code of the instance failed to build for "
                    f"the baseline (exit code {result.exit_code}): "
                    f"{_last_line(_joined(result.stdout, result.stderr))}",
                    infra=True,
                )

        assert self.instance.benchmark_command is not None  # _benchmark checked
        command = self.instance.benchmark_command
        result = await self._exec(container_id, command, "baseline benchmark", True)
        self._check_time(result, "baseline benchmark", infra=True)
        if not result.ok:
            raise _Failed(
                ErrorCode.BENCHMARK_FAILED,
                f"the benchmark of the unmodified code failed for the baseline "
                f"(exit code {result.exit_code}): {_last_line(result.stderr)}",
                infra=True,
            )
        return await self._parse(result.stdout, "the baseline's output", infra=True)

    async def _remove_quietly(self, container_id: str) -> None:
        """Remove a container we created, even while being cancelled."""
        # NOTE: shielded so that a cancellation arriving now still lets the
        # removal finish instead of leaking the container.
        try:
            await asyncio.shield(self.backend.remove(container_id))
        except Exception:
            logger.warning("could not remove container %s", container_id, exc_info=True)

    # -- helpers ------------------------------------------------------------

    async def _exec(
        self, container_id: str, command: str, step: str, infra: bool = False
    ) -> CommandResult:
        """Run one command with the lease's settings, within the time left."""
        async with self._bounded(step, infra=infra):
            return await self.backend.exec(
                container_id,
                command,
                timeout=self._remaining(step, infra),
                env=self.lease.env,
                cpus=self.lease.cpus,
            )

    def _check_time(
        self, result: CommandResult, step: str, *, infra: bool = False
    ) -> None:
        """Fail with ``timed_out`` when the backend killed the command."""
        if result.timed_out:
            raise self._timed_out(step, infra)

    @contextlib.asynccontextmanager
    async def _bounded(self, step: str, *, infra: bool = False) -> AsyncIterator[None]:
        """Stop waiting for a backend call that outlives the deadline."""
        remaining = self._remaining(step, infra)
        try:
            async with asyncio.timeout(remaining + BACKEND_GRACE):
                yield
        except TimeoutError:
            raise self._timed_out(step, infra) from None

    def _remaining(self, step: str, infra: bool = False) -> float:
        """Return the seconds left before the deadline; fail when none are."""
        remaining = self.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self._timed_out(step, infra)
        return remaining

    def _timed_out(self, step: str, infra: bool) -> _Failed:
        """Return the failure of an evaluation that ran out of time in ``step``."""
        return _Failed(
            ErrorCode.TIMED_OUT,
            f"the evaluation ran past its timeout of {self.timeout:g} s "
            f"during the {step} step",
            infra=infra,
            timed_out=True,
        )

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        """Add the seconds spent in the block to ``timings[step]``."""
        started = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - started
            self.timings[step] = self.timings.get(step, 0.0) + spent

    def _note_exit(self, result: CommandResult) -> None:
        """Remember the exit code of the candidate's latest step."""
        self.exit_code = result.exit_code

    def _note_last_step(self, result: CommandResult) -> None:
        """Remember the exit code and output of the tests or the benchmark."""
        self.exit_code = result.exit_code
        self.stdout = _tail(result.stdout)
        self.stderr = _tail(result.stderr)

    async def _parse(
        self, stdout: str, what: str, infra: bool = False
    ) -> dict[str, float]:
        """Parse benchmark output, off the event loop when it is large; fail
        ``benchmark_failed``."""
        # NOTE: large output goes to a thread because it can be up to the
        # backend's output limit, and hostile output makes the JSON search
        # slow; small output parses faster than a trip to a thread.
        try:
            statistic = self.dataset.benchmark_statistic
            if len(stdout) <= INLINE_PARSE_CHARS:
                return parse_benchmark_output(stdout, statistic)
            return await asyncio.to_thread(parse_benchmark_output, stdout, statistic)
        except BenchmarkOutputError as exc:
            raise _Failed(
                ErrorCode.BENCHMARK_FAILED, f"{what}: {exc}", infra=infra
            ) from None


class _KeyedLocks:
    """One asyncio.Lock per key, kept only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the lock of ``key`` for the block."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


# NOTE: module-wide because grade() is a function the server calls per
# evaluation; entries vanish when unused, so no lock outlives its event loop.
_BASELINE_LOCKS = _KeyedLocks()
_DIGEST_LOCKS = _KeyedLocks()


class _DigestMemo:
    """The digest of each loaded instance, taken once and kept while it lives.

    Keyed by the object, not by its fields: a dataset loaded again (a server
    restarted on edited files) is hashed again. Instances are not hashable
    (their ``fields`` is a dict), hence ids checked against weak references.
    """

    def __init__(self) -> None:
        self._digests: dict[int, tuple[weakref.ref[Instance], str]] = {}

    def get(self, instance: Instance) -> str | None:
        """Return the digest taken of this very instance, or None."""
        entry = self._digests.get(id(instance))
        if entry is None or entry[0]() is not instance:
            return None
        return entry[1]

    def put(self, instance: Instance, digest: str) -> None:
        """Keep ``digest`` for as long as ``instance`` lives."""
        key = id(instance)

        def forget(ref: weakref.ref[Instance]) -> None:
            entry = self._digests.get(key)
            if entry is not None and entry[0] is ref:
                del self._digests[key]

        self._digests[key] = (weakref.ref(instance, forget), digest)


_DIGESTS = _DigestMemo()


def _quote(paths: tuple[str, ...]) -> str:
    """Return paths quoted for a POSIX shell command line."""
    return " ".join(shlex.quote(path) for path in paths)


def _is_inside(entry: str, paths: tuple[str, ...]) -> bool:
    """Return whether a path git listed is one of ``paths`` or inside one."""
    return any(entry == path or entry.startswith(path + "/") for path in paths)


def _joined(stdout: str, stderr: str) -> str:
    """Return stdout then stderr, as one text."""
    if stdout and stderr and not stdout.endswith("\n"):
        return f"{stdout}\n{stderr}"
    return stdout + stderr


def _tail(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Return the end of ``text``, at most ``limit`` characters of it, marked."""
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters dropped ...]\n{text[-limit:]}"


def _last_line(text: str) -> str:
    """Return the last non-blank line of ``text``, shortened, for details."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    line = lines[-1].strip()
    return line if len(line) <= 300 else line[:297] + "..."
