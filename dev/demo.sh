#!/usr/bin/env bash
# Fresh machine -> the main job: installs accel-models and runs the demo on the reference backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
. .venv/bin/activate
accel-models demo "$@"
