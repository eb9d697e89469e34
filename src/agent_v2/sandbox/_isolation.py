"""Confinement of local sandbox commands: a uid per container, namespaces, limits.

A confined command is wrapped in util-linux tools instead of a ``preexec_fn``
(which is not safe with threads)::

    setpriv --pdeathsig KILL            dies with the server
      unshare --mount --pid --net ...   new namespaces; its child is PID 1
        sh -c SETUP                     as root: hide the workdir, redirect /tmp
          prlimit ...                   CPU time, memory, processes, file size
            setpriv --reuid UID ...     the container's uid, no capabilities
              [taskset] bash -c COMMAND

The setup shell stays PID 1 of the new PID namespace, so when the command
ends, or the shell is killed, the kernel kills every process left in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import pwd
import random
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from agent_v2.errors import ConfigError, SandboxError

__all__ = [
    "DEFAULT_CPU_TIME",
    "DEFAULT_FILE_SIZE",
    "DEFAULT_MEMORY",
    "DEFAULT_OPEN_FILES",
    "DEFAULT_PATH",
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_SCRATCH_SIZE",
    "DEFAULT_UID_BASE",
    "DEFAULT_UID_COUNT",
    "SETUP_EXIT_CODE",
    "TMP_DIRS",
    "Confined",
    "Isolation",
    "Isolator",
    "Limits",
    "hand_over",
]

logger = logging.getLogger(__name__)

_MIB = 1 << 20
_GIB = 1 << 30

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` of every command, and where the isolation tools are looked up."""

DEFAULT_CPU_TIME = 1800
"""Seconds of CPU time one process of a command may use (RLIMIT_CPU)."""

DEFAULT_MEMORY = 8 * _GIB
"""Bytes of address space one process of a command may map (RLIMIT_AS)."""

DEFAULT_PIDS_LIMIT = 1024
"""Processes and threads the commands of one container may have at once."""

DEFAULT_FILE_SIZE = 16 * _GIB
"""Bytes one file written by a command may reach (RLIMIT_FSIZE)."""

DEFAULT_OPEN_FILES = 4096
"""File descriptors one process of a command may hold (RLIMIT_NOFILE)."""

DEFAULT_UID_BASE = 1_900_000_000
"""First uid of the sandbox range: above the ranges Linux distributions and
systemd hand out (up to 1,879,048,191), below 2**31 for tools that use int."""

DEFAULT_UID_COUNT = 65_536
"""Uids in the sandbox range: one per container, plus one for the probe."""

DEFAULT_SCRATCH_SIZE = 256 * _MIB
"""Bytes of the private /tmp a command gets when the workdir lies inside /tmp."""

TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
"""Folders every user may write on a usual Linux host; confined commands see
their container's TMPDIR there instead."""

SETUP_EXIT_CODE = 125
"""Exit code of a confined command whose setup failed before it started."""

_UID_LIMIT = 2**31 - 1
_SETUP_NAME = "agent-v2-sandbox"
_FULL_TOOLS = ("unshare", "setpriv", "prlimit", "mount", "mkdir", "stat", "sh")
_PROBE_TIMEOUT = 30.0


