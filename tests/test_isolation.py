"""Tests that local sandbox commands are confined: uid, network, files, limits.

They need root (the machine CI runs them on is root); as another user only the
configuration checks run.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from agent_v2._devices import DeviceLease
from agent_v2.datasets import Dataset, Instance
from agent_v2.errors import ConfigError
from agent_v2.evaluation import MemoryBaselineCache, grade
from agent_v2.protocol import ErrorCode, Mode, Outcome
from agent_v2.sandbox import Isolation, Limits, LocalBackend
from conftest import ServerStarter

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="confinement needs the tests to run as root"
)

CPU = DeviceLease(kind="cpu", name="cpu:0")

FORK_BOMB = "bomb() { bomb | bomb & }; while :; do bomb; done"
ENDLESS_LOOP = "while :; do :; done"
ENDLESS_OUTPUT = "yes 'endless output'"

SMALL_LIMITS = Limits(
    cpu_time=5, memory=512 << 20, pids_limit=64, file_size=1 << 20, open_files=256
)


def processes_of(uid: int) -> list[psutil.Process]:
    """Return the processes whose real uid is ``uid``."""
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["uids"]):
        uids = process.info["uids"]
        if uids is not None and uid in (uids.real, uids.effective):
            found.append(process)
    return found


async def wait_for_no_processes_of(uid: int) -> list[psutil.Process]:
    """Wait up to 20 s for every process of ``uid`` to end; return those left."""
    for _ in range(200):
        left = processes_of(uid)
        if not left:
            break
        await asyncio.sleep(0.1)
    return left


def _has_group(name: str) -> bool:
    """Return whether the host has a group called ``name``."""
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def existing(paths: list[str]) -> list[str]:
    """Return the paths that exist on the host."""
    return [path for path in paths if os.path.lexists(path)]


def uid_of(backend: LocalBackend, container_id: str) -> int:
    """Return the uid that owns a container's folder."""
    return (backend.containers_dir / container_id).stat().st_uid


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list[object]]]:
    """Listen on a free loopback port; yield it and the list of accepted peers."""
    accepted: list[object] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        yield port, accepted
        # Take whatever reached the backlog while the commands ran.
        with contextlib.suppress(TimeoutError, OSError):
            while True:
                connection, peer = server.accept()
                accepted.append(peer)
                connection.close()
    finally:
        server.close()


def connect_command(port: int) -> str:
    """Return a shell command that tries three ways to reach a loopback port."""
    script = (
        "import socket, sys\n"
        f"for host in ('127.0.0.1', 'localhost', '::1'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=5).close()\n"
        "        print('reached', host)\n"
        "    except OSError as exc:\n"
        "        print('refused', host, exc)\n"
    )
    return (
        f"(echo hi > /dev/tcp/127.0.0.1/{port}) 2>&1 && echo 'reached bash'; "
        f"python3 -c {shlex.quote(script)}"
    )


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    """Return an instance with one small file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.c").write_text("int main(void) { return 0; }\n")
    return Instance(dataset_name="iso", instance_id="one", repo_path=repo)


@pytest.fixture
async def confined(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """Provide a backend that must confine commands, with small limits."""
    backend = LocalBackend(
        tmp_path / "work",
        output_limit=64 * 1024,
        isolation=Isolation(enabled=True, limits=SMALL_LIMITS),
    )
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
async def box(confined: LocalBackend, instance: Instance) -> AsyncIterator[str]:
    """Create a container in the confined backend; remove it afterwards."""
    container_id = await confined.create(instance)
    yield container_id
    await confined.remove(container_id)


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """Return a fresh folder outside every host temporary folder; deleted after."""
    parent = Path("/srv") if Path("/srv").is_dir() else Path("/opt")
    folder = Path(tempfile.mkdtemp(prefix="agent-v2-test-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the uid ------------------------------------------------------------------


@needs_root
async def test_each_container_runs_as_its_own_unprivileged_uid(
    confined: LocalBackend, instance: Instance, box: str
) -> None:
    """Commands run as the container's uid from the sandbox range, with no groups."""
    other = await confined.create(instance)
    try:
        mine = await confined.exec(box, "id -u; id -g; id -G; ls -n -d .", timeout=30)
        theirs = await confined.exec(other, "id -u", timeout=30)
    finally:
        await confined.remove(other)

    uid = uid_of(confined, box)
    user, group, groups, listing = mine.stdout.splitlines()
    mode, _, owner = listing.split()[:3]
    assert confined.isolation_level == "full"
    assert uid in Isolation().uids
    assert mine.ok, mine
    assert [user, group, groups, owner] == [str(uid)] * 4
    assert mode == "drwx------"
    assert theirs.ok and int(theirs.stdout) not in (uid, 0)


