#!/usr/bin/env bash
# Fresh machine -> the main job: installs accel-models and runs the demo on the reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
. .venv/bin/activate
# The main job runs on the reference backend unless told otherwise (e.g. `bash dev/demo.sh --backend cuda`).
if [ $# -eq 0 ]; then set -- --backend reference; fi
accel-models demo "$@"
