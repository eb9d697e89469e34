"""The evaluation server with ``backend="docker"``, end to end through its API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_v2.errors import ConfigError
from agent_v2.server import ServerSettings
from agent_v2.server._backends import make_backend
from conftest import FAST_KERNEL, ServerStarter

pytestmark = pytest.mark.docker

DOCKER_URL = os.environ.get("AGENT_V2_DOCKER_URL")
IMAGE = os.environ.get("AGENT_V2_DOCKER_IMAGE", "agent-v2-test:bookworm")
REQUIRED = os.environ.get("AGENT_V2_DOCKER_REQUIRED") == "1"


def _in_image(dataset_file: Path) -> Path:
    """Give every instance of the C dataset the test image; return the file."""
    manifest = json.loads(dataset_file.read_text())
    manifest["defaults"]["image_name"] = IMAGE
    dataset_file.write_text(json.dumps(manifest))
    return dataset_file


def test_settings_build_a_docker_backend_with_the_flags(
    tmp_path: Path, c_dataset: Path
) -> None:
    """The docker settings reach the backend's container config."""
    from agent_v2.datasets import Instance

    settings = ServerSettings(
        datasets=[f"csum={c_dataset}"],
        backend="docker",
        docker_url="unix:///nonexistent.sock",
        gpu_vendor="nvidia",
        container_memory="1g",
        container_pids=64,
        container_cpus=1.5,
        workdir=tmp_path / "work",
        store_path=tmp_path / "store.sqlite3",
    )
    backend: Any = make_backend(settings)
    config = backend.container_config(
        Instance(dataset_name="d", instance_id="i", image_name=IMAGE)
    )

    host = config["HostConfig"]
    assert host["Memory"] == 1024**3
    assert host["PidsLimit"] == 64
    assert host["NanoCpus"] == 1_500_000_000
    assert host["NetworkMode"] == "none"
    assert host["DeviceRequests"][0]["Driver"] == "nvidia"


def test_an_unknown_gpu_vendor_is_named(c_dataset: Path) -> None:
    """A gpu_vendor other than none, amd or nvidia fails at construction."""
    with pytest.raises(ConfigError, match=r"gpu_vendor.*'intel'"):
        ServerSettings(datasets=[f"csum={c_dataset}"], gpu_vendor="intel")


async def test_grading_through_the_api(
    start_server: ServerStarter, c_dataset: Path
) -> None:
    """Start, edit and grade a real Docker container through the HTTP API."""
    if not DOCKER_URL:
        if REQUIRED:
            pytest.fail("AGENT_V2_DOCKER_REQUIRED=1 but AGENT_V2_DOCKER_URL is unset")
        pytest.skip("AGENT_V2_DOCKER_URL is not set; scripts/test.sh sets it")
    dataset = _in_image(c_dataset)

    async with (
        start_server(
            backend="docker", docker_url=DOCKER_URL, datasets=[f"csum={dataset}"]
        ) as url,
        aiohttp.ClientSession() as http,
    ):
        body = {"dataset_name": "csum", "instance_id": "sum_squares"}
        async with http.post(f"{url}/v1/containers", json=body) as answer:
            assert answer.status == 201, await answer.text()
            container_id = (await answer.json())["container_id"]

        edit = {"command": "cat > kernel.c", "stdin": FAST_KERNEL}
        async with http.post(
            f"{url}/v1/containers/{container_id}/exec", json=edit
        ) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["exit_code"] == 0

        submit = {"instance_id": "sum_squares", "container_id": container_id}
        async with http.post(f"{url}/evaluate_v3", json=submit) as answer:
            assert answer.status == 200, await answer.text()
            outcome = await answer.json()

        async with http.delete(f"{url}/v1/containers/{container_id}") as answer:
            assert answer.status == 204

    assert outcome["success"], outcome
    assert outcome["speedup"] > 1
    assert outcome["reward"] > 0.1