@needs_root
async def test_groups_let_commands_join_host_groups(
    tmp_path: Path, instance: Instance
) -> None:
    """With ``groups`` (say for GPU devices) the uid joins exactly those groups."""
    video = grp.getgrnam("video").gr_gid if _has_group("video") else 44
    backend = LocalBackend(
        tmp_path / "work", isolation=Isolation(enabled=True, groups=(video, 4242))
    )
    await backend.open()
    container_id = await backend.create(instance)
    try:
        result = await backend.exec(container_id, "id -G", timeout=30)
        uid = uid_of(backend, container_id)
    finally:
        await backend.remove(container_id)
        await backend.close()

    assert result.ok, result
    assert sorted(map(int, result.stdout.split())) == sorted({uid, video, 4242})


@needs_root
async def test_an_unknown_group_is_refused(tmp_path: Path) -> None:
    """A group name the host does not know raises ConfigError at open."""
    isolation = Isolation(enabled=True, groups=("agent-v2-no-such-group",))
    backend = LocalBackend(tmp_path / "work", isolation=isolation)

    with pytest.raises(ConfigError, match="agent-v2-no-such-group"):
        await backend.open()


@needs_root
async def test_no_capabilities_and_no_new_privileges(
    confined: LocalBackend, box: str
) -> None:
    """The command holds no capability and setuid programs cannot raise it."""
    result = await confined.exec(
        box,
        "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status",
        timeout=30,
    )

    fields = dict(line.split(":\t") for line in result.stdout.splitlines())
    assert fields == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
    }


@needs_root
async def test_host_processes_are_invisible(confined: LocalBackend, box: str) -> None:
    """The command sees only its own processes: a fresh PID namespace and /proc."""
    result = await confined.exec(box, "ls /proc | grep -c '^[0-9]'", timeout=30)

    assert result.ok, result
    assert int(result.stdout) < 10
    assert len(psutil.pids()) > 10


# -- the network --------------------------------------------------------------


@needs_root
async def test_command_cannot_reach_a_loopback_listener(
    confined: LocalBackend, box: str
) -> None:
    """A listener on the host's 127.0.0.1 is unreachable from a confined command."""
    with listener() as (port, accepted):
        result = await confined.exec(box, connect_command(port), timeout=60)

    assert "reached" not in result.stdout, result
    assert result.stdout.count("unreachable") == 4, result
    assert accepted == []


@needs_root
async def test_the_same_command_unconfined_reaches_the_listener(
    tmp_path: Path, instance: Instance
) -> None:
    """Control: without isolation the same command connects, so the check works."""
    backend = LocalBackend(tmp_path / "open", isolation=Isolation(enabled=False))
    await backend.open()
    container_id = await backend.create(instance)
    try:
        with listener() as (port, accepted):
            result = await backend.exec(container_id, connect_command(port), timeout=60)
    finally:
        await backend.remove(container_id)
        await backend.close()

    assert "reached bash" in result.stdout, result
    assert "reached 127.0.0.1" in result.stdout, result
    assert "reached localhost" in result.stdout, result
    assert len(accepted) >= 3


