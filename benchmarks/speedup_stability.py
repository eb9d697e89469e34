"""How stable is the speedup of unchanged code? Grade it N times against its baseline.

Usage::

    .venv/bin/python benchmarks/speedup_stability.py [--dataset NAME=PATH]
        [--instance ID ...] [--runs 10] [--cpus 0,1] [--statistics median,min]

For each instance (default: every instance of the bundled ``sample``
dataset) and each benchmark statistic (how a benchmark's repetitions become
one time; see ``docs/datasets.md``), this measures the baseline once, then
grades N fresh containers of the unmodified code in benchmark mode with the
local backend, and prints the median, min and max speedup, side by side. On
an idle machine every speedup should stay within 5% of 1.0;
``docs/datasets.md`` records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from agent_v2._devices import DeviceLease
from agent_v2.datasets import (
    Dataset,
    Instance,
    bundled_dataset_path,
    load_dataset,
    parse_dataset_spec,
)
from agent_v2.evaluation import BenchmarkStatistic, MemoryBaselineCache, grade
from agent_v2.protocol import Mode
from agent_v2.sandbox import LocalBackend

TOLERANCE = 0.05
GRADE_TIMEOUT = 600.0


def main() -> int:
    """Parse the flags, run the measurement and print one line per instance."""
    args = _parser().parse_args()
    if args.dataset:
        name, path = parse_dataset_spec(args.dataset)
    else:
        name, path = "sample", bundled_dataset_path("sample")
    dataset = load_dataset(name, path)
    instances = _chosen(dataset, args.instance, args.split)
    cpus = frozenset(int(cpu) for cpu in args.cpus.split(",")) if args.cpus else None
    lease = DeviceLease(kind="cpu", name=f"cpu:{args.cpus or 'any'}", cpus=cpus)
    try:
        chosen = [BenchmarkStatistic(s) for s in args.statistics.split(",")]
    except ValueError:
        choices = ", ".join(s.value for s in BenchmarkStatistic)
        raise SystemExit(f"--statistics: use a list of {choices}") from None

    print(
        f"speedup of unchanged code, {args.runs} runs per instance and statistic, "
        f"cores {lease.name}"
    )
    print(
        f"{'instance':<20} {'statistic':<10} {'median':>8} {'min':>8} {'max':>8}"
        "  within 5%"
    )
    all_within = True
    for instance in instances:
        for statistic in chosen:
            graded = dataclasses.replace(dataset, benchmark_statistic=statistic)
            speedups = asyncio.run(_measure(graded, instance, lease, args.runs))
            within = all(abs(value - 1.0) <= TOLERANCE for value in speedups)
            all_within = all_within and within
            print(
                f"{instance.instance_id:<20} {statistic:<10} "
                f"{statistics.median(speedups):8.3f} {min(speedups):8.3f} "
                f"{max(speedups):8.3f}  {'yes' if within else 'NO'}"
            )
    return 0 if all_within or not args.check else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", metavar="NAME=PATH", help="default: sample")
    parser.add_argument("--instance", action="append", help="default: all")
    parser.add_argument("--split", default="test")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cpus", help="pin every command to these cores, e.g. 1")
    parser.add_argument(
        "--statistics",
        default="median,min",
        help="benchmark statistics to compare (default: median,min)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a speedup is off by > 5%%"
    )
    return parser


def _chosen(dataset: Dataset, ids: list[str] | None, split: str) -> list[Instance]:
    """Return the instances asked for, or every instance of the split."""
    if ids:
        return [dataset.get(instance_id, split) for instance_id in ids]
    return [
        instance
        for (instance_split, _), instance in sorted(dataset.instances.items())
        if instance_split == split
    ]


async def _measure(
    dataset: Dataset, instance: Instance, lease: DeviceLease, runs: int
) -> list[float]:
    """Grade ``runs`` fresh containers of the unmodified instance; return speedups."""
    cache = MemoryBaselineCache()
    speedups = []
    with tempfile.TemporaryDirectory(prefix="agent-v2-stability-") as workdir:
        backend = LocalBackend(Path(workdir))
        await backend.open()
        try:
            for _ in range(runs):
                container_id = await backend.create(instance)
                try:
                    outcome = await grade(
                        backend=backend,
                        dataset=dataset,
                        instance=instance,
                        container_id=container_id,
                        mode=Mode.BENCHMARK,
                        lease=lease,
                        timeout=GRADE_TIMEOUT,
                        baselines=cache,
                    )
                finally:
                    await backend.remove(container_id)
                if not outcome.success:
                    raise SystemExit(
                        f"{instance.instance_id}: grading failed: {outcome.error}: "
                        f"{outcome.error_detail}"
                    )
                speedups.append(outcome.speedup)
        finally:
            await backend.close()
    return speedups


if __name__ == "__main__":
    sys.exit(main())
