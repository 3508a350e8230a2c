#!/usr/bin/env bash
# Fresh machine -> all tests: sets up .venv with the test references, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh --test
. .venv/bin/activate
rc=0
python -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
