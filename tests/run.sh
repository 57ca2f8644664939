#!/usr/bin/env bash
# The whole test suite: one pytest process per test folder, every folder run even when an
# earlier one fails, exit status non-zero if any failed. Extra arguments go to each pytest.
#
# Why one process per folder: a single pytest process for the whole suite (torchrun launched
# in-process, uvicorn/uvloop servers, onnxruntime/OpenVINO/Arrow thread pools, some 350
# threads) piles up process-wide state that no one test owns. It used to die of a SIGSEGV
# raised while the kernel delivered a signal to its main thread: OpenVINO's CPU plugin had left
# that thread on a freed alternate signal stack, and torch's DataLoader SIGCHLD handler ran on
# it when a child exited (fixed in serving/runtimes.py; tests/serving/test_openvino_signals.py).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
failed=()
for dir in tests/*/; do
    echo "== ${dir}"
    "$PY" -m pytest -q "$dir" "$@" || failed+=("$dir")
done
if ((${#failed[@]})); then
    echo "FAILED folders: ${failed[*]}" >&2
    exit 1
fi
echo "all test folders passed"
