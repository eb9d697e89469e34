#!/usr/bin/env bash
# Set up a fresh machine for agent_v2: Debian packages, then a virtualenv in .venv.
# Usage: scripts/setup.sh [demo|test]   (test also installs what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-demo}"

packages=(git cmake g++ make libgtest-dev libbenchmark-dev util-linux)
if [[ "$profile" == "test" ]]; then
    packages+=(docker.io debootstrap iproute2 procps)
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.agent-v2-$profile
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "setup: installing agent-v2 into .venv ($profile)"
    .venv/bin/pip install -q --upgrade pip
    if [[ "$profile" == "test" ]]; then
        .venv/bin/pip install -q -e '.[test]'
    else
        .venv/bin/pip install -q -e .
    fi
    touch "$stamp"
fi
