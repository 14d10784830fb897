#!/usr/bin/env bash
# Profile a representative CUDA training run with Nsight Systems (timeline, NVTX ranges
# encode/select/decode/backward/step/data) and Nsight Compute (per-kernel metrics).
# Usage: scripts/profile.sh [out_dir]   (needs nsys / ncu on PATH and a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/profile}"
mkdir -p "$OUT"
cargo build --release
SAE=target/release/sae
ARGS=(train --backend cuda --sparsifier topk --k 32 --d-sae 16384 --synth-d-in 1024 --synth-features 4096
      --batch-size 4096 --log-every 20 --eval-every 0 --quiet --out "$OUT/run")

# Timeline: CUDA API + kernels + NVTX ranges; skip the first steps (module load, warm-up).
nsys profile --trace=cuda,nvtx,osrt --cuda-memory-usage=true --force-overwrite=true \
    --capture-range=nvtx --nvtx-capture=step --capture-range-end=repeat:40 \
    -o "$OUT/saetrain" "$SAE" "${ARGS[@]}" --steps 60
nsys stats --report cuda_gpu_kern_sum,nvtx_sum "$OUT/saetrain.nsys-rep" | tee "$OUT/nsys-summary.txt"

# Kernel metrics for a few launches of each of our kernels (not cuBLAS), after warm-up.
ncu --target-processes all --kernel-name-base function \
    --kernel-name 'regex:^(sel_|decode_rows|code_grads|latent_grads|csc_|adam_|bias_relu|center|residual_grad|row_stats|bdec_grad)' \
    --launch-skip 200 --launch-count 40 --set full --force-overwrite \
    -o "$OUT/saetrain-kernels" "$SAE" "${ARGS[@]}" --steps 10
echo "reports in $OUT (open .nsys-rep in nsys-ui, .ncu-rep in ncu-ui)"
