"""Tests of the docker sandbox backend against a real Docker engine.

``scripts/docker-engine.sh start`` starts the engine and builds the image;
``AGENT_V2_DOCKER_URL`` says where it is (``scripts/test.sh`` sets it, and
``AGENT_V2_DOCKER_REQUIRED=1`` so that a broken engine fails instead of
skipping). Tests that only build settings run without an engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from agent_v2._devices import DeviceLease
from agent_v2.datasets import Dataset, Instance, load_dataset
from agent_v2.errors import ConfigError, ContainerNotFound, DatasetError, SandboxError
from agent_v2.evaluation import MemoryBaselineCache, grade
from agent_v2.protocol import Mode
from agent_v2.sandbox import BASE_REF, DockerBackend, SandboxBackend
from agent_v2.sandbox._docker import gpu_env, gpu_host_config, parse_size
from sandbox_suite import SandboxSuite, run

pytestmark = pytest.mark.docker

DOCKER_URL = os.environ.get("AGENT_V2_DOCKER_URL")
IMAGE = os.environ.get("AGENT_V2_DOCKER_IMAGE", "agent-v2-test:bookworm")
REQUIRED = os.environ.get("AGENT_V2_DOCKER_REQUIRED") == "1"

FAST_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    return total;
}
"""

BackendMaker = Callable[..., contextlib.AbstractAsyncContextManager[DockerBackend]]


def _unavailable(reason: str) -> None:
    """Skip the test, or fail it when the test command promised an engine."""
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    """Provide a client of the test engine that has the test image."""
    if not DOCKER_URL:
        pytest.skip(
            "AGENT_V2_DOCKER_URL is not set; run "
            '`eval "$(scripts/docker-engine.sh start)"` to test the docker backend'
        )
    client = aiodocker.Docker(url=DOCKER_URL)
    try:
        await client.images.inspect(IMAGE)
    except aiodocker.DockerError as exc:
        await client.close()
        _unavailable(f"Docker engine {DOCKER_URL} or image {IMAGE} unusable: {exc}")
    yield client
    await client.close()


@pytest.fixture
def docker_backend(docker: aiodocker.Docker) -> BackendMaker:
    """Return ``docker_backend(**settings)``: an opened DockerBackend, closed after."""

    @contextlib.asynccontextmanager
    async def make(**settings: Any) -> AsyncIterator[DockerBackend]:
        backend = DockerBackend(docker_url=DOCKER_URL, **settings)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()

    return make


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Write a small instance folder."""
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello\n")
    return folder


@pytest.fixture
def instance(repo: Path) -> Instance:
    """Return an instance of the test image with the small folder."""
    return Instance(
        dataset_name="docker", instance_id="hello", repo_path=repo, image_name=IMAGE
    )


@pytest.fixture
async def foreign(docker: aiodocker.Docker) -> AsyncIterator[Callable[..., Any]]:
    """Return ``foreign(**config)``: start a container as another tool would."""
    started: list[aiodocker.containers.DockerContainer] = []

    async def start(**config: Any) -> str:
        name = f"other-tool-{uuid.uuid4().hex[:12]}"
        body = {
            "Image": IMAGE,
            "Cmd": ["sleep", "infinity"],
            "HostConfig": {"NetworkMode": "none", "Init": True},
            **config,
        }
        container = await docker.containers.run(body, name=name)
        started.append(container)
        return name

    yield start
    for container in started:
        await container.delete(force=True)


@contextlib.asynccontextmanager
async def created(backend: DockerBackend, instance: Instance) -> AsyncIterator[str]:
    """Create a container and remove it when the block ends."""
    container_id = await backend.create(instance)
    try:
        yield container_id
    finally:
        await backend.remove(container_id)


@contextlib.asynccontextmanager
async def not_started(
    docker: aiodocker.Docker, config: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Create, without starting, a container from ``config``; yield its inspection."""
    container = await docker.containers.create(
        config, name=f"agent-v2-inspect-{uuid.uuid4().hex[:12]}"
    )
    try:
        yield await container.show()
    finally:
        await container.delete(force=True)


