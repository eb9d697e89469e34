#!/usr/bin/env bash
# Set up this machine and run the demo: an embedded server grading scripted agents.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/agent-v2 demo "$@"