def _positive(name: str, value: int | None) -> None:
    """Refuse a limit that is neither None nor a positive integer."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"{name} must be a positive integer or None (no limit), got {value!r}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Resource limits of confined commands; ``None`` leaves one unlimited.

    ``cpu_time``, ``memory`` (address space), ``file_size`` and ``open_files``
    apply to each process; ``pids_limit`` counts every process and thread of
    one container's commands together (they share the container's uid).
    """

    cpu_time: int | None = DEFAULT_CPU_TIME
    memory: int | None = DEFAULT_MEMORY
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    file_size: int | None = DEFAULT_FILE_SIZE
    open_files: int | None = DEFAULT_OPEN_FILES

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _positive(field.name, getattr(self, field.name))

    def prlimit_options(self, *, per_uid: bool) -> list[str]:
        """Return the prlimit options; ``per_uid`` says the uid is the container's.

        RLIMIT_NPROC counts every process of the real uid, so it is only set
        when that uid belongs to one container.
        """
        options = ["--core=0"]
        if self.cpu_time is not None:
            # The soft limit sends SIGXCPU (exit code 152); the hard one SIGKILL.
            options.append(f"--cpu={self.cpu_time}:{self.cpu_time + 1}")
        if self.memory is not None:
            options.append(f"--as={self.memory}")
        if self.pids_limit is not None and per_uid:
            options.append(f"--nproc={self.pids_limit}")
        if self.file_size is not None:
            options.append(f"--fsize={self.file_size}")
        if self.open_files is not None:
            options.append(f"--nofile={self.open_files}")
        return options


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Isolation:
    """How the local backend confines commands.

    ``enabled``: ``None`` confines when the server runs as root and the tools
    work (otherwise it warns and applies only the limits), ``True`` fails at
    open when that is impossible, ``False`` runs commands as the server's own
    user with nothing confined. Each container gets its own uid from
    ``uid_base + 1 .. uid_base + uid_count - 1`` (``uid_base`` runs the probe
    at open); no real account may use one. ``hidden`` names more folders a
    command must not see (the workdir is always hidden but for its own
    container); ``network=True`` keeps the host's network. ``groups`` are
    supplementary groups (names or gids) the sandbox uids join, such as
    ``("render", "video")`` so that commands may open a host's GPUs; by
    default they belong to no group at all.
    """

    enabled: bool | None = None
    limits: Limits = dataclasses.field(default_factory=Limits)
    network: bool = False
    uid_base: int = DEFAULT_UID_BASE
    uid_count: int = DEFAULT_UID_COUNT
    hidden: tuple[Path, ...] = ()
    groups: tuple[str | int, ...] = ()
    scratch_size: int = DEFAULT_SCRATCH_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a Limits, got {self.limits!r}")
        _positive("uid_base", self.uid_base)
        _positive("uid_count", self.uid_count)
        _positive("scratch_size", self.scratch_size)
        last = self.uid_base + self.uid_count - 1
        if self.uid_count < 2 or last > _UID_LIMIT:
            raise ConfigError(
                f"the sandbox uids {self.uid_base}..{last} must number at least 2 "
                f"and end below {_UID_LIMIT + 1}"
            )

        hidden = tuple(Path(path) for path in self.hidden)
        for path in hidden:
            if not path.is_absolute() or path == Path("/"):
                raise ConfigError(
                    f"hidden folder {str(path)!r} must be an absolute path other "
                    "than '/'"
                )
        object.__setattr__(self, "hidden", hidden)

        groups = tuple(self.groups)
        for group in groups:
            if isinstance(group, bool) or not isinstance(group, str | int):
                raise ConfigError(
                    f"groups must hold group names or gids, got {group!r}"
                )
        object.__setattr__(self, "groups", groups)

    def gids(self) -> list[int]:
        """Return the gids of ``groups``; raise ConfigError for an unknown name."""
        gids = []
        for group in self.groups:
            if isinstance(group, int):
                gids.append(group)
                continue
            try:
                gids.append(grp.getgrnam(group).gr_gid)
            except KeyError:
                raise ConfigError(
                    f"group {group!r} does not exist on this host; create it or "
                    "remove it from Isolation.groups"
                ) from None
        return gids

    @property
    def uids(self) -> range:
        """Return the uids containers may get."""
        return range(self.uid_base + 1, self.uid_base + self.uid_count)


@dataclasses.dataclass(frozen=True, slots=True)
class Confined:
    """What one command in a container needs to be wrapped."""

    uid: int
    tmp_identity: str


Level = Literal["full", "limits"]


