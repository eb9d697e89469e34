"""Validation of container ids, shared by every sandbox backend."""

from __future__ import annotations

import re

from agent_v2.errors import InvalidContainerId

__all__ = ["MAX_CONTAINER_ID_LENGTH", "validate_container_id"]

MAX_CONTAINER_ID_LENGTH = 128

# NOTE: the first character must be a letter or digit, which already rules out
# ``.``, ``..``, hidden names and option-like ids (``-rf``). The same shape is
# accepted by Docker for container names, and covers its 64-digit hex ids.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_container_id(container_id: object) -> str:
    """Return ``container_id`` if it is well formed, else raise InvalidContainerId.

    A well-formed id is a non-empty string of at most 128 characters made of
    letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit;
    so it can name neither a parent folder nor an absolute path.
    """
    problem = _problem(container_id)
    if problem is not None:
        raise InvalidContainerId(
            f"invalid container id {container_id!r}: {problem}; use the "
            f"container_id returned when the container was created"
        )
    assert isinstance(container_id, str)  # _problem checked it
    return container_id


def _problem(container_id: object) -> str | None:
    """Say what is wrong with a container id, or return None when nothing is."""
    if not isinstance(container_id, str):
        return f"expected a string, got {type(container_id).__name__}"
    if not container_id:
        return "it is empty"
    if len(container_id) > MAX_CONTAINER_ID_LENGTH:
        return f"it is longer than {MAX_CONTAINER_ID_LENGTH} characters"
    if "\x00" in container_id:
        return "it contains a NUL byte"
    if "/" in container_id:
        return "it contains '/'"
    if container_id in (".", ".."):
        return "it names a folder, not a container"
    if _CONTAINER_ID.fullmatch(container_id) is None:
        return (
            "it must start with a letter or digit and contain only letters, "
            "digits, '_', '.' and '-'"
        )
    return None