@needs_root
async def test_exec_through_the_server_cannot_reach_the_servers_port(
    start_server: ServerStarter, c_dataset: Path, http: aiohttp.ClientSession
) -> None:
    """An agent's exec on the real server cannot connect to the server's own port."""
    async with start_server(backend="local", datasets=[f"csum={c_dataset}"]) as url:
        port = int(url.rsplit(":", 1)[1])
        body = {"dataset_name": "csum", "split": "test", "instance_id": "sum_squares"}
        async with http.post(f"{url}/v1/containers", json=body) as response:
            assert response.status == 201, await response.text()
            container_id = (await response.json())["container_id"]

        exec_body = {"command": connect_command(port), "timeout": 60}
        async with http.post(
            f"{url}/v1/containers/{container_id}/exec", json=exec_body
        ) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        async with http.get(f"{url}/healthz") as response:
            healthy = response.status == 200

    assert "reached" not in result["stdout"], result
    assert result["stdout"].count("unreachable") == 4, result
    assert healthy


# -- the file system ----------------------------------------------------------


def write_attempts(paths: list[str]) -> str:
    """Return a command that tries to create a file in each path and reports it."""
    lines = [
        f"if (echo x > {path}) 2>/dev/null; then echo 'wrote {path}'; "
        f"else echo 'refused {path}'; fi"
        for path in paths
    ]
    return "\n".join(lines)


@needs_root
async def test_command_cannot_write_outside_its_container(
    confined: LocalBackend, instance: Instance, box: str, tmp_path: Path
) -> None:
    """Writes to /root, /etc, the workdir, the store and another container fail."""
    other = await confined.create(instance)
    name = f"agent-v2-{uuid.uuid4().hex}"
    other_root = confined.containers_dir / other
    targets = [
        f"/root/{name}",
        f"/etc/{name}",
        f"/usr/{name}",
        f"/{name}",
        f"{confined.containers_dir}/{name}",
        f"{confined.containers_dir.parent}/{name}",
        f"{other_root}/{name}",
        f"{tmp_path}/{name}",
    ]
    try:
        result = await confined.exec(box, write_attempts(targets), timeout=60)
        peek = await confined.exec(box, f"ls {other_root}", timeout=60)
    finally:
        await confined.remove(other)

    assert result.ok, result
    assert result.stdout.splitlines() == [f"refused {path}" for path in targets]
    assert existing(targets) == []
    assert "No such file or directory" in peek.stderr, peek


@needs_root
async def test_host_tmp_folders_are_private(confined: LocalBackend, box: str) -> None:
    """Files written to /tmp, /var/tmp, /dev/shm or /run/lock never reach the host."""
    name = f"agent-v2-{uuid.uuid4().hex}"
    folders = existing(["/tmp", "/var/tmp", "/dev/shm", "/run/lock"])
    targets = [f"{folder}/{name}" for folder in folders]

    result = await confined.exec(box, write_attempts(targets), timeout=60)

    assert result.ok, result
    assert existing(targets) == []


@needs_root
async def test_tmp_is_the_containers_tmpdir_when_the_workdir_is_elsewhere(
    outside_tmp: Path, instance: Instance
) -> None:
    """With the workdir outside /tmp, /tmp and the like show the container's TMPDIR."""
    backend = LocalBackend(outside_tmp / "work", isolation=Isolation(enabled=True))
    await backend.open()
    container_id = await backend.create(instance)
    try:
        result = await backend.exec(
            container_id,
            "echo a > /tmp/a && echo b > /var/tmp/b && echo c > /dev/shm/c && "
            'ls "$TMPDIR"; git status --porcelain',
            timeout=60,
        )
    finally:
        await backend.remove(container_id)
        await backend.close()

    assert result.ok, result
    assert result.stdout.split() == ["a", "b", "c"]


