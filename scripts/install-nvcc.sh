#!/usr/bin/env bash
# Install the CUDA 13.0 compiler (nvcc) and NVRTC from PyPI wheels into target/nvcc-venv, for
# machines (CI) without a CUDA toolkit. stdout is exactly one line, the absolute path of nvcc:
#     export NVCC="$(scripts/install-nvcc.sh)"
# (everything else goes to stderr; tests/nvrtc_compile.rs finds libnvrtc in target/nvcc-venv).
# Idempotent: a second run reuses the venv. Needs python3 (venv) and a host gcc <= 14.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${CUDA_WHEEL_VERSION:-13.0.88}"
VENV="target/nvcc-venv"
mkdir -p target
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# nvcc (+ ptxas, cicc, crt headers), NVRTC (libnvrtc.so.13 + builtins), the runtime headers
# (cuda_runtime.h etc., which nvcc's default includes need) and CCCL (cuda/std headers).
if ! "$PY" -c "import importlib.metadata as m; assert m.version('nvidia-cuda-nvcc') == '$VERSION'" 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==$VERSION" "nvidia-cuda-nvrtc==$VERSION" "nvidia-cuda-runtime==$VERSION" \
        "nvidia-cuda-crt==$VERSION" "nvidia-nvvm==$VERSION" 1>&2 || \
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==$VERSION" "nvidia-cuda-nvrtc==$VERSION" "nvidia-cuda-runtime==$VERSION" 1>&2
fi
SITE="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
NVCC="$(find "$SITE/nvidia" -type f -name nvcc -path '*bin*' | head -n 1)"
if [ -z "$NVCC" ]; then
    echo "install-nvcc: no nvcc found under $SITE/nvidia" >&2
    exit 1
fi
chmod +x "$(dirname "$NVCC")"/* 2>/dev/null || true
NVRTC="$(find "$SITE/nvidia" -name 'libnvrtc.so*' ! -name '*builtins*' | head -n 1)"
"$NVCC" --version 1>&2
echo "install-nvcc: libnvrtc in $(cd "$(dirname "$NVRTC")" && pwd) (NVRTC_LIB_DIR)" >&2
echo "$(cd "$(dirname "$NVCC")" && pwd)/nvcc"
