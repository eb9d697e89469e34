"""Loading dataset files (JSON array, JSONL or manifest) into validated Datasets."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import string
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from agent_v2.datasets._model import (
    DEFAULT_SPLIT,
    Dataset,
    Instance,
    ProtectedFilesPolicy,
)
from agent_v2.errors import ConfigError, DatasetError
from agent_v2.evaluation._benchmark import BenchmarkStatistic
from agent_v2.evaluation.reward import RewardPolicy

__all__ = ["bundled_dataset_path", "load_dataset", "parse_dataset_spec"]

_DATA_DIR = Path(__file__).parent / "data"
_BUNDLED = {
    "sample": _DATA_DIR / "sample" / "dataset.json",
    "demo": _DATA_DIR / "demo" / "dataset.json",
}

_Choice = TypeVar("_Choice", bound=enum.StrEnum)

_MANIFEST_KEYS = frozenset(
    {
        "instances",
        "defaults",
        "reward_policy",
        "protected_files_policy",
        "benchmark_statistic",
        "description",
    }
)
_COMMAND_FIELDS = ("build_command", "test_command", "benchmark_command")
_TEXT_FIELDS = ("split", "image_name", "workdir")
_KNOWN_FIELDS = frozenset(
    {"instance_id", "repo_path", "timeout", "protected_files"}
    | set(_COMMAND_FIELDS)
    | set(_TEXT_FIELDS)
)
_MAX_ID_LENGTH = 256  # what the wire protocol accepts for an instance_id


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """Split a ``--dataset NAME=PATH`` value into its name and path."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path.strip():
        raise ConfigError(
            f"invalid dataset {spec!r}: expected NAME=PATH, "
            "for example sample=datasets/sample/dataset.json"
        )
    if len(name) > _MAX_ID_LENGTH or any(c.isspace() for c in name):
        raise ConfigError(
            f"invalid dataset name {name!r}: use at most {_MAX_ID_LENGTH} "
            "characters and no spaces"
        )
    return name, Path(path.strip()).expanduser()


def bundled_dataset_path(name: str) -> Path:
    """Return the dataset file of a dataset shipped inside the package."""
    try:
        return _BUNDLED[name]
    except KeyError:
        raise ConfigError(
            f"no bundled dataset {name!r}; bundled datasets: {sorted(_BUNDLED)}"
        ) from None


def load_dataset(name: str, path: Path) -> Dataset:
    """Read and validate a dataset file; raise DatasetError naming what is wrong.

    ``path`` is a ``.jsonl`` file (one instance record per line), a ``.json``
    file holding an array of records, or a ``.json`` manifest object (see
    ``docs/datasets.md``). Relative ``repo_path`` values are resolved against
    the folder of ``path``. This reads files, so async callers should run it
    in a thread.
    """
    path = Path(path)
    data = _read_json_or_jsonl(path)
    if isinstance(data, list):
        return _build_dataset(name, path, _Source(path, data), _Manifest())
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected an array of instance records or a manifest "
            f"object, got {_describe(data)}"
        )

    manifest = _parse_manifest(path, data)
    if isinstance(manifest.instances, str):
        records_path = (path.parent / manifest.instances).resolve()
        records = _read_json_or_jsonl(records_path, field_of=path)
        if isinstance(records, dict):
            raise DatasetError(
                f"{records_path}: expected a JSON array or JSONL of instance "
                "records, got an object (manifests cannot be nested)"
            )
        source = _Source(records_path, records)
    else:
        source = _Source(path, manifest.instances)
    return _build_dataset(name, path, source, manifest)


@dataclasses.dataclass(frozen=True)
class _Manifest:
    """The dataset-level settings of a manifest file."""

    instances: list[Any] | str = dataclasses.field(default_factory=list)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reward_policy: RewardPolicy = dataclasses.field(default_factory=RewardPolicy)
    protected_files_policy: ProtectedFilesPolicy = ProtectedFilesPolicy.RESTORE
    benchmark_statistic: BenchmarkStatistic = BenchmarkStatistic.MEDIAN


