"""Tests for loading datasets: the formats, templates, the manifest and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import agent_v2.datasets
from agent_v2.datasets import (
    Dataset,
    ProtectedFilesPolicy,
    bundled_dataset_path,
    load_dataset,
    parse_dataset_spec,
)
from agent_v2.errors import ConfigError, DatasetError, InstanceNotFound
from agent_v2.evaluation import BenchmarkStatistic, RewardPolicy


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _load_error(path: Path) -> str:
    with pytest.raises(DatasetError) as caught:
        load_dataset("d", path)
    return str(caught.value)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repos" / "one"
    folder.mkdir(parents=True)
    (folder / "test.sh").write_text("exit 0\n")
    (folder / "bench.c").write_text("int main(void) { return 0; }\n")
    return folder


def test_public_names_are_pinned() -> None:
    """The datasets package exports exactly the documented names."""
    assert sorted(agent_v2.datasets.__all__) == [
        "Dataset",
        "Instance",
        "ProtectedFilesPolicy",
        "bundled_dataset_path",
        "load_dataset",
        "parse_dataset_spec",
    ]


def test_json_array_with_every_field(tmp_path: Path, repo: Path) -> None:
    """A JSON array record keeps every known field and the rest in ``fields``."""
    record = {
        "instance_id": "one",
        "split": "dev",
        "repo_path": "repos/one",
        "build_command": "make",
        "test_command": "sh test.sh",
        "benchmark_command": "./bench",
        "timeout": 90,
        "protected_files": ["./test.sh", "bench.c", "test.sh"],
        "image_name": "img:1",
        "workdir": "/work",
        "difficulty": 3,
    }
    dataset = load_dataset("d", _write_json(tmp_path / "d.json", [record]))

    instance = dataset.get("one", "dev")
    assert instance.dataset_name == "d"
    assert instance.repo_path == repo.resolve()
    assert (instance.build_command, instance.test_command) == ("make", "sh test.sh")
    assert instance.benchmark_command == "./bench"
    assert instance.timeout == 90.0
    assert instance.protected_files == ("test.sh", "bench.c")
    assert (instance.image_name, instance.workdir) == ("img:1", "/work")
    assert dict(instance.fields) == {"difficulty": 3}
    assert dataset.splits == ["dev"]
    assert dataset.reward_policy == RewardPolicy()
    assert dataset.protected_files_policy is ProtectedFilesPolicy.RESTORE


def test_jsonl_defaults_split_and_allows_blank_lines(tmp_path: Path) -> None:
    """JSONL takes one record per line, skips blank lines, and split is ``test``."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instance_id": "a"}\n\n   \n{"instance_id": "b"}\n')

    dataset = load_dataset("d", path)

    assert sorted(dataset.instances) == [("test", "a"), ("test", "b")]
    assert dataset.get("a").repo_path is None
    with pytest.raises(InstanceNotFound, match="'c'"):
        dataset.get("c")


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_a_leading_byte_order_mark_is_dropped(tmp_path: Path, name: str) -> None:
    """A file some editors save with a UTF-8 BOM loads like one without."""
    path = tmp_path / name
    record = '{"instance_id": "a"}'
    path.write_bytes(
        b"\xef\xbb\xbf" + (f"[{record}]" if name == "d.json" else record).encode()
    )

    assert sorted(load_dataset("d", path).instances) == [("test", "a")]


def test_manifest_with_templates_serves_kernel_style_records(tmp_path: Path) -> None:
    """Defaults render ``{field}`` from each record; a record's own command wins."""
    (tmp_path / "kernels" / "k1").mkdir(parents=True)
    (tmp_path / "kernels" / "k1" / "test_k1.cpp").write_text("")
    records = [
        {
            "instance_id": "k1",
            "repo": "org/kernels",
            "path_in_repo": "k1",
            "commit_id": "abc123",
            "test_file": "test_k1.cpp",
            "benchmark_file": "bench_k1.cpp",
            "image_name": "kernels:latest",
        },
        {
            "instance_id": "k2",
            "split": "dev",
            "test_file": "test_k2.cpp",
            "benchmark_file": "bench_k2.cpp",
            "build_command": "make k2",
            "repo_path": None,
        },
    ]
    _write_jsonl(tmp_path / "records.jsonl", records)
    manifest = {
        "instances": "records.jsonl",
        "defaults": {
            "repo_path": "kernels/{instance_id}",
            "build_command": "cmake --build build --target {test_file}",
            "test_command": "ctest -R {test_file} # {split} of {dataset_name}",
            "benchmark_command": "./build/{benchmark_file} --benchmark_format=json",
            "protected_files": ["{test_file}"],
            "timeout": 600,
        },
        "reward_policy": {"base": 0.0, "target_speedup": 2},
        "protected_files_policy": "fail",
        "benchmark_statistic": "min",
    }
    dataset = load_dataset("kb", _write_json(tmp_path / "kb.json", manifest))

    k1 = dataset.get("k1")
    assert k1.build_command == "cmake --build build --target test_k1.cpp"
    assert k1.test_command == "ctest -R test_k1.cpp # test of kb"
    assert k1.benchmark_command == "./build/bench_k1.cpp --benchmark_format=json"
    assert k1.protected_files == ("test_k1.cpp",)
    assert k1.repo_path == (tmp_path / "kernels" / "k1").resolve()
    assert k1.image_name == "kernels:latest"
    assert k1.fields["commit_id"] == "abc123"
    assert k1.timeout == 600.0

    k2 = dataset.get("k2", "dev")
    assert k2.build_command == "make k2"
    assert k2.test_command == "ctest -R test_k2.cpp # dev of kb"
    assert k2.repo_path is None
    assert dataset.reward_policy == RewardPolicy(base=0.0, target_speedup=2.0)
    assert dataset.protected_files_policy is ProtectedFilesPolicy.FAIL
    assert dataset.benchmark_statistic is BenchmarkStatistic.MIN


