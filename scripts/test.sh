#!/usr/bin/env bash
# Set up this machine and run every check: lint, format, types, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test

echo "== ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
echo "== mypy"
.venv/bin/mypy

# The docker tests need a Docker engine: start a private one and build its test
# image (scripts/docker-engine.sh), unless AGENT_V2_DOCKER=0; stop it afterwards
# when this run started it.
if [[ "${AGENT_V2_DOCKER:-1}" != 0 ]]; then
    echo "== docker engine"
    engine=$(bash scripts/docker-engine.sh start)
    eval "$engine"
    export AGENT_V2_DOCKER_REQUIRED=1
    if [[ "${AGENT_V2_DOCKER_STARTED:-0}" == 1 ]]; then
        trap 'bash scripts/docker-engine.sh stop' EXIT
    fi
fi

# Each test has its own timeout (pyproject.toml); this bounds the whole run
# too, for a test whose timeout cannot fire (a task that never yields).
echo "== pytest"
status=0
timeout --kill-after=30 "${AGENT_V2_TEST_BOUND:-1500}" \
    .venv/bin/python -m pytest "$@" || status=$?
if [[ "$status" == 124 || "$status" == 137 ]]; then
    echo "pytest: stopped after ${AGENT_V2_TEST_BOUND:-1500} s (AGENT_V2_TEST_BOUND)" >&2
fi
exit "$status"