class Isolator:
    """Wraps the commands of one backend and owns the uid of each container.

    Built by :meth:`start`; ``level`` is ``"full"`` (uid, namespaces, limits)
    or ``"limits"`` (the server's own user with resource limits only).
    """

    def __init__(
        self,
        isolation: Isolation,
        *,
        level: Level,
        tools: dict[str, str],
        containers_dir: Path,
        tmp_name: str,
    ) -> None:
        self.isolation = isolation
        self.level: Level = level
        self._tools = tools
        self._containers = containers_dir
        self._tmp_name = tmp_name
        self._used: set[int] = set()
        # NOTE: a random start, so that backends sharing a host (tests, or
        # two servers on one uid range) rarely hand out the same uid.
        self._next = random.choice(isolation.uids)
        self._redirected: tuple[str, ...] = ()
        self._script = ""
        self._groups = ["--clear-groups"]
        if level == "full":
            self._plan_mounts()
            gids = isolation.gids()
            if gids:
                self._groups = [f"--groups={','.join(str(gid) for gid in gids)}"]

    def __repr__(self) -> str:
        return (
            f"Isolator(level={self.level!r}, network={self.isolation.network}, "
            f"limits={self.isolation.limits!r})"
        )

    # -- starting -------------------------------------------------------------

    @classmethod
    async def start(
        cls, isolation: Isolation, containers_dir: Path, *, tmp_name: str
    ) -> Isolator | None:
        """Return the isolator ``isolation`` asks for, or None for no isolation.

        Raises ConfigError when isolation was requested and cannot be had.
        """
        if isolation.enabled is False:
            return None

        problem, tools = _full_isolation_problem(isolation)
        if problem is None:
            isolator = cls(
                isolation,
                level="full",
                tools=tools,
                containers_dir=containers_dir,
                tmp_name=tmp_name,
            )
            problem = await isolator._probe()
            if problem is None:
                await asyncio.to_thread(isolator._claim_containers)
                logger.info("confining commands in %s: %r", containers_dir, isolator)
                return isolator

        if isolation.enabled:
            raise ConfigError(
                f"sandbox isolation was requested but {problem}; run the server "
                "as root on Linux with util-linux installed, or turn isolation off"
            )
        return cls._fall_back(isolation, containers_dir, tmp_name, problem)

    @classmethod
    def _fall_back(
        cls, isolation: Isolation, containers_dir: Path, tmp_name: str, problem: str
    ) -> Isolator | None:
        """Return a limits-only isolator (or None), after saying what is missing."""
        prlimit = shutil.which("prlimit", path=DEFAULT_PATH)
        logger.warning(
            "commands in %s run as this server's uid %d without namespaces, "
            "because %s: they can use the network and write wherever this user "
            "can%s",
            containers_dir,
            os.geteuid(),
            problem,
            "; CPU time, memory and file size are still limited"
            if prlimit
            else "; prlimit was not found either, so nothing is limited",
        )
        if prlimit is None:
            return None
        return cls(
            isolation,
            level="limits",
            tools={"prlimit": prlimit},
            containers_dir=containers_dir,
            tmp_name=tmp_name,
        )

    def _plan_mounts(self) -> None:
        """Decide what each command hides and redirects; write its setup script."""
        workdir = self._containers.parent
        tmp_dirs = _tmp_dirs()
        private = [d for d in tmp_dirs if self._containers.is_relative_to(d)]
        redirected = [d for d in tmp_dirs if d not in private]
        hidden = _outermost([_private_ancestor(workdir), *self.isolation.hidden])
        # A folder inside a private /tmp disappears with it anyway.
        hidden = [h for h in hidden if not any(h.is_relative_to(d) for d in private)]
        for path in hidden:
            tool = next(
                (t for t in self._tools.values() if Path(t).is_relative_to(path)), None
            )
            if tool is not None:
                raise ConfigError(
                    f"cannot hide {str(path)!r} from commands: it holds {tool!r}"
                )

        self._redirected = tuple(str(d) for d in redirected)
        self._script = _setup_script(
            hidden=[str(h) for h in hidden],
            redirected=self._redirected,
            private=[str(d) for d in private],
            scratch_size=self.isolation.scratch_size,
            tmp_name=self._tmp_name,
        )

    async def _probe(self) -> str | None:
        """Run one confined command; return what went wrong, or None."""
        uid = self.isolation.uid_base
        root = await asyncio.to_thread(self._make_probe_container, uid)
        try:
            confined = await asyncio.to_thread(self._prepare_as, root, uid)
            argv = self.wrap(["/bin/sh", "-c", "id -u"], root=root, confined=confined)
            return await _run_probe(argv, root, expected=f"{uid}\n")
        finally:
            await asyncio.to_thread(shutil.rmtree, root, True)

    def _make_probe_container(self, uid: int) -> Path:
        """Create an empty folder in the containers folder, owned by ``uid``."""
        self._containers.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=".isolation-probe-", dir=self._containers))
        hand_over(root, uid)
        return root

    def _claim_containers(self) -> None:
        """Note the uids of existing containers; give one to those without."""
        for entry in os.scandir(self._containers):
            if entry.name.startswith("."):  # a probe left by a crash
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            owner = entry.stat(follow_symlinks=False).st_uid
            if owner in self.isolation.uids and owner not in self._used:
                self._used.add(owner)
            else:
                # Made while isolation was off, or shares a uid by mistake.
                uid = self.allocate()
                hand_over(Path(entry.path), uid)
                logger.info("gave container %s the sandbox uid %d", entry.name, uid)

    # -- uids -----------------------------------------------------------------

    @property
    def owns_uids(self) -> bool:
        """Return whether each container runs as its own uid."""
        return self.level == "full"

    def allocate(self) -> int:
        """Return a uid no container uses, and mark it used."""
        uids = self.isolation.uids
        for _ in range(len(uids)):
            uid = self._next
            self._next = uid + 1 if uid + 1 < uids.stop else uids.start
            if uid not in self._used:
                self._used.add(uid)
                return uid
        raise SandboxError(
            f"all {len(uids)} sandbox uids are in use by containers; remove "
            "containers or raise Isolation.uid_count"
        )

    def release(self, uid: int | None) -> None:
        """Give back the uid of a removed container."""
        if uid is not None:
            self._used.discard(uid)

    def owner(self, root: Path) -> int | None:
        """Return the sandbox uid that owns a container folder, if any."""
        try:
            owner = os.lstat(root).st_uid
        except FileNotFoundError:
            return None
        return owner if owner in self.isolation.uids else None

    # -- commands -------------------------------------------------------------

    def prepare(self, root: Path) -> Confined:
        """Check a container before a command; make its TMPDIR (blocking)."""
        if not self.owns_uids:
            return Confined(uid=os.geteuid(), tmp_identity="")
        uid = os.lstat(root).st_uid
        if uid not in self.isolation.uids:
            raise SandboxError(
                f"container folder {str(root)!r} is owned by uid {uid}, not by a "
                f"sandbox uid in {self.isolation.uids}; restart the server so "
                "that it hands the container over"
            )
        return self._prepare_as(root, uid)

    def _prepare_as(self, root: Path, uid: int) -> Confined:
        """Make sure the container's TMPDIR is a real folder owned by ``uid``."""
        tmp = root / self._tmp_name
        try:
            info = os.lstat(tmp)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            # NOTE: never follow it: the agent may point it anywhere.
            tmp.unlink()
            info = None
        if info is None:
            # NOTE: exist_ok: two commands starting at once in one container
            # both find the folder missing; the second must not fail.
            tmp.mkdir(mode=0o755, exist_ok=True)
            info = os.lstat(tmp)
        if info.st_uid != uid or info.st_gid != uid:
            os.lchown(tmp, uid, uid)
        return Confined(uid=uid, tmp_identity=f"{info.st_dev}:{info.st_ino}")

    def wrap(self, argv: list[str], *, root: Path, confined: Confined) -> list[str]:
        """Return ``argv`` wrapped so that it runs confined in ``root``."""
        limits = self.isolation.limits.prlimit_options(per_uid=self.owns_uids)
        if self.level == "limits":
            return [self._tools["prlimit"], *limits, "--", *argv]

        tools = self._tools
        as_user = [
            tools["setpriv"],
            f"--reuid={confined.uid}",
            f"--regid={confined.uid}",
            *self._groups,
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
            *argv,
        ]
        namespaces = ["--mount", "--pid", "--ipc", "--uts"]
        if not self.isolation.network:
            namespaces.append("--net")
        expected = "\n".join([confined.tmp_identity] * len(self._redirected))
        return [
            tools["setpriv"],
            "--pdeathsig=KILL",
            "--",
            tools["unshare"],
            *namespaces,
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
            tools["sh"],
            "-c",
            self._script,
            _SETUP_NAME,
            str(root),
            expected,
            tools["prlimit"],
            *limits,
            "--",
            *as_user,
        ]