def test_manifest_with_inline_instances_and_escaped_braces(tmp_path: Path) -> None:
    """Inline instances work, and ``{{`` in a template stays a literal brace."""
    manifest = {
        "instances": [{"instance_id": "x", "n": 4}],
        "defaults": {"test_command": "awk 'BEGIN {{ print {n} }}'"},
    }
    dataset = load_dataset("d", _write_json(tmp_path / "d.json", manifest))

    assert dataset.get("x").test_command == "awk 'BEGIN { print 4 }'"


def test_bundled_sample_dataset_loads() -> None:
    """The bundled sample has two C instances with every command and protection."""
    path = bundled_dataset_path("sample")
    dataset = load_dataset("sample", path)

    assert isinstance(dataset, Dataset)
    assert sorted(dataset.instances) == [("test", "count_primes"), ("test", "matmul")]
    for instance in dataset.instances.values():
        assert instance.repo_path is not None and instance.repo_path.is_dir()
        assert instance.build_command and "cc " in instance.build_command
        assert instance.test_command and instance.benchmark_command
        assert {"test.sh", "bench.c"} <= set(instance.protected_files)
    with pytest.raises(ConfigError, match="'nope'"):
        bundled_dataset_path("nope")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sample=data/d.json", ("sample", Path("data/d.json"))),
        ("org/kb = /x/kb.jsonl", ("org/kb", Path("/x/kb.jsonl"))),
        ("a=b=c.json", ("a", Path("b=c.json"))),
    ],
)
def test_parse_dataset_spec(spec: str, expected: tuple[str, Path]) -> None:
    """NAME=PATH splits at the first ``=`` and trims spaces."""
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("spec", ["d.json", "=d.json", "name=", "my name=d.json"])
def test_parse_dataset_spec_rejects_bad_specs(spec: str) -> None:
    """A spec without a name, a path or with a spaced name is a ConfigError."""
    with pytest.raises(ConfigError, match="dataset"):
        parse_dataset_spec(spec)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    """A missing file or a folder given as the dataset names the path."""
    assert "does not exist" in _load_error(tmp_path / "nope.json")
    assert "is a folder" in _load_error(tmp_path)


def test_bad_json_names_line_and_column(tmp_path: Path) -> None:
    """Invalid JSON reports the file, line and column."""
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instance_id": "a",}\n]')

    message = _load_error(path)

    assert str(path) in message
    assert "line 2 column" in message


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    """A broken JSONL line reports its line number and column."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instance_id": "a"}\n\n{"instance_id": \n')

    message = _load_error(path)

    assert f"{path}: line 3: invalid JSON at column" in message


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "record 0: field 'instance_id' is missing"),
        ({"instance_id": 7}, "field 'instance_id' must be a string, got a number"),
        ({"instance_id": " "}, "field 'instance_id' must be 1 to"),
        ({"instance_id": "a", "timeout": -1}, "'a'): field 'timeout' must be a pos"),
        ({"instance_id": "a", "timeout": True}, "field 'timeout' must be a positive"),
        ({"instance_id": "a", "timeout": "5"}, "field 'timeout' must be a positive"),
        ({"instance_id": "a", "split": 3}, "field 'split' must be a non-empty str"),
        ({"instance_id": "a", "build_command": ["make"]}, "'build_command' must"),
        ({"instance_id": "a", "test_command": ""}, "field 'test_command' must be"),
        ({"instance_id": "a", "image_name": {}}, "field 'image_name' must be"),
        ({"instance_id": "a", "repo_path": 3}, "field 'repo_path' must be a folder"),
        ({"instance_id": "a", "repo_path": "nope"}, "not an existing folder"),
        ({"instance_id": "a", "protected_files": "t.sh"}, "must be a list"),
        ({"instance_id": "a", "protected_files": ["/etc/x"]}, "must be relative"),
        ({"instance_id": "a", "protected_files": ["a/../../x"]}, "must not contain"),
        ({"instance_id": "a", "protected_files": ["."]}, "not the whole container"),
        ({"instance_id": "a", "protected_files": [3]}, "protected_files[0]' must"),
    ],
)
def test_bad_records_name_record_and_field(
    tmp_path: Path, record: dict[str, Any], expected: str
) -> None:
    """Each wrong field fails the load with the file, record and field named."""
    path = _write_json(tmp_path / "d.json", [record])

    message = _load_error(path)

    assert message.startswith(f"{path}: record 0")
    assert expected in message


def test_record_that_is_not_an_object(tmp_path: Path) -> None:
    """A JSONL line holding an array is named by its line number."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"instance_id": "a"}\n["b"]\n')

    assert "line 2: must be a JSON object, got an array" in _load_error(path)