@needs_root
@pytest.mark.parametrize("where", ["tmp", "elsewhere"])
async def test_nothing_outside_the_container_is_writable(
    where: str, tmp_path: Path, outside_tmp: Path, instance: Instance
) -> None:
    """A scan of the whole file system finds nothing else the command may write."""
    workdir = (tmp_path if where == "tmp" else outside_tmp) / "work"
    backend = LocalBackend(workdir, isolation=Isolation(enabled=True))
    await backend.open()
    container_id = await backend.create(instance)
    root = backend.containers_dir / container_id
    # NOTE: a symlink is as writable as its target, which the scan meets on
    # its own (the systemd units that point at /dev/null, for instance).
    scan = (
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune "
        "-o -writable ! -type l -print 2>/dev/null; "
        "find /dev -writable ! -type l 2>/dev/null; true"
    )
    try:
        result = await backend.exec(container_id, scan, timeout=110)
    finally:
        await backend.remove(container_id)
        await backend.close()

    # NOTE: the private tmp folders are mounted over the host's ones, and the
    # device files are the harmless ones every user may open.
    allowed = (str(root), "/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/")
    writable = [line for line in result.stdout.splitlines() if line]
    outside = [path for path in writable if not path.startswith(allowed)]
    assert str(root) in writable, result
    assert outside == [], outside
    devices = {path for path in writable if path.startswith("/dev/")}
    assert devices <= {
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
        "/dev/ptmx",
        "/dev/shm",
        "/dev/fd",
        "/dev/stdin",
        "/dev/stdout",
        "/dev/stderr",
    } | {path for path in devices if path.startswith(("/dev/pts/", "/dev/shm/"))}


@needs_root
async def test_hidden_folders_are_empty_to_commands(
    tmp_path: Path, outside_tmp: Path, instance: Instance
) -> None:
    """Folders in ``hidden`` look empty; a tmp folder inside one still works."""
    (outside_tmp / "secret.txt").write_text("private")
    isolation = Isolation(enabled=True, hidden=(outside_tmp, Path("/var")))
    backend = LocalBackend(tmp_path / "work", isolation=isolation)
    await backend.open()
    container_id = await backend.create(instance)
    try:
        result = await backend.exec(
            container_id,
            f"ls -A {outside_tmp}; ls /var; echo x > /var/tmp/x && ls $TMPDIR",
            timeout=30,
        )
    finally:
        await backend.remove(container_id)
        await backend.close()

    assert result.ok, result
    assert result.stdout.split() == ["tmp", "x"]


