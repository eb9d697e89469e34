"""``agent-v2 demo``: variants, the outcome checker, and reduced runs of the demo.

The runs build the demo's C++ instances for real and skip, naming what is
missing, on a machine without the toolchain (``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent_v2._demo import (
    BUNDLED_VARIANTS,
    Variant,
    load_variants,
    missing_toolchain,
    select_variants,
)
from agent_v2.cli import main
from agent_v2.errors import ConfigError

VARIANT_NAMES = ["baseline", "reference", "build_broken", "test_broken", "slower"]

_MISSING = missing_toolchain()
needs_toolchain = pytest.mark.skipif(
    bool(_MISSING), reason=f"the demo needs {', '.join(_MISSING)}"
)


def variant(**fields: object) -> Variant:
    """Return a variant of instance ``x`` with the given expectation."""
    values: dict[str, object] = {"instance_id": "x", "name": "v", "patch": None}
    values.update({"error": None, **fields})
    return Variant(**values)  # type: ignore[arg-type]


# -- the checker ----------------------------------------------------------------


def test_an_expected_error_must_be_that_error() -> None:
    """A variant that must fail passes only with its error code."""
    broken = variant(error="build_failed")

    assert broken.check(error="build_failed", speedup=-1.0) is None
    assert broken.check(error="tests_failed", speedup=-1.0) == (
        "expected error build_failed, got error tests_failed"
    )
    assert broken.check(error=None, speedup=2.0) == (
        "expected error build_failed, got success"
    )


def test_a_success_must_stay_within_its_speedup_bounds() -> None:
    """min_speedup and max_speedup bound the speedup of a success."""
    faster = variant(min_speedup=1.5)
    slower = variant(max_speedup=0.9)

    assert faster.check(error=None, speedup=1.5) is None
    assert faster.check(error=None, speedup=1.2) == (
        "speedup 1.20 is below the minimum 1.5"
    )
    assert slower.check(error=None, speedup=1.0) == (
        "speedup 1.00 is above the maximum 0.9"
    )
    assert faster.check(error="tests_failed", speedup=-1.0) == (
        "expected success with speedup >= 1.5, got error tests_failed"
    )
    assert variant().check(error=None, speedup=0.3) is None


# -- the variants file -----------------------------------------------------------


def test_the_bundled_variants_cover_every_instance() -> None:
    """Six instances with five variants each; every patch exists."""
    variants = load_variants(BUNDLED_VARIANTS)

    assert len(variants) == 30
    assert {v.name for v in variants} == set(VARIANT_NAMES)
    assert all((v.patch is None) == (v.name == "baseline") for v in variants)
    assert all(v.patch is None or v.patch.is_file() for v in variants)
    reference = next(v for v in variants if v.label == "histogram/reference")
    assert reference.min_speedup == 1.5 and reference.error is None


def test_selecting_unknown_names_is_an_error() -> None:
    """Unknown instances or variants are named, with the choices."""
    variants = load_variants(BUNDLED_VARIANTS)

    chosen = select_variants(variants, ["reduce"], ["reference", "slower"])
    assert [v.label for v in chosen] == ["reduce/reference", "reduce/slower"]
    with pytest.raises(ConfigError, match="unknown instance 'nope'; choose from"):
        select_variants(variants, ["nope"])
    with pytest.raises(ConfigError, match="unknown variant 'fast'"):
        select_variants(variants, None, ["fast"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "non-empty 'instances'"),
        ('{"instances": {"x": {"v": {"error": 3}}}}', "'error' must be"),
        ('{"instances": {"x": {"v": {"patch": "no.patch"}}}}', "does not exist"),
        ('{"instances": {"x": {"v": {"min_speedup": -1}}}}', "positive number"),
        ('{"instances": {"x": {"v": {"speed": 1}}}}', "unknown fields ['speed']"),
    ],
)
def test_bad_variants_files_are_refused(
    tmp_path: Path, content: str, message: str
) -> None:
    """A variants file that cannot be used names the variant and the problem."""
    path = tmp_path / "variants.json"
    path.write_text(content)

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_variants(path)


def test_unknown_instance_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """``--instances`` with an unknown name stops before any server starts."""
    assert main(["demo", "--instances", "nope"]) == 2
    assert "unknown instance 'nope'" in capsys.readouterr().err


# -- reduced runs ------------------------------------------------------------------


@needs_toolchain
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_variant_of_one_instance_gets_its_outcome(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The five variants of histogram, graded in parallel, are all as expected."""
    code = main(["demo", "--instances", "histogram"])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "all 5 outcomes are as expected" in out
    for name in VARIANT_NAMES:
        assert f"histogram/{name}" in out
    assert "build_failed" in out and "tests_failed" in out
    assert "mean reward" in out and "of wall time" in out


@needs_toolchain
@pytest.mark.timeout(300)
def test_an_outcome_against_its_expectation_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A variant expected to succeed that does not build makes the demo exit 1."""
    patch = BUNDLED_VARIANTS.parent / "histogram" / "build_broken.patch"
    expected = {"patch": str(patch), "error": None}  # it must fail to build
    wrong = {"instances": {"histogram": {"build_broken": expected}}}
    variants_file = tmp_path / "variants.json"
    variants_file.write_text(json.dumps(wrong))

    code = main(["demo", f"--variants-file={variants_file}", "--keep-workdir"])

    out = capsys.readouterr().out
    assert code == 1
    assert "1 of 1 outcomes are not as expected" in out
    assert "histogram/build_broken: expected success, got error build_failed" in out
    kept = Path(out.split("kept the server's files in ")[1].split()[0])
    try:
        assert (kept / "store.sqlite3").is_file()
        assert any((kept / "work" / "containers").iterdir())
    finally:
        shutil.rmtree(kept)
