#!/usr/bin/env bash
# One command to get a working visiontune checkout on a fresh machine:
#   system packages (PostgreSQL for multi-machine tuning tests, Fashion-MNIST for the main job),
#   a .venv with the pinned torch/torchvision, and visiontune in editable mode with dev extras.
# Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- system packages (Debian/Ubuntu); skipped where apt-get is absent
# chromium: the run report's tests open it in a real headless browser
SYSTEM_PACKAGES=(postgresql dataset-fashion-mnist chromium)
if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    missing=()
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        say "installing system packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
else
    echo "note: no apt-get here; install PostgreSQL yourself for the multi-machine tuning tests"
fi

# --- Python 3.11 virtual environment
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            PYTHON="$candidate"
            break
        fi
    done
fi
[ -n "$PYTHON" ] || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

# torch first, by exact version: an unpinned torch would pull a different multi-GB build.
if ! .venv/bin/python -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
    say "installing torch 2.14.1 and torchvision 0.29.1"
    "${PIP[@]}" install -q torch==2.14.1 torchvision==0.29.1
fi

# Everything else, resolved once and pinned in requirements/constraints.txt (fast, repeatable).
say "installing visiontune (editable) with dev extras"
"${PIP[@]}" install -q -c requirements/constraints.txt -e ".[dev]"

say "ready: .venv/bin/visiontune --help"