def hand_over(root: Path, uid: int) -> None:
    """Make ``uid`` own a container folder and everything in it (blocking)."""
    # NOTE: lchown and no symlink following: nothing an agent put in the
    # folder may make root change the owner of a file elsewhere.
    os.lchown(root, uid, uid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), uid, uid)
    os.chmod(root, 0o700)


def _full_isolation_problem(isolation: Isolation) -> tuple[str | None, dict[str, str]]:
    """Say why full isolation is impossible here (or None); return the tools."""
    if os.geteuid() != 0:
        return f"the server runs as uid {os.geteuid()}, not as root", {}

    tools = {name: shutil.which(name, path=DEFAULT_PATH) for name in _FULL_TOOLS}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        return f"{', '.join(missing)} could not be found in {DEFAULT_PATH}", {}

    taken = _accounts_in(isolation.uids)
    if taken:
        raise ConfigError(
            f"accounts {taken} have uids in the sandbox range {isolation.uids}; "
            "choose another Isolation.uid_base"
        )
    return None, {name: path for name, path in tools.items() if path is not None}


def _accounts_in(uids: Iterable[int]) -> list[str]:
    """Return the names of local accounts whose uid lies in ``uids``."""
    wanted = range(min(uids, default=0), max(uids, default=-1) + 1)
    return sorted(entry.pw_name for entry in pwd.getpwall() if entry.pw_uid in wanted)