@dataclasses.dataclass(frozen=True)
class _Source:
    """Records and the file they came from; JSONL records carry line numbers."""

    path: Path
    records: list[Any] | list[tuple[int, Any]]

    def located(self) -> Iterator[tuple[str, Any]]:
        """Yield each record with where it is (``line 3`` or ``record 2``)."""
        jsonl = self.path.suffix in (".jsonl", ".ndjson")
        for index, item in enumerate(self.records):
            if jsonl:
                line, record = item
                yield f"line {line}", record
            else:
                yield f"record {index}", item


def _read_json_or_jsonl(path: Path, field_of: Path | None = None) -> Any:
    """Return a JSON file's value, or a JSONL file's records with line numbers."""
    where = f"{field_of}: field 'instances': " if field_of else ""
    try:
        text = path.read_text(encoding="utf-8-sig")  # drops a BOM, as editors write
    except FileNotFoundError:
        raise DatasetError(f"{where}dataset file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(
            f"{where}{path} is a folder; give the dataset's .json or .jsonl file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where}cannot read dataset file {path}: {exc}") from exc

    if path.suffix in (".jsonl", ".ndjson"):
        return _parse_jsonl(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    """Return ``(line number, record)`` for every non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}: line {number}: invalid JSON at column {exc.colno}: {exc.msg}"
            ) from None
    return records


def _parse_manifest(path: Path, data: dict[str, Any]) -> _Manifest:
    """Validate a manifest object's keys and dataset-level settings."""
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise DatasetError(
            f"{path}: unknown manifest key(s) {unknown}; "
            f"expected some of {sorted(_MANIFEST_KEYS)}"
        )
    if "instances" not in data:
        raise DatasetError(
            f"{path}: field 'instances' is missing; give a list of instance "
            "records or the relative path of a .jsonl/.json file holding them"
        )
    instances = data["instances"]
    if not isinstance(instances, list | str) or instances == "":
        raise DatasetError(
            f"{path}: field 'instances' must be a list of records or a relative "
            f"file path, got {_describe(instances)}"
        )

    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise DatasetError(
            f"{path}: field 'defaults' must be an object, got {_describe(defaults)}"
        )
    if "instance_id" in defaults:
        raise DatasetError(
            f"{path}: field 'defaults' must not set 'instance_id'; "
            "every record names its own"
        )
    return _Manifest(
        instances=instances,
        defaults=defaults,
        reward_policy=_parse_reward_policy(path, data.get("reward_policy", {})),
        protected_files_policy=_parse_choice(
            path,
            "protected_files_policy",
            data.get("protected_files_policy"),
            ProtectedFilesPolicy.RESTORE,
            "policy",
        ),
        benchmark_statistic=_parse_choice(
            path,
            "benchmark_statistic",
            data.get("benchmark_statistic"),
            BenchmarkStatistic.MEDIAN,
            "statistic",
        ),
    )


def _parse_reward_policy(path: Path, value: Any) -> RewardPolicy:
    """Return the manifest's reward policy, or the default one."""
    if not isinstance(value, dict):
        raise DatasetError(
            f"{path}: field 'reward_policy' must be an object, got {_describe(value)}"
        )
    try:
        return RewardPolicy.from_mapping(value)
    except ConfigError as exc:
        raise DatasetError(f"{path}: field 'reward_policy': {exc}") from None


def _parse_choice(
    path: Path,
    field: str,
    value: Any,
    default: _Choice,
    noun: str,
) -> _Choice:
    """Return a manifest field that names one member of an enum, or ``default``."""
    if value is None:
        return default
    kind = type(default)
    try:
        return kind(value)
    except ValueError:
        choices = [member.value for member in kind]
        raise DatasetError(
            f"{path}: field {field!r}: unknown {noun} {value!r}; "
            f"expected one of {choices}"
        ) from None


def _build_dataset(
    name: str, path: Path, source: _Source, manifest: _Manifest
) -> Dataset:
    """Validate every record and index the instances by (split, instance_id)."""
    if not source.records:
        raise DatasetError(f"{source.path}: the dataset has no instances")

    instances: dict[tuple[str, str], Instance] = {}
    seen_at: dict[tuple[str, str], str] = {}
    for where, record in source.located():
        builder = _RecordBuilder(name, path.parent, source.path, where, record)
        instance = builder.build(manifest.defaults)
        key = (instance.split, instance.instance_id)
        if key in seen_at:
            raise DatasetError(
                f"{builder.location}: duplicate instance_id {instance.instance_id!r} "
                f"in split {instance.split!r} (first at {seen_at[key]}); "
                "give each instance of a split its own id"
            )
        seen_at[key] = where
        instances[key] = instance

    return Dataset(
        name=name,
        path=path.resolve(),
        instances=instances,
        reward_policy=manifest.reward_policy,
        protected_files_policy=manifest.protected_files_policy,
        benchmark_statistic=manifest.benchmark_statistic,
    )


class _RecordBuilder:
    """Turns one raw record, plus the dataset defaults, into an Instance."""

    def __init__(
        self, name: str, root: Path, file: Path, where: str, record: Any
    ) -> None:
        self._name = name
        self._root = root
        self._file = file
        self._where = where
        self._record = record
        self._instance_id: str | None = None

    @property
    def location(self) -> str:
        """Return ``file: line 3 (instance_id 'x')``, as much as is known."""
        text = f"{self._file}: {self._where}"
        if self._instance_id is not None:
            text += f" (instance_id {self._instance_id!r})"
        return text

    def fail(self, field: str | None, problem: str) -> DatasetError:
        """Return the error for a problem with this record or one of its fields."""
        if field is None:
            return DatasetError(f"{self.location}: {problem}")
        return DatasetError(f"{self.location}: field {field!r} {problem}")

    def build(self, defaults: Mapping[str, Any]) -> Instance:
        """Validate the record and return its instance."""
        if not isinstance(self._record, dict):
            raise self.fail(
                None, f"must be a JSON object, got {_describe(self._record)}"
            )
        self._instance_id = self._instance_id_of(self._record)
        merged = self._apply_defaults(self._record, defaults)
        repo_path = self._repo_path(merged.get("repo_path"))
        protected_files = self._protected_files(merged.get("protected_files"))
        if repo_path is not None:
            self._check_protected_files_exist(repo_path, protected_files)

        return Instance(
            dataset_name=self._name,
            instance_id=self._instance_id,
            split=self._text(merged, "split") or DEFAULT_SPLIT,
            repo_path=repo_path,
            build_command=self._command(merged, "build_command"),
            test_command=self._command(merged, "test_command"),
            benchmark_command=self._command(merged, "benchmark_command"),
            timeout=self._timeout(merged.get("timeout")),
            protected_files=protected_files,
            image_name=self._text(merged, "image_name"),
            workdir=self._text(merged, "workdir"),
            fields={k: v for k, v in merged.items() if k not in _KNOWN_FIELDS},
        )

    def _instance_id_of(self, record: dict[str, Any]) -> str:
        """Return the record's validated instance_id."""
        if "instance_id" not in record:
            raise self.fail("instance_id", "is missing; every record needs one")
        value = record["instance_id"]
        if not isinstance(value, str):
            raise self.fail("instance_id", f"must be a string, got {_describe(value)}")
        if not value.strip() or len(value) > _MAX_ID_LENGTH:
            raise self.fail(
                "instance_id",
                f"must be 1 to {_MAX_ID_LENGTH} characters and not blank, "
                f"got {value!r}",
            )
        return value

    def _apply_defaults(
        self, record: dict[str, Any], defaults: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the record with the defaults it lacks, templates rendered.

        A template sees the record's own fields plus ``dataset_name`` and
        ``split``; a field the record sets (even to null) is never defaulted.
        """
        context = {"dataset_name": self._name, "split": DEFAULT_SPLIT, **record}
        if "split" not in record and isinstance(defaults.get("split"), str):
            context["split"] = defaults["split"]

        merged = dict(record)
        for field, default in defaults.items():
            if field not in record:
                merged[field] = self._render(field, default, context)
        return merged

    def _render(self, field: str, value: Any, context: Mapping[str, Any]) -> Any:
        """Render the ``{field}`` references in a default (strings, lists of them)."""
        if isinstance(value, list):
            return [self._render(field, item, context) for item in value]
        if not isinstance(value, str):
            return value

        values: dict[str, str] = {}
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise self.fail(
                field,
                f"has an invalid template {value!r}: {exc}; "
                "write literal braces as '{{' and '}}'",
            ) from None
        for _, reference, _, _ in parsed:
            if reference is None:
                continue
            values[reference] = self._template_value(field, value, reference, context)
        try:
            return value.format_map(values)
        except (ValueError, KeyError, IndexError) as exc:
            raise self.fail(
                field, f"has an invalid template {value!r}: {exc}"
            ) from None

    def _template_value(
        self, field: str, template: str, reference: str, context: Mapping[str, Any]
    ) -> str:
        """Return the text a template's ``{reference}`` stands for."""
        if not reference.isidentifier():
            raise self.fail(
                field,
                f"template {template!r} refers to {{{reference}}}; only plain "
                "field names are allowed (write literal braces as '{{' and '}}')",
            )
        value = context.get(reference)
        if value is None:
            raise self.fail(
                field,
                f"default template {template!r} refers to {{{reference}}}, "
                f"which this record lacks; add {reference!r} to the record or "
                f"set {field!r} in the record itself",
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(
                field,
                f"template {template!r} refers to {{{reference}}}, which is "
                f"{_describe(value)}; only strings and numbers can be inserted",
            )
        return str(value)

    def _text(self, merged: Mapping[str, Any], field: str) -> str | None:
        """Return an optional non-blank string field."""
        value = merged.get(field)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(
                field, f"must be a non-empty string, got {_describe(value)}"
            )
        return value

    def _command(self, merged: Mapping[str, Any], field: str) -> str | None:
        """Return an optional shell command."""
        return self._text(merged, field)

    def _repo_path(self, value: Any) -> Path | None:
        """Return the absolute folder of the instance's files, which must exist."""
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(
                "repo_path",
                f"must be a folder path relative to the dataset file, "
                f"got {_describe(value)}",
            )
        folder = (self._root / value).resolve()
        if not folder.is_dir():
            raise self.fail(
                "repo_path",
                f"names {value!r}, but {folder} is not an existing folder "
                f"(paths are relative to {self._root})",
            )
        return folder

    def _timeout(self, value: Any) -> float | None:
        """Return an optional positive, finite number of seconds."""
        if value is None:
            return None
        valid = isinstance(value, int | float) and not isinstance(value, bool)
        if not valid or not math.isfinite(value) or value <= 0:
            raise self.fail(
                "timeout",
                f"must be a positive number of seconds, got {_describe(value)}",
            )
        return float(value)

    def _protected_files(self, value: Any) -> tuple[str, ...]:
        """Return the normalised relative paths the agent must not change."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(
                "protected_files",
                f"must be a list of relative paths, got {_describe(value)}",
            )
        paths: list[str] = []
        for index, item in enumerate(value):
            path = self._protected_path(f"protected_files[{index}]", item)
            if path not in paths:
                paths.append(path)
        return tuple(paths)

    def _check_protected_files_exist(
        self, repo_path: Path, protected_files: tuple[str, ...]
    ) -> None:
        """Fail for a protected path missing from the instance's files.

        NOTE: grading restores protected files from the base with ``git
        checkout``, which fails for paths the base does not have.
        """
        for index, relative in enumerate(protected_files):
            if not (repo_path / relative).exists():
                raise self.fail(
                    f"protected_files[{index}]",
                    f"names {relative!r}, which does not exist in {repo_path}",
                )

    def _protected_path(self, field: str, item: Any) -> str:
        """Return one protected path, relative and inside the container."""
        if not isinstance(item, str) or not item.strip() or "\x00" in item:
            raise self.fail(field, f"must be a relative path, got {_describe(item)}")
        path = PurePosixPath(item)
        if path.is_absolute() or item.startswith("~"):
            raise self.fail(
                field, f"must be relative to the container's root, got {item!r}"
            )
        if ".." in path.parts:
            raise self.fail(field, f"must not contain '..', got {item!r}")
        if str(path) == ".":
            raise self.fail(
                field, "must name a file or folder, not the whole container"
            )
        return str(path)


def _describe(value: Any) -> str:
    """Return a short description of a JSON value for error messages."""
    kinds = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    kind = kinds.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} ({shown})" if kind not in ("an array", "an object") else kind