def test_duplicate_instance_in_a_split(tmp_path: Path) -> None:
    """The same (split, instance_id) twice fails, naming both places."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instance_id": "a"}\n{"instance_id": "a", "split": "dev"}\n'
        '{"instance_id": "a"}\n'
    )

    message = _load_error(path)

    assert "line 3 (instance_id 'a')" in message
    assert "duplicate instance_id 'a' in split 'test' (first at line 1)" in message


def test_protected_file_missing_from_repo(tmp_path: Path, repo: Path) -> None:
    """A protected path that the instance's files lack fails at load."""
    record = {"instance_id": "a", "repo_path": "repos/one", "protected_files": ["x"]}

    message = _load_error(_write_json(tmp_path / "d.json", [record]))

    assert "field 'protected_files[0]' names 'x', which does not exist" in message


def test_template_naming_a_missing_field(tmp_path: Path) -> None:
    """A default template that refers to a field the record lacks fails at load."""
    manifest = {
        "instances": [{"instance_id": "a", "test_file": "t"}, {"instance_id": "b"}],
        "defaults": {"build_command": "make {test_file}"},
    }
    message = _load_error(_write_json(tmp_path / "d.json", manifest))

    assert "record 1 (instance_id 'b'): field 'build_command'" in message
    assert "refers to {test_file}, which this record lacks" in message


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("make {", "has an invalid template"),
        ("echo ${HOME}", "refers to {HOME}, which this record lacks"),
        ("make {0}", "only plain field names"),
        ("make {a.b}", "only plain field names"),
        ("make {obj}", "which is an object"),
    ],
)
def test_bad_templates(tmp_path: Path, template: str, expected: str) -> None:
    """Malformed templates and unusable references are load errors."""
    manifest = {
        "instances": [{"instance_id": "a", "obj": {"k": 1}}],
        "defaults": {"build_command": template},
    }
    message = _load_error(_write_json(tmp_path / "d.json", manifest))

    assert "field 'build_command'" in message
    assert expected in message


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ({"instances": []}, "has no instances"),
        ({"defaults": {}}, "field 'instances' is missing"),
        ({"instances": 3}, "field 'instances' must be a list"),
        ({"instances": [], "extra": 1}, "unknown manifest key(s) ['extra']"),
        ({"instances": [], "defaults": []}, "field 'defaults' must be an object"),
        ({"instances": [], "defaults": {"instance_id": "x"}}, "must not set"),
        ({"instances": [], "reward_policy": 1}, "'reward_policy' must be an object"),
        ({"instances": [], "reward_policy": {"base": 2}}, "reward_policy.base"),
        ({"instances": [], "reward_policy": {"bonus": 1}}, "unknown keys"),
        ({"instances": [], "protected_files_policy": "ask"}, "unknown policy 'ask'"),
        (
            {"instances": [], "benchmark_statistic": "mean"},
            "field 'benchmark_statistic': unknown statistic 'mean'",
        ),
        ({"instances": "missing.jsonl"}, "field 'instances': dataset file"),
    ],
)
def test_bad_manifests(tmp_path: Path, manifest: dict[str, Any], expected: str) -> None:
    """Manifest mistakes fail with the file and the field named."""
    path = _write_json(tmp_path / "d.json", manifest)

    message = _load_error(path)

    assert str(path) in message or "missing.jsonl" in message
    assert expected in message


def test_manifest_instances_file_errors_name_that_file(tmp_path: Path) -> None:
    """Errors in a manifest's instances file name that file and its line."""
    records = tmp_path / "records.jsonl"
    records.write_text('{"instance_id": "a"}\n{"instance_id": "b", "timeout": 0}\n')
    path = _write_json(tmp_path / "d.json", {"instances": "records.jsonl"})

    message = _load_error(path)

    assert message.startswith(f"{records}: line 2 (instance_id 'b')")


def test_nested_manifest_and_scalar_documents_are_refused(tmp_path: Path) -> None:
    """An instances file holding an object, or a document of a number, fails."""
    _write_json(tmp_path / "inner.json", {"instances": []})
    outer = _write_json(tmp_path / "outer.json", {"instances": "inner.json"})
    assert "manifests cannot be nested" in _load_error(outer)

    scalar = _write_json(tmp_path / "n.json", 42)
    assert "got a number" in _load_error(scalar)


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a DatasetError, not a traceback."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instance_id": "\xff"}\n')

    assert "cannot read dataset file" in _load_error(path)