@needs_root
async def test_the_servers_store_is_hidden_from_exec(
    start_server: ServerStarter,
    c_dataset: Path,
    outside_tmp: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Through the real server, an exec cannot see the store or other containers."""
    os.chmod(outside_tmp, 0o755)  # so that only the server wiring hides the store
    store = outside_tmp / "db" / "store.sqlite3"
    settings = {"workdir": outside_tmp / "work", "store_path": store}
    body = {"dataset_name": "csum", "split": "test", "instance_id": "sum_squares"}
    async with start_server(
        backend="local", datasets=[f"csum={c_dataset}"], **settings
    ) as url:
        ids = []
        for _ in range(2):
            async with http.post(f"{url}/v1/containers", json=body) as response:
                ids.append((await response.json())["container_id"])
        command = f"ls {store.parent}; ls {outside_tmp / 'work' / 'containers'}"
        async with http.post(
            f"{url}/v1/containers/{ids[0]}/exec", json={"command": command}
        ) as response:
            result = await response.json()

    assert result["exit_code"] == 0, result
    assert result["stdout"].split() == [ids[0]], result  # no store.sqlite3


@needs_root
async def test_a_tmpdir_swapped_for_a_symlink_is_replaced(
    confined: LocalBackend, box: str
) -> None:
    """An agent pointing TMPDIR at /etc gets a fresh TMPDIR; /etc keeps its owner."""
    await confined.exec(box, 'rm -rf "$TMPDIR" && ln -s /etc "$TMPDIR"', timeout=30)

    result = await confined.exec(
        box, 'test ! -L "$TMPDIR" && touch "$TMPDIR/x"', timeout=30
    )

    assert result.ok, result
    assert os.stat("/etc").st_uid == 0
    assert existing(["/etc/x"]) == []


@needs_root
async def test_containers_made_unconfined_are_handed_over(
    tmp_path: Path, instance: Instance
) -> None:
    """Reopening a workdir with isolation gives its old containers their own uid."""
    plain = LocalBackend(tmp_path / "work", isolation=Isolation(enabled=False))
    await plain.open()
    container_id = await plain.create(instance)
    await plain.close()

    backend = LocalBackend(tmp_path / "work", isolation=Isolation(enabled=True))
    await backend.open()
    try:
        result = await backend.exec(
            container_id, "id -u; touch new; git status --porcelain", timeout=30
        )
    finally:
        await backend.remove(container_id)
        await backend.close()

    assert result.ok, result
    uid, status = result.stdout.split("\n", 1)
    assert int(uid) in Isolation().uids
    assert status == "?? new\n"


# -- limits -------------------------------------------------------------------


@needs_root
async def test_file_size_is_limited(confined: LocalBackend, box: str) -> None:
    """A file cannot grow past ``file_size``: the writer gets SIGXFSZ."""
    result = await confined.exec(box, "head -c 5000000 /dev/zero > big", timeout=60)

    assert result.exit_code == 128 + signal.SIGXFSZ, result
    assert (confined.containers_dir / box / "big").stat().st_size == 1 << 20


@needs_root
async def test_memory_is_limited(confined: LocalBackend, box: str) -> None:
    """A process cannot map more than ``memory`` bytes."""
    script = "x = bytearray(1 << 30)"

    result = await confined.exec(box, f"python3 -c '{script}'", timeout=60)

    assert result.exit_code == 1, result
    assert "MemoryError" in result.stderr


@needs_root
async def test_cpu_time_is_limited(confined: LocalBackend, box: str) -> None:
    """A busy loop is stopped by SIGXCPU after ``cpu_time`` seconds of CPU."""
    result = await confined.exec(box, ENDLESS_LOOP, timeout=100)

    assert not result.timed_out, result
    assert result.exit_code == 128 + signal.SIGXCPU, result


@needs_root
async def test_processes_are_limited_per_container(
    confined: LocalBackend, instance: Instance, box: str
) -> None:
    """A fork bomb stops at ``pids_limit``; another container still runs commands."""
    other = await confined.create(instance)
    bomb = asyncio.create_task(confined.exec(box, FORK_BOMB, timeout=8))
    try:
        await asyncio.sleep(3)
        count = len(processes_of(uid_of(confined, box)))
        meanwhile = await confined.exec(other, "sh -c 'echo fine'", timeout=60)
        await bomb
    finally:
        await confined.remove(other)

    assert 32 <= count <= 64 == SMALL_LIMITS.pids_limit
    assert meanwhile.ok and meanwhile.stdout == "fine\n", meanwhile
    assert await wait_for_no_processes_of(uid_of(confined, box)) == []


# -- untrusted code through the grading pipeline -------------------------------


def nasty_dataset(**commands: str) -> Dataset:
    """Return a dataset of instances whose build command is each given command."""
    instances = {
        ("test", name): Instance(
            dataset_name="nasty",
            instance_id=name,
            build_command=command,
            test_command="true",
            benchmark_command="true",
        )
        for name, command in commands.items()
    }
    return Dataset(name="nasty", path=None, instances=instances)


async def grade_one(
    backend: LocalBackend, dataset: Dataset, name: str, *, time_limit: float
) -> tuple[Outcome, int]:
    """Grade a fresh container of one instance in build mode; return its uid too."""
    instance = dataset.get(name)
    container_id = await backend.create(instance)
    try:
        uid = uid_of(backend, container_id)
        outcome = await grade(
            backend=backend,
            dataset=dataset,
            instance=instance,
            container_id=container_id,
            mode=Mode.BUILD,
            lease=CPU,
            timeout=time_limit,
            baselines=MemoryBaselineCache(),
        )
    finally:
        await backend.remove(container_id)
    return outcome, uid


@needs_root
@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("fork_bomb", FORK_BOMB),
        ("endless_loop", ENDLESS_LOOP),
        ("endless_output", ENDLESS_OUTPUT),
    ],
    ids=["fork_bomb", "endless_loop", "endless_output"],
)
async def test_untrusted_code_ends_as_an_outcome(
    confined: LocalBackend, name: str, command: str
) -> None:
    """A fork bomb, an endless loop or endless output ends as an agent's outcome.

    Each is stopped by its CPU limit (build_failed) or by the evaluation
    timeout (timed_out); afterwards nothing of the container's uid is left
    and the backend grades an ordinary instance normally.
    """
    dataset = nasty_dataset(**{name: command, "ordinary": "echo built"})

    outcome, uid = await grade_one(confined, dataset, name, time_limit=8)
    left = await wait_for_no_processes_of(uid)
    after, _ = await grade_one(confined, dataset, "ordinary", time_limit=60)

    assert not outcome.success
    assert outcome.error in {ErrorCode.BUILD_FAILED, ErrorCode.TIMED_OUT}, outcome
    assert not outcome.infra_failure
    assert len(outcome.build_output) <= 2 * 64 * 1024 + 1000
    assert left == []
    assert after.success, after


@needs_root
async def test_server_grades_endless_output_and_stays_healthy(
    start_server: ServerStarter, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Through the real server, endless output ends as timed_out; /healthz is fine."""
    root = tmp_path / "nasty"
    root.mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            [
                {"instance_id": "noisy", "build_command": ENDLESS_OUTPUT},
                {"instance_id": "quiet", "build_command": "echo built"},
            ]
        )
    )
    async with start_server(
        backend="local", datasets=[f"nasty={root / 'dataset.json'}"]
    ) as url:
        outcomes = {}
        for name in ("noisy", "quiet"):
            body = {"dataset_name": "nasty", "split": "test", "instance_id": name}
            async with http.post(f"{url}/v1/containers", json=body) as response:
                container_id = (await response.json())["container_id"]
            legacy = {
                "instance_id": name,
                "container_id": container_id,
                "mode": "build",
                "dataset_name": "nasty",
                "timeout": 10,
            }
            async with http.post(f"{url}/evaluate_v3", json=legacy) as response:
                assert response.status == 200, await response.text()
                outcomes[name] = await response.json()
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200

    assert outcomes["noisy"]["error"] == "timed_out", outcomes["noisy"]
    assert outcomes["noisy"]["timed_out"] is True
    assert outcomes["quiet"]["success"] is True, outcomes["quiet"]