def _tmp_dirs() -> list[Path]:
    """Return the existing folders of TMP_DIRS, symlinks resolved, once each."""
    found: list[Path] = []
    for name in TMP_DIRS:
        path = Path(name).resolve()
        if path.is_dir() and path not in found:
            found.append(path)
    return found


def _private_ancestor(workdir: Path) -> Path:
    """Return the outermost folder of ``workdir``'s path that others cannot enter.

    A command's container must stay reachable by its path, so the folder
    hidden is the first one others could not pass through anyway (such as
    ``/root``), or else the workdir itself.
    """
    for path in [*reversed(workdir.parents), workdir]:
        if path == Path("/"):
            continue
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return path
    return workdir


def _outermost(paths: list[Path]) -> list[Path]:
    """Return the paths that lie inside none of the others, sorted."""
    unique = sorted(set(paths), key=lambda path: len(path.parts))
    kept: list[Path] = []
    for path in unique:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return kept


def _setup_script(
    *,
    hidden: list[str],
    redirected: tuple[str, ...],
    private: list[str],
    scratch_size: int,
    tmp_name: str,
) -> str:
    """Return the shell script that sets up a command's mounts, then runs it.

    It runs as root inside the new namespaces, in the container's folder, with
    ``$1`` that folder, ``$2`` the expected device:inode of its TMPDIR once per
    redirected folder, and the command after them.
    """
    q = shlex.quote
    lines = [
        "root=$1 expected=$2; shift 2",
        f'fail() {{ echo "agent-v2 sandbox: $*" >&2; exit {SETUP_EXIT_CODE}; }}',
        "remount() { "
        'mkdir -p "$root" && mount -c --bind . "$root" '
        '|| fail "could not show the container at $root"; }',
    ]
    # NOTE: "." is the container's folder even once its path is covered (the
    # cwd keeps the real folder); -c stops mount from turning it into a path.
    for path in hidden:
        lines.append(
            f"mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev agent-v2-hidden "
            f"{q(path)} || fail {q('could not hide ' + path)}"
        )
    if hidden:
        lines.append("remount")
    if redirected or private:
        # A hidden folder may have covered one of them (say /var is hidden).
        targets = " ".join(q(p) for p in (*redirected, *private))
        lines.append(f"mkdir -p {targets} || fail {q('could not create ' + targets)}")
    for path in redirected:
        lines.append(
            f"mount -c --bind {q(tmp_name)} {q(path)} "
            f"|| fail {q('could not redirect ' + path)}"
        )
    for path in private:
        lines.append(
            f"mount -t tmpfs -o mode=1777,size={scratch_size},nosuid,nodev "
            f"agent-v2-tmp {q(path)} || fail {q('could not replace ' + path)}"
        )
    if private:
        lines.append("remount")
    if redirected:
        # NOTE: the agent owns the folder and may swap TMPDIR for a symlink
        # while a command starts; only what was really mounted counts.
        lines.append(
            f'[ "$(stat -c %d:%i {" ".join(q(p) for p in redirected)})" = '
            '"$expected" ] || fail "the container\'s TMPDIR changed while the '
            'command started; run the command again"'
        )
    # NOTE: not exec, and not the last command either (dash would exec it):
    # this shell stays PID 1, whose end kills everything the command left.
    lines += ['cd "$root" || fail "could not enter $root"', '"$@"', "exit $?"]
    return "\n".join(lines) + "\n"


async def _run_probe(argv: list[str], root: Path, *, expected: str) -> str | None:
    """Run the probe command; return a description of its failure, or None."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=root,
            env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return f"a confined probe command could not start: {exc}"

    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(), timeout=_PROBE_TIMEOUT
        )
    except TimeoutError:
        return f"a confined probe command did not end within {_PROBE_TIMEOUT:.0f} s"
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    if process.returncode == 0 and stdout.decode(errors="replace") == expected:
        return None
    detail = (stderr or stdout).decode(errors="replace").strip()
    return (
        f"a confined probe command failed with exit code {process.returncode}: "
        f"{detail or 'no output'}"
    )
