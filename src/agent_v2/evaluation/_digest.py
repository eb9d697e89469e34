"""A digest of what an instance's baseline depends on.

The server caches each instance's baseline times in its store, across
restarts. A dataset edited and served again under the same name must not
reuse times measured on its old files or commands, so the cache key carries
this digest: the build and benchmark commands, the image and working folder,
and every file a container gets from ``repo_path`` (``.git`` excluded, as the
backends copy it).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # agent_v2.datasets imports agent_v2.evaluation
    from agent_v2.datasets import Instance

__all__ = ["instance_digest"]

_CHUNK = 1 << 20


def instance_digest(instance: Instance) -> str:
    """Return a hex digest of the instance's commands, image and files.

    Reads every file under ``repo_path``: call it off the event loop. Raises
    OSError when the files cannot be read.
    """
    digest = hashlib.sha256()
    for value in (
        instance.build_command,
        instance.benchmark_command,
        instance.image_name,
        instance.workdir,
    ):
        digest.update(b"\x00" if value is None else b"\x01" + value.encode() + b"\x00")
    if instance.repo_path is not None:
        _add_tree(digest.update, instance.repo_path)
    return digest.hexdigest()


def _add_tree(update: Callable[[bytes], None], root: Path) -> None:
    """Feed every entry under ``root`` to ``update``, in a fixed order."""
    for folder, subfolders, files in os.walk(root, onerror=_raise):
        subfolders[:] = sorted(name for name in subfolders if name != ".git")
        for name in sorted([*files, *subfolders]):
            if name == ".git":
                continue
            path = Path(folder, name)
            info = path.lstat()
            update(os.fsencode(path.relative_to(root)) + b"\x00")
            if stat.S_ISLNK(info.st_mode):
                update(b"L" + os.fsencode(os.readlink(path)))
            elif stat.S_ISDIR(info.st_mode):
                update(b"D")
            elif stat.S_ISREG(info.st_mode):
                update(b"X" if info.st_mode & stat.S_IXUSR else b"F")
                _add_file(update, path)
            update(b"\x00")


def _add_file(update: Callable[[bytes], None], path: Path) -> None:
    """Feed a file's size and contents to ``update``."""
    with path.open("rb") as file:
        update(str(os.fstat(file.fileno()).st_size).encode() + b"\x00")
        while chunk := file.read(_CHUNK):
            update(chunk)


def _raise(error: OSError) -> None:
    """Make os.walk report a folder it cannot read instead of skipping it."""
    raise error