# -- the server's own process --------------------------------------------------

_CRASHING_SERVER = """
import asyncio, sys
from pathlib import Path
from agent_v2.datasets import Instance
from agent_v2.sandbox import Isolation, LocalBackend

async def main():
    backend = LocalBackend(Path(sys.argv[1]), isolation=Isolation(enabled=True))
    await backend.open()
    box = await backend.create(Instance(dataset_name="d", instance_id="i"))
    print((backend.containers_dir / box).stat().st_uid, flush=True)
    await backend.exec(box, "sleep 300 & sleep 300", timeout=600)

asyncio.run(main())
"""


@needs_root
async def test_commands_die_with_a_killed_server(tmp_path: Path) -> None:
    """When the server is killed with SIGKILL, its confined commands end too."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_SERVER,
        str(tmp_path / "work"),
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    uid = int(await asyncio.wait_for(process.stdout.readline(), timeout=60))
    for _ in range(100):
        if len(processes_of(uid)) >= 2:
            break
        await asyncio.sleep(0.1)
    started = len(processes_of(uid))

    process.kill()
    await process.wait()

    assert started >= 2
    assert await wait_for_no_processes_of(uid) == []


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"cpu_time": 0},
        {"memory": -1},
        {"pids_limit": 1.5},
        {"file_size": True},
        {"open_files": "many"},
    ],
)
def test_bad_limits_are_refused(fields: dict[str, Any]) -> None:
    """A limit that is not a positive integer raises ConfigError naming it."""
    name = next(iter(fields))
    with pytest.raises(ConfigError, match=name):
        Limits(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"uid_base": 0},
        {"uid_count": 1},
        {"uid_base": 2**31 - 10, "uid_count": 100},
        {"hidden": ("relative/path",)},
        {"hidden": ("/",)},
        {"limits": {"memory": 1}},
        {"groups": (True,)},
        {"groups": (1.5,)},
    ],
)
def test_bad_isolation_is_refused(fields: dict[str, Any]) -> None:
    """Isolation settings that cannot work raise ConfigError at construction."""
    with pytest.raises(ConfigError):
        Isolation(**fields)


def test_limits_map_to_prlimit_options() -> None:
    """Each limit becomes its prlimit option; the process limit needs its own uid."""
    limits = Limits(cpu_time=7, memory=100, pids_limit=9, file_size=5, open_files=None)

    assert limits.prlimit_options(per_uid=True) == [
        "--core=0",
        "--cpu=7:8",
        "--as=100",
        "--nproc=9",
        "--fsize=5",
    ]
    assert "--nproc=9" not in limits.prlimit_options(per_uid=False)


@needs_root
async def test_a_range_holding_real_accounts_is_refused(tmp_path: Path) -> None:
    """Sandbox uids that belong to local accounts (such as bin) are refused."""
    backend = LocalBackend(
        tmp_path / "work", isolation=Isolation(enabled=True, uid_base=1)
    )
    with pytest.raises(ConfigError, match="accounts"):
        await backend.open()


@needs_root
async def test_hiding_the_tools_is_refused(tmp_path: Path) -> None:
    """A hidden folder that holds the isolation tools raises ConfigError."""
    backend = LocalBackend(
        tmp_path / "work", isolation=Isolation(enabled=True, hidden=(Path("/usr"),))
    )
    with pytest.raises(ConfigError, match="/usr"):
        await backend.open()


_AS_ANOTHER_USER = """
import asyncio, logging, sys
from pathlib import Path
from agent_v2.datasets import Instance
from agent_v2.errors import ConfigError
from agent_v2.sandbox import Isolation, LocalBackend

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

async def main():
    work = Path(sys.argv[1])
    try:
        await LocalBackend(work, isolation=Isolation(enabled=True)).open()
    except ConfigError as exc:
        print("refused:", exc)
    backend = LocalBackend(work)
    await backend.open()
    print("level:", backend.isolation_level)
    box = await backend.create(Instance(dataset_name="d", instance_id="i"))
    result = await backend.exec(box, "id -u; ulimit -v", timeout=60)
    print("ran:", " ".join(result.stdout.split()))

asyncio.run(main())
"""


@needs_root
def test_as_another_user_only_limits_apply(outside_tmp: Path) -> None:
    """Not root: explicit isolation is refused; by default a warning, limits only."""
    outside_tmp.chmod(0o755)
    work = outside_tmp / "nobody"
    work.mkdir()
    os.chown(work, 65534, 65534)

    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            textwrap.dedent(_AS_ANOTHER_USER),
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: sandbox isolation was requested but")
    assert "not as root" in lines[0]
    assert lines[1:] == ["level: limits", f"ran: 65534 {8 << 20}"]
    assert "WARNING" in result.stderr and "without namespaces" in result.stderr
