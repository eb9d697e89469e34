"""Tests of instance_digest: what a cached baseline is keyed by."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_v2.datasets import Instance
from agent_v2.evaluation import instance_digest


def _instance(repo: Path | None, **fields: str) -> Instance:
    commands = {"build_command": "make", "benchmark_command": "./bench"}
    commands.update(fields)
    return Instance(dataset_name="ds", instance_id="a", repo_path=repo, **commands)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small instance folder: a source, a script, a subfolder, a link."""
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / "src" / "kernel.c").write_text("int f(void) { return 1; }\n")
    (root / "run.sh").write_text("#!/bin/sh\n./bench\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("src/kernel.c")
    return root


def test_a_copy_elsewhere_has_the_same_digest(repo: Path, tmp_path: Path) -> None:
    """Only what a container gets counts: not where the folder is, not .git."""
    copy = tmp_path / "elsewhere" / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    (copy / ".git").mkdir()
    (copy / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (copy / "src" / ".git").write_text("gitdir: ../.git\n")

    assert instance_digest(_instance(copy)) == instance_digest(_instance(repo))


@pytest.mark.parametrize(
    "edit",
    [
        lambda root: (root / "src" / "kernel.c").write_text(
            "int f(void) { return 2; }\n"
        ),
        lambda root: (root / "run.sh").chmod(0o644),
        lambda root: (root / "src" / "new.h").write_text(""),
        lambda root: (root / "empty").mkdir(),
        lambda root: os.rename(root / "run.sh", root / "src" / "run.sh"),
        lambda root: (
            (root / "latest").unlink(),
            (root / "latest").symlink_to("run.sh"),
        ),
    ],
    ids=["content", "mode", "new-file", "new-folder", "moved", "link-target"],
)
def test_any_change_to_the_files_changes_the_digest(
    repo: Path, edit: Callable[[Path], object]
) -> None:
    """Content, mode, a new file or folder, a move, a link's target: each counts."""
    before = instance_digest(_instance(repo))
    edit(repo)
    assert instance_digest(_instance(repo)) != before


def test_the_commands_and_image_count_but_not_the_tests(repo: Path) -> None:
    """The baseline is the build and the benchmark; the test command is not in it."""
    base = _instance(repo, test_command="make test")
    digest = instance_digest(base)

    assert instance_digest(dataclasses.replace(base, test_command="true")) == digest
    for change in (
        {"build_command": "make -O2"},
        {"benchmark_command": "./bench --fast"},
        {"image_name": "kernels:v2"},
        {"workdir": "/src"},
    ):
        assert instance_digest(dataclasses.replace(base, **change)) != digest


def test_unreadable_files_raise(repo: Path, tmp_path: Path) -> None:
    """A repo_path that is gone is an OSError for the caller to report."""
    with pytest.raises(OSError):
        instance_digest(_instance(tmp_path / "gone"))