# -- the shared suite ---------------------------------------------------------


class TestDockerBackend(SandboxSuite):
    """The docker backend passes the shared backend suite."""

    @pytest.fixture
    async def backend(
        self, docker_backend: BackendMaker
    ) -> AsyncIterator[SandboxBackend]:
        """Provide a docker backend on the test engine."""
        async with docker_backend(output_limit=self.output_limit) as backend:
            yield backend

    @pytest.fixture
    def instance(self, repo_path: Path) -> Instance:
        """Return the suite's instance, in the test image."""
        return Instance(
            dataset_name="suite",
            instance_id="hello",
            repo_path=repo_path,
            image_name=IMAGE,
        )


# -- settings (no engine needed) ----------------------------------------------


def test_aiodocker_is_imported_only_for_the_docker_backend() -> None:
    """``agent_v2.sandbox`` loads without aiodocker; DockerBackend loads it."""
    script = (
        "import sys, agent_v2.sandbox as sandbox\n"
        "assert 'aiodocker' not in sys.modules\n"
        "assert 'DockerBackend' in sandbox.__all__\n"
        "assert sandbox.DockerBackend.kind == 'docker'\n"
        "assert 'aiodocker' in sys.modules\n"
    )

    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("512m", 512 << 20), ("8g", 8 << 30), ("1.5G", 3 << 29)],
)
def test_sizes_are_parsed(value: str | int, expected: int) -> None:
    """Sizes are bytes, or a number with k, m, g or t."""
    assert parse_size(value, what="memory") == expected


