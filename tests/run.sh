#!/usr/bin/env bash
# The whole test suite: one pytest process per test folder, every folder run even when an
# earlier one fails, exit status non-zero if any failed. Extra arguments go to each pytest.
#
# Why not one process: after most of the suite has run in a single pytest process (torchrun
# launched in-process, uvicorn/uvloop servers, onnxruntime/OpenVINO/Arrow thread pools, some
# 350 threads), that process has died of a SIGSEGV raised while the kernel delivered a signal
# to its main thread (seen under gdb: the main thread in a lock wait, not in faulting code).
# Every folder passes on its own and in the combinations tried; the cause is not found yet.
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