@pytest.mark.parametrize(
    "settings",
    [
        {"memory": "lots"},
        {"memory": 0},
        {"pids_limit": 0},
        {"cpus": -1.0},
        {"gpu_vendor": "intel"},
        {"workdir": "relative"},
        {"workdir": "/a/../b"},
        {"require_label": "=x"},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    """Unusable settings raise ConfigError naming the value."""
    value = next(iter(settings.values()))

    with pytest.raises(ConfigError, match=repr(value).replace("-", r"\-")):
        DockerBackend(**settings)


def test_gpu_host_config_per_vendor() -> None:
    """AMD maps its device nodes and groups; NVIDIA asks for every GPU."""
    amd = gpu_host_config("amd", groups=["44", "109"])
    nvidia = gpu_host_config("nvidia")

    assert gpu_host_config("none") == {}
    assert [device["PathOnHost"] for device in amd["Devices"]] == [
        "/dev/kfd",
        "/dev/dri",
    ]
    assert amd["Devices"][0]["CgroupPermissions"] == "rwm"
    assert amd["GroupAdd"] == ["44", "109"]
    assert nvidia == {
        "DeviceRequests": [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    }


def test_amd_groups_default_to_video_without_devices() -> None:
    """Device nodes missing on this host fall back to the ``video`` group."""
    config = gpu_host_config("amd", devices={"/no/such/kfd": "/dev/kfd"})

    assert config["GroupAdd"] == ["video"]


def test_gpu_env_per_vendor() -> None:
    """On AMD the lease's GPU ids move to ROCR_VISIBLE_DEVICES; HIP counts from 0."""
    lease = {"HIP_VISIBLE_DEVICES": "2,3", "CUDA_VISIBLE_DEVICES": "2,3", "X": "1"}

    assert gpu_env("amd", lease) == {
        "ROCR_VISIBLE_DEVICES": "2,3",
        "HIP_VISIBLE_DEVICES": "0,1",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "X": "1",
    }
    assert gpu_env("nvidia", lease) == lease
    assert gpu_env("none", lease) == lease
    own = {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"}
    assert gpu_env("amd", own) == own


def test_network_setting() -> None:
    """Containers get no network unless ``network`` is set."""
    instance = Instance(dataset_name="d", instance_id="i", image_name=IMAGE)

    closed = DockerBackend().container_config(instance)
    open_ = DockerBackend(network=True).container_config(instance)

    assert closed["HostConfig"]["NetworkMode"] == "none"
    assert open_["HostConfig"]["NetworkMode"] == "default"


def test_instance_without_image_is_refused() -> None:
    """An instance without image_name cannot become a container; it is named."""
    instance = Instance(dataset_name="toy", instance_id="no-image")

    with pytest.raises(DatasetError, match=r"'no-image'.*image_name"):
        DockerBackend().container_config(instance)


async def test_unreachable_engine(tmp_path: Path) -> None:
    """An engine that does not answer fails open() with its address."""
    url = f"unix://{tmp_path}/no-engine.sock"

    with pytest.raises(SandboxError, match=r"no-engine\.sock"):
        await DockerBackend(docker_url=url).open()


async def test_not_opened_backend() -> None:
    """Using a backend before open() says to open it."""
    with pytest.raises(SandboxError, match="open"):
        await DockerBackend().exists("abc")


# -- limits and isolation ------------------------------------------------------


async def test_limits_land_in_host_config(
    docker_backend: BackendMaker, docker: aiodocker.Docker, instance: Instance
) -> None:
    """Memory, processes, CPUs, file size and no network reach the engine."""
    settings = {"memory": "256m", "pids_limit": 100, "cpus": 1.5, "file_size": "1g"}
    async with (
        docker_backend(**settings) as backend,
        created(backend, instance) as container_id,
    ):
        details = await (await docker.containers.get(container_id)).show()

    host = details["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 256 << 20
    assert host["PidsLimit"] == 100
    assert host["NanoCpus"] == 1_500_000_000
    assert host["NetworkMode"] == "none"
    assert host["Ulimits"] == [{"Name": "fsize", "Soft": 1 << 30, "Hard": 1 << 30}]
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert details["Config"]["Labels"]["agent-v2"] == "1"
    assert details["Config"]["Labels"]["agent-v2.instance"] == "hello"
    assert details["Config"]["User"] == "1000:1000"


async def test_commands_run_unprivileged_without_network(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """Commands run as uid 1000, own their files, cannot write to /etc, see no NIC."""
    async with docker_backend() as backend, created(backend, instance) as box:
        result = await run(
            backend,
            box,
            "id -u; pwd; stat -c %u hello.txt; ls /sys/class/net; "
            "touch /etc/agent-v2 2>/dev/null || echo refused",
        )

    assert result.ok, result
    assert result.stdout.split() == ["1000", "/workspace", "1000", "lo", "refused"]


async def test_memory_hog_is_killed(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """A command that outgrows the memory limit is killed; the container lives."""
    hog = "head -c 300m /dev/zero | tail > /dev/null; echo ${PIPESTATUS[1]}"
    async with (
        docker_backend(memory="64m") as backend,
        created(backend, instance) as box,
    ):
        result = await run(backend, box, hog)
        after = await run(backend, box, "echo alive")

    assert result.stdout == "137\n", result
    assert after.stdout == "alive\n"


async def test_fork_bomb_ends_as_a_timeout(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """A fork bomb hits the process limit, times out and is killed entirely."""
    bomb = "bomb() { bomb | bomb; }; bomb"
    # Up to 10 s for the killed processes to be reaped; then only init, sleep,
    # this command's shells, ps and wc are left.
    count = (
        "for i in $(seq 100); do n=$(ps -e --no-headers | wc -l); "
        '[ "$n" -lt 12 ] && break; sleep 0.1; done; echo "$n"'
    )
    async with (
        docker_backend(pids_limit=64) as backend,
        created(backend, instance) as box,
    ):
        result = await backend.exec(box, bomb, timeout=5)
        after = await run(backend, box, count)

    assert result.timed_out
    assert after.ok, after
    assert int(after.stdout) < 12, after


async def test_file_size_limit(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """Writing a file past ``file_size`` fails."""
    async with (
        docker_backend(file_size="1m") as backend,
        created(backend, instance) as box,
    ):
        result = await run(backend, box, "head -c 2m /dev/zero > big")
        size = await run(backend, box, "stat -c %s big")

    assert not result.ok
    assert int(size.stdout) <= 1 << 20


# -- containers of other tools -------------------------------------------------


async def test_container_of_another_tool_by_name(
    docker_backend: BackendMaker, foreign: Callable[..., Any]
) -> None:
    """A container started by another tool is used by name, but never removed."""
    name = await foreign(WorkingDir="/srv/work")

    async with docker_backend() as backend:
        exists = await backend.exists(name)
        result = await run(backend, name, "pwd; id -u; cat", stdin=b"fed\n")
        with pytest.raises(SandboxError, match="not created by agent-v2"):
            await backend.remove(name)
        still_there = await backend.exists(name)

    assert exists and still_there
    assert result.ok, result
    assert result.stdout == "/srv/work\n0\nfed\n"


async def test_stdin_for_a_named_user(
    docker_backend: BackendMaker, foreign: Callable[..., Any]
) -> None:
    """Stdin reaches a command run as a user named, not numbered; none is left."""
    name = await foreign(User="nobody")
    command = "id -un; cat; ls /tmp | grep stdin || echo none left"

    async with docker_backend() as backend:
        result = await run(backend, name, command, stdin=b"fed\n")

    assert result.ok, result
    assert result.stdout == "nobody\nfed\nnone left\n"


async def test_require_label_hides_other_containers(
    docker_backend: BackendMaker, foreign: Callable[..., Any]
) -> None:
    """With ``require_label``, containers without that label do not exist."""
    plain = await foreign()
    labelled = await foreign(Labels={"agents.example": "yes"})

    async with docker_backend(require_label="agents.example=yes") as backend:
        assert not await backend.exists(plain)
        assert await backend.exists(labelled)
        with pytest.raises(ContainerNotFound, match=plain):
            await backend.exec(plain, "true", timeout=10)


async def test_stopped_container_does_not_exist(
    docker_backend: BackendMaker, docker: aiodocker.Docker, foreign: Callable[..., Any]
) -> None:
    """A stopped container cannot run commands; the error says it is not running."""
    name = await foreign()
    await (await docker.containers.get(name)).kill()

    async with docker_backend() as backend:
        assert not await backend.exists(name)
        with pytest.raises(ContainerNotFound, match="not running"):
            await backend.exec(name, "true", timeout=10)


async def test_missing_image_is_named(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """An image the engine does not have fails create, naming it."""
    missing = dataclasses.replace(instance, image_name="agent-v2-no-such-image:1")

    async with docker_backend() as backend:
        with pytest.raises(SandboxError, match="agent-v2-no-such-image:1"):
            await backend.create(missing)


# -- GPUs ----------------------------------------------------------------------


async def test_amd_settings_land_in_container_config(
    docker: aiodocker.Docker, instance: Instance
) -> None:
    """An AMD container config maps /dev/kfd and /dev/dri with the given groups."""
    backend = DockerBackend(docker_url=DOCKER_URL, gpu_vendor="amd", gpu_groups=["44"])

    async with not_started(docker, backend.container_config(instance)) as details:
        host = details["HostConfig"]

    assert [(d["PathOnHost"], d["PathInContainer"]) for d in host["Devices"]] == [
        ("/dev/kfd", "/dev/kfd"),
        ("/dev/dri", "/dev/dri"),
    ]
    assert host["GroupAdd"] == ["44"]


async def test_nvidia_settings_land_in_container_config(
    docker: aiodocker.Docker, instance: Instance
) -> None:
    """An NVIDIA container config asks the engine for every GPU."""
    backend = DockerBackend(docker_url=DOCKER_URL, gpu_vendor="nvidia")

    async with not_started(docker, backend.container_config(instance)) as details:
        requests = details["HostConfig"]["DeviceRequests"]

    assert len(requests) == 1
    assert requests[0]["Driver"] == "nvidia"
    assert requests[0]["Count"] == -1
    assert requests[0]["Capabilities"] == [["gpu"]]


async def test_amd_devices_and_lease_reach_commands(
    docker_backend: BackendMaker, instance: Instance
) -> None:
    """Mapped device nodes and groups exist inside; the lease env is translated."""
    # Stand-ins: this machine has no GPU, but any character device maps the same.
    devices = {"/dev/null": "/dev/kfd", "/dev/zero": "/dev/dri/renderD128"}
    settings = {"gpu_vendor": "amd", "gpu_devices": devices, "gpu_groups": ["video"]}
    lease = {"HIP_VISIBLE_DEVICES": "3"}
    command = (
        "test -c /dev/kfd && test -c /dev/dri/renderD128 && id -G && "
        'echo "$ROCR_VISIBLE_DEVICES $HIP_VISIBLE_DEVICES"'
    )
    async with (
        docker_backend(**settings) as backend,
        created(backend, instance) as box,
    ):
        result = await run(backend, box, command, env=lease)

    assert result.ok, result
    groups, visible = result.stdout.splitlines()
    assert "44" in groups.split()  # video, in Debian
    assert visible == "3 0"


async def test_nvidia_without_its_runtime_fails_cleanly(
    docker_backend: BackendMaker, docker: aiodocker.Docker, instance: Instance
) -> None:
    """Without the NVIDIA runtime create fails, names the instance, leaves nothing."""
    unique = dataclasses.replace(instance, instance_id=f"gpu-{uuid.uuid4().hex[:8]}")

    async with docker_backend(gpu_vendor="nvidia") as backend:
        with pytest.raises(SandboxError, match=unique.instance_id):
            await backend.create(unique)

    label = f"agent-v2.instance={unique.instance_id}"
    left = await docker.containers.list(all=True, filters={"label": [label]})
    assert left == []


# -- grading through the real pipeline -----------------------------------------


def _in_image(dataset: Dataset) -> Dataset:
    """Return the dataset with every instance in the test image."""
    instances = {
        key: dataclasses.replace(instance, image_name=IMAGE)
        for key, instance in dataset.instances.items()
    }
    return dataclasses.replace(dataset, instances=instances)


async def test_full_benchmark_evaluation(
    docker_backend: BackendMaker, c_dataset: Path
) -> None:
    """A faster kernel graded in benchmark mode: success, speedup and reward."""
    dataset = _in_image(load_dataset("csum", c_dataset))
    instance = dataset.get("sum_squares")
    lease = DeviceLease(kind="cpu", name="cpu:0", cpus=frozenset({0}))

    async with docker_backend() as backend, created(backend, instance) as box:
        edit = await run(backend, box, "cat > kernel.c", stdin=FAST_KERNEL.encode())
        outcome = await grade(
            backend=backend,
            dataset=dataset,
            instance=instance,
            container_id=box,
            mode=Mode.BENCHMARK,
            lease=lease,
            timeout=600,
            baselines=MemoryBaselineCache(),
        )

    assert edit.ok, edit
    assert outcome.success, outcome
    assert outcome.speedup > 1
    assert outcome.reward > 0.1
    assert "BM_sum_squares" in outcome.benchmarks


async def test_grading_a_container_of_another_tool(
    docker_backend: BackendMaker, foreign: Callable[..., Any], c_dataset: Path
) -> None:
    """A container another tool started, holding the instance, is graded by name."""
    dataset = _in_image(load_dataset("csum", c_dataset))
    instance = dataset.get("sum_squares")
    assert instance.repo_path is not None
    name = await foreign(WorkingDir="/src")
    lease = DeviceLease(kind="cpu", name="cpu:0")

    async with docker_backend() as backend:
        # Put the instance in, as the other tool would have done.
        for path in sorted(instance.repo_path.iterdir()):
            data = path.read_bytes()
            put = await run(backend, name, f"cat > {path.name}", stdin=data)
            assert put.ok, put
        base = await run(
            backend,
            name,
            "git init -q && git add -A && git -c user.name=t -c user.email=t@t "
            f"commit -qm base && git tag {BASE_REF}",
        )
        assert base.ok, base

        outcome = await grade(
            backend=backend,
            dataset=dataset,
            instance=instance,
            container_id=name,
            mode=Mode.TEST,
            lease=lease,
            timeout=300,
            baselines=MemoryBaselineCache(),
        )

    assert outcome.success, outcome
    assert outcome.reward == 1.0
