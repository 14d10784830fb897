#!/usr/bin/env bash
# shellcheck disable=SC2317 # the step functions run through `timeout bash -c NAME` (exported)
# The first thing to run on a machine with an NVIDIA GPU: installs what the build needs, builds,
# and runs every GPU check and benchmark, each step timed, under its own timeout, its output in
# OUT_DIR/NN-step.log, continuing after a failed step. Ends with OUT_DIR/summary.md (step,
# status, seconds) and exits non-zero if any step failed or timed out (a skip is not a failure).
#
#   scripts/gpu_check.sh [--emulator] [--prebuilt | --bundle DIR] [OUT_DIR]
#                                                         (OUT_DIR default target/gpu-check/<date>)
#
#   --emulator   (or GPU_CHECK_EMULATOR=1) the same pipeline on the host emulator, no GPU needed:
#                `--backend cuda-emulator`, `sae selftest --emulator`, tiny shapes; nvidia-smi,
#                cuBLAS and nsys are skipped. Emulated times mean nothing: it checks the plumbing.
#   --prebuilt   (or GPU_CHECK_PREBUILT=1) use an existing target/release/sae (or $SAE) and do not
#                install or build anything: for a GPU machine without network, with the binary
#                built elsewhere (with nvcc, so the kernels are embedded). The cargo test steps are
#                skipped then (`sae selftest` runs the same GPU checks).
#   --bundle DIR (or GPU_CHECK_BUNDLE=DIR) --prebuilt with the folder scripts/gpu_bundle.sh made
#                elsewhere: DIR/sae, and DIR's test binaries run the two cargo test steps.
# cuBLAS and NVRTC are looked for on the library path, in target/nvcc-venv, in python3's
# site-packages (the nvidia-* wheels a PyTorch install brings) and under /usr/local/cuda*.
#
# Budget on an H100/H200 with 16+ cores, nothing prepared (total < 8 min); per step the expected
# time, then the timeout that stops it:
#   toolchain        0 s (60 s if rustup must install Rust)     timeout 300 s
#   nvidia-smi       2 s                                         timeout 30 s
#   nvcc             55 s fresh (496 MB of wheels), 1 s again    timeout 300 s
#   cublas           30 s when no libcublas.so.13 is installed  timeout 300 s
#   build            150 s fresh (sae + the two test binaries)  timeout 900 s
#   cuda_parity      15 s                                        timeout 300 s
#   nvrtc_compile    5 s                                         timeout 120 s
#   selftest         10 s                                        timeout 180 s
#   bench step x 3   25 s each (7 sparsifiers x 2 encoders)      timeout 180 s each
#   bench relu x 2   10 s each (--dense-codes never, always)      timeout 120 s each
#   bench sparsif.   60 s (CPU side of the default grid)         timeout 300 s
#   bench memory     1 s                                         timeout 30 s
#   train cuda/cpu   15 s each (300 steps, built-in data)        timeout 240 s each
#   compare          1 s                                         timeout 30 s
#   same_twice       20 s (relu and topk, 60 steps, twice each)  timeout 120 s
#   nsys             45 s (profile + stats)                      timeout 240 s
# The emulator mode takes 3-5 minutes on 2 cores (the two emulated selftests are most of it).
#
# Needs: bash, coreutils (timeout), python3 with venv (nvcc wheels, metric comparison), a C/C++
# compiler (gcc <= 14 for nvcc), network for crates/wheels unless they are already there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"

EMULATOR="${GPU_CHECK_EMULATOR:-0}"
PREBUILT="${GPU_CHECK_PREBUILT:-0}"
BUNDLE="${GPU_CHECK_BUNDLE:-}"
OUT=""
while [ $# -gt 0 ]; do
    a="$1"
    shift
    case "$a" in
        --emulator) EMULATOR=1 ;;
        --prebuilt) PREBUILT=1 ;;
        --bundle)
            [ $# -gt 0 ] || {
                echo "gpu_check: --bundle needs a folder (made by scripts/gpu_bundle.sh)" >&2
                exit 2
            }
            BUNDLE="$1"
            shift
            ;;
        -h | --help)
            sed -n '3,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "gpu_check: unknown option $a (see --help)" >&2
            exit 2
            ;;
        *) OUT="$a" ;;
    esac
done
OUT="${OUT:-target/gpu-check/$(date +%Y%m%d-%H%M%S)}"
if [ -n "$BUNDLE" ]; then
    for f in sae cuda_parity nvrtc_compile; do
        [ -x "$BUNDLE/$f" ] || {
            echo "gpu_check: $BUNDLE/$f is missing or not executable (make the bundle with scripts/gpu_bundle.sh)" >&2
            exit 2
        }
    done
    BUNDLE="$(cd "$BUNDLE" && pwd)"
    PREBUILT=1
    SAE="$BUNDLE/sae"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SAE="${SAE:-$ROOT/target/release/sae}"
# Metric tolerances of the cuda-vs-cpu training comparison: EV absolute, L0 relative.
EV_TOL="${GPU_CHECK_EV_TOL:-0.02}"
L0_TOL="${GPU_CHECK_L0_TOL:-0.05}"
CUBLAS_VERSION="${CUBLAS_WHEEL_VERSION:-13.0.2.14}"
export OUT SAE ROOT EMULATOR EV_TOL L0_TOL

if [ "$EMULATOR" = 1 ]; then
    BACKEND=cuda-emulator
    # Tiny shapes: an emulated step at d_sae 64, batch 32 takes ~30 ms.
    STEP_SHAPE=(--d-in 32 --d-sae 64 --batch 32 --k 4 --steps 1)
    SPARS_SHAPE=(--batch 32 --d-sae 64 --k 4 --reps 1)
    TRAIN_SHAPE=(--synth-d-in 24 --synth-features 40 --d-sae 48 --batch-size 64 --eval-tokens 256)
    NSYS_SHAPE=("${STEP_SHAPE[@]}")
else
    BACKEND=cuda
    # The default bench shape: d_in 576, d_sae 4608, batch 4096, k 32, 5 timed steps.
    STEP_SHAPE=()
    SPARS_SHAPE=()
    TRAIN_SHAPE=()
    NSYS_SHAPE=(--steps 3)
fi

NAMES=()
STATUSES=()
SECONDS_TAKEN=()
NOTES=()
FAILED=0
N=0
T_START=$(date +%s.%N)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

record() { # NAME STATUS SECONDS NOTE
    NAMES+=("$1")
    STATUSES+=("$2")
    SECONDS_TAKEN+=("$3")
    NOTES+=("$4")
    case "$2" in FAIL* | TIMEOUT*) FAILED=1 ;; esac
}

# step NAME LIMIT_S NOTE CMD...: run CMD under `timeout`, output to OUT/NN-NAME.log.
step() {
    local name="$1" limit="$2" note="$3"
    shift 3
    N=$((N + 1))
    local log
    log="$(printf '%02d' "$N")-$name.log"
    echo "==> [$N] $name (timeout ${limit}s): $*"
    local t0 rc status
    t0=$(now)
    {
        echo "\$ $*"
        echo
    } >"$OUT/$log"
    timeout -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    local secs
    secs=$(elapsed "$t0" "$(now)")
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="TIMEOUT (${limit}s)"
    else
        status="FAIL (rc $rc)"
    fi
    echo "    $status in ${secs}s (log: $log)"
    if [ "$rc" != 0 ]; then
        tail -n 25 "$OUT/$log" | sed 's/^/    | /'
    fi
    record "$name" "$status" "$secs" "${note:+$note; }log $log"
    return "$rc"
}

skip() { # NAME REASON
    N=$((N + 1))
    echo "==> [$N] $1: skipped ($2)"
    record "$1" skip "-" "$2"
}

# ---- steps that are shell code (run by `timeout bash -c`, so they see only exported names)

toolchain() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: installing Rust (stable, minimal) with rustup"
        if ! command -v curl >/dev/null; then
            echo "gpu_check: no cargo and no curl to fetch rustup. Install Rust >= 1.89 (rustup) and rerun." >&2
            return 1
        fi
        if ! curl --proto '=https' --tlsv1.2 -sSf --max-time 60 https://sh.rustup.rs |
            sh -s -- -y --profile minimal --default-toolchain stable; then
            echo "gpu_check: no cargo, and rustup could not be downloaded or installed (no internet on this" >&2
            echo "machine?). Install Rust >= 1.89 by hand, or build target/release/sae elsewhere (with" >&2
            echo "NVCC set) and rerun with --prebuilt." >&2
            return 1
        fi
    fi
    cargo --version && rustc --version || return 1
    local cxx
    cxx="$(command -v c++ || command -v g++ || true)"
    if [ -z "$cxx" ]; then
        echo "gpu_check: no C++ compiler (build.rs compiles the emulator; nvcc needs gcc <= 14): apt-get install g++" >&2
        return 1
    fi
    "$cxx" --version | head -n 1
    python3 --version || {
        echo "gpu_check: python3 (with venv) is needed for scripts/install-nvcc.sh and the comparison" >&2
        return 1
    }
}

nvidia_smi() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || return 1
    echo
    nvidia-smi
    # The kernels (nvcc 13.0) and the driver bindings (cudarc's cuda-13000) need a CUDA 13 driver:
    # with an older one every GPU step below fails with a module-load error; say why here.
    local major
    major="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1 | cut -d. -f1 | tr -dc 0-9)"
    if [ -n "$major" ] && [ "$major" -lt 580 ]; then
        echo "gpu_check: driver $major.x is older than 580 (CUDA 13): the GPU steps below will fail to load the kernels; update the driver" >&2
        return 1
    fi
}

nvcc_install() {
    local nvcc
    if nvcc="$(bash scripts/install-nvcc.sh)"; then
        echo "NVCC=$nvcc"
        echo "$nvcc" >"$OUT/.nvcc"
        return 0
    fi
    echo "gpu_check: scripts/install-nvcc.sh failed (no network to PyPI?)" >&2
    for c in "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "gpu_check: using the system nvcc $c instead (not the pinned 13.0.88)" >&2
            "$c" --version
            echo "$c" >"$OUT/.nvcc"
            return 1 # still a failure: the pinned compiler did not install
        fi
    done
    echo "gpu_check: no nvcc at all: the build embeds no fatbin and the kernels need NVRTC (libnvrtc) at run time" >&2
    return 1
}

cublas_found() {
    ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so\.13' && return 0
    local d
    IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
    for d in "${dirs[@]}"; do
        [ -n "$d" ] && ls "$d"/libcublasLt.so.13* >/dev/null 2>&1 && return 0
    done
    return 1
}

lib_dir() { # LIB: the first folder outside the library path that holds LIB (nothing if none)
    local sites=()
    command -v python3 >/dev/null &&
        mapfile -t sites < <(python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null)
    local d
    for d in "$ROOT/target/nvcc-venv" "${sites[@]/%//nvidia}" /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib; do
        [ -d "$d" ] || continue
        d="$(find "$d" -maxdepth 8 -name "$1" -printf '%h\n' 2>/dev/null | head -n 1)"
        [ -n "$d" ] && echo "$d" && return 0
    done
    return 0
}

# Put the folders of cuBLAS and NVRTC on the library path when the loader would not find them
# (cudarc dlopens them by name).
use_libs() {
    local lib d
    for lib in libcublasLt.so.13 libcublas.so.13 libnvrtc.so.13; do
        ldconfig -p 2>/dev/null | grep -q "$lib" && continue
        d="$(lib_dir "$lib")"
        [ -n "$d" ] || continue
        case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
        [ "$lib" = libnvrtc.so.13 ] && NVRTC_LIB_DIR="$d" && export NVRTC_LIB_DIR
    done
    export LD_LIBRARY_PATH
}

cublas_install() {
    local py="target/nvcc-venv/bin/python"
    [ -x "$py" ] || python3 -m venv target/nvcc-venv || return 1
    "$py" -m pip install --quiet --disable-pip-version-check "nvidia-cublas==$CUBLAS_VERSION" || {
        echo "gpu_check: could not install nvidia-cublas==$CUBLAS_VERSION: cuBLAS paths (tf32, bf16) will not run" >&2
        return 1
    }
    find target/nvcc-venv -name 'libcublasLt.so.13*' | head -n 1
}

build() {
    if [ -f "$OUT/.nvcc" ]; then
        NVCC="$(cat "$OUT/.nvcc")"
        export NVCC
    fi
    echo "NVCC=${NVCC:-<none: kernels compiled by NVRTC at run time>}"
    # One compile for everything: building integration tests builds the `sae` binary as well
    # (target/release/sae), with the same features. A separate `cargo build --release` would
    # compile the crate a second time (dev-dependencies change the features of some dependencies:
    # rayon, gemm and faer are rebuilt).
    # The test steps then time the tests, not their compilation.
    cargo test --release --no-run --test cuda_parity --test nvrtc_compile || {
        echo "gpu_check: the build failed. Without network cargo needs its crates already in ~/.cargo/registry" >&2
        echo "(run 'cargo fetch' where there is network), or use --prebuilt with a binary built elsewhere." >&2
        return 1
    }
    [ -x target/release/sae ] || {
        echo "gpu_check: the build did not leave target/release/sae" >&2
        return 1
    }
    # build.rs's ptxas report: registers, spills and shared memory per kernel and arch.
    [ -f target/ptxas-report.txt ] && cp target/ptxas-report.txt "$OUT/ptxas-report.txt"
    return 0
}

compare_runs() { # CUDA_RUN CPU_RUN
    python3 - "$1/summary.json" "$2/summary.json" "$EV_TOL" "$L0_TOL" <<'EOF'
import json, sys
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:3])
ev_tol, l0_tol = float(sys.argv[3]), float(sys.argv[4])
print(f"cuda: {gpu['backend']}, {gpu['tokens_per_second']:.0f} tokens/s")
print(f"cpu:  {cpu['backend']}, {cpu['tokens_per_second']:.0f} tokens/s")
print(f"{'metric':<40} {'cuda':>10} {'cpu':>10} {'diff':>10} {'tol':>10}  ok")
bad = 0
for group in ("eval", "eval_training_sparsifier"):
    for key, tol, rel in (("explained_variance", ev_tol, False), ("l0", l0_tol, True)):
        a, b = gpu[group][key], cpu[group][key]
        diff = abs(a - b)
        lim = tol * max(abs(b), 1e-9) if rel else tol
        ok = diff <= lim
        bad += not ok
        print(f"{group + '.' + key:<40} {a:>10.4f} {b:>10.4f} {diff:>10.4f} {lim:>10.4f}  {'yes' if ok else 'NO'}")
for key in ("mse", "cosine", "frac_alive"):
    print(f"{'eval.' + key + ' (not compared)':<40} {gpu['eval'][key]:>10.4f} {cpu['eval'][key]:>10.4f}")
sys.exit(1 if bad else 0)
EOF
}

nsys_stats() {
    nsys stats --report cuda_gpu_kern_sum,cuda_api_sum,nvtx_sum --format csv,column \
        --output "$OUT/nsys-bench-step" "$OUT/nsys-bench-step.nsys-rep" ||
        nsys stats "$OUT/nsys-bench-step.nsys-rep"
}

export -f toolchain nvidia_smi nvcc_install cublas_found lib_dir cublas_install build compare_runs nsys_stats now
export CUBLAS_VERSION

# The same run twice on the GPU must give the same weights, byte for byte (docs/cuda.md,
# "Determinism on a GPU"): relu, whose per-latent sums were once atomics, and topk with aux_k.
same_twice() { # BACKEND SHAPE_FLAGS...
    local backend="$1" s i bad=0
    shift
    for s in relu topk; do
        for i in 1 2; do
            "$SAE" train --steps 60 --seed 1 --quiet --overwrite --sparsifier "$s" --backend "$backend" \
                "$@" --out "$OUT/twice-$s-$i" || return 1
        done
        if cmp "$OUT/twice-$s-1/sae_weights.safetensors" "$OUT/twice-$s-2/sae_weights.safetensors"; then
            echo "$s: the two runs' weights are identical"
        else
            echo "$s: the two runs' weights differ" >&2
            bad=1
        fi
        rm -rf "$OUT/twice-$s-1" "$OUT/twice-$s-2"
    done
    return "$bad"
}
export -f same_twice

# ---- the pipeline

echo "gpu_check: mode $([ "$EMULATOR" = 1 ] && echo emulator || echo gpu)$([ "$PREBUILT" = 1 ] && echo ', prebuilt'), results in $OUT"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "host: $(uname -a)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
} >"$OUT/environment.txt"

if [ "$PREBUILT" = 1 ]; then
    skip toolchain "--prebuilt"
else
    if step toolchain 300 "" bash -c toolchain; then :; fi
    # Only when cargo is not on PATH yet: build.rs reruns (a full crate rebuild) when PATH changes.
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

GB=80
if [ "$EMULATOR" = 1 ]; then
    skip nvidia-smi "emulator mode"
elif ! command -v nvidia-smi >/dev/null; then
    step nvidia-smi 30 "nvidia-smi not on PATH" false
else
    if step nvidia-smi 30 "" bash -c nvidia_smi; then
        DEVICE="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
        MIB="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9)"
        [ -n "$MIB" ] && GB=$(awk -v m="$MIB" 'BEGIN { printf "%.0f", m / 1024 }')
        echo "device: $DEVICE" >>"$OUT/environment.txt"
    fi
fi

if [ "$PREBUILT" = 1 ]; then
    skip nvcc "--prebuilt"
    skip cublas "--prebuilt"
    skip build "--prebuilt: using $SAE"
else
    if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then
        echo "$NVCC" >"$OUT/.nvcc"
        step nvcc 30 "NVCC given" "$NVCC" --version
    else
        step nvcc 300 "scripts/install-nvcc.sh" bash -c nvcc_install
    fi
    use_libs
    if [ "$EMULATOR" = 1 ]; then
        skip cublas "emulator mode (no cuBLAS there)"
    elif bash -c cublas_found; then
        skip cublas "libcublas.so.13 already loadable"
    else
        step cublas 300 "nvidia-cublas==$CUBLAS_VERSION into target/nvcc-venv" bash -c cublas_install
    fi
    step build 900 "release: sae + the two test binaries" bash -c build || BUILD_FAILED=1
fi
# libnvrtc (the run-time fallback and tests/nvrtc_compile.rs) and cuBLAS, wherever they are
# (the wheels just installed, if any).
use_libs
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$OUT/environment.txt"
[ -n "$BUNDLE" ] && [ -f "$BUNDLE/manifest.txt" ] && sed 's/^/bundle /' "$BUNDLE/manifest.txt" >>"$OUT/environment.txt"
BUILT=1
[ -x "$SAE" ] && [ "${BUILD_FAILED:-0}" = 0 ] || BUILT=0

need() { # NAME: 0 when the binary is there, else records a skip
    if [ "$BUILT" = 1 ]; then return 0; fi
    skip "$1" "no binary (build failed)"
    return 1
}

# The CUDA parity tests. On a GPU the emulated copy of the selftest is skipped (CPU only, CI runs
# it, ~60 s); on the emulator it is the test.
if [ -n "$BUNDLE" ]; then
    if [ "$EMULATOR" = 1 ]; then
        step cuda_parity 600 "emulated selftest + probe (bundled)" "$BUNDLE/cuda_parity" --nocapture
    else
        step cuda_parity 300 "GPU selftest + probe (bundled)" "$BUNDLE/cuda_parity" --nocapture --skip emulated_cuda_matches_cpu
    fi
    step nvrtc_compile 120 "NVRTC for compute_80/90 (bundled)" "$BUNDLE/nvrtc_compile" --nocapture
elif [ "$PREBUILT" = 1 ]; then
    skip cuda_parity "--prebuilt (sae selftest below runs the same checks)"
    skip nvrtc_compile "--prebuilt"
elif need cuda_parity; then
    if [ "$EMULATOR" = 1 ]; then
        step cuda_parity 600 "emulated selftest + probe" cargo test --release --test cuda_parity -- --nocapture
    else
        step cuda_parity 300 "GPU selftest + probe" cargo test --release --test cuda_parity -- --nocapture --skip emulated_cuda_matches_cpu
    fi
    step nvrtc_compile 120 "NVRTC for compute_80/90" cargo test --release --test nvrtc_compile -- --nocapture
fi

if need selftest; then
    if [ "$EMULATOR" = 1 ]; then
        step selftest 600 "every kernel vs the CPU" "$SAE" selftest --emulator
    else
        step selftest 180 "every kernel vs the CPU" "$SAE" selftest
    fi
fi

for p in f32 tf32 bf16; do
    if need "bench_step_$p"; then
        step "bench_step_$p" 180 "JSON bench-step-$p.json" \
            "$SAE" bench step --backend "$BACKEND" --precision "$p" "${STEP_SHAPE[@]}" --json "$OUT/bench-step-$p.json" --overwrite
    fi
done

# relu at initialisation keeps about half of B x F: its products as gathers and as GEMMs (the
# dense codes path), side by side, to set backend/cuda/dense.rs's DENSE_ABOVE.
for dc in never always; do
    if need "bench_relu_dense_$dc"; then
        step "bench_relu_dense_$dc" 120 "JSON bench-relu-dense-$dc.json" \
            "$SAE" bench step --backend "$BACKEND" --sparsifier relu --dense-codes "$dc" "${STEP_SHAPE[@]}" \
            --json "$OUT/bench-relu-dense-$dc.json" --overwrite
    fi
done

if need bench_sparsifiers; then
    step bench_sparsifiers 300 "JSON bench-sparsifiers.json" \
        "$SAE" bench sparsifiers --backend "cpu,$BACKEND" "${SPARS_SHAPE[@]}" --json "$OUT/bench-sparsifiers.json" --overwrite
fi

if need bench_memory; then
    step bench_memory 30 "plan for ${GB} GB" "$SAE" bench memory --gb "$GB"
fi

# 300 steps of the default training run (WTA on the built-in synthetic data) on each backend.
TRAIN=(train --steps 300 --seed 0 --quiet --overwrite "${TRAIN_SHAPE[@]}")
TRAIN_OK=1
if need train_cuda; then
    step train_cuda 240 "train-cuda/" "$SAE" "${TRAIN[@]}" --backend "$BACKEND" --out "$OUT/train-cuda" || TRAIN_OK=0
else
    TRAIN_OK=0
fi
if need train_cpu; then
    step train_cpu 240 "train-cpu/" "$SAE" "${TRAIN[@]}" --backend cpu --out "$OUT/train-cpu" || TRAIN_OK=0
else
    TRAIN_OK=0
fi
if [ "$TRAIN_OK" = 1 ]; then
    # shellcheck disable=SC2016 # expanded by the inner bash, which has OUT exported
    step compare_train 30 "EV within $EV_TOL, L0 within $(awk -v t="$L0_TOL" 'BEGIN { print 100 * t }')%" \
        bash -c 'compare_runs "$OUT/train-cuda" "$OUT/train-cpu"'
else
    skip compare_train "a training run failed"
fi

if need same_twice; then
    # shellcheck disable=SC2016 # expanded by the inner bash
    step same_twice 120 "the same run twice: identical weights" \
        bash -c 'same_twice "$@"' _ "$BACKEND" "${TRAIN_SHAPE[@]}"
fi

if [ "$EMULATOR" = 1 ]; then
    skip nsys "emulator mode"
elif ! command -v nsys >/dev/null; then
    skip nsys "nsys not on PATH (Nsight Systems not installed); scripts/profile.sh has the full profile"
elif need nsys; then
    if step nsys 180 "nsys-bench-step.nsys-rep" nsys profile --trace=cuda,nvtx,osrt --force-overwrite=true \
        -o "$OUT/nsys-bench-step" "$SAE" bench step --backend cuda --sparsifier topk,batchtopk "${NSYS_SHAPE[@]}"; then
        step nsys_stats 60 "kernel / API / NVTX summaries" bash -c nsys_stats
    fi
fi

# ---- summary

TOTAL=$(elapsed "$T_START" "$(now)")
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "mode: $([ "$EMULATOR" = 1 ] && echo "emulator (--backend cuda-emulator, tiny shapes; times mean nothing)" || echo gpu)$([ "$PREBUILT" = 1 ] && echo ', prebuilt binary')${BUNDLE:+ (bundle $BUNDLE)}"
    sed 's/^/- /' "$OUT/environment.txt"
    echo
    echo "| step | status | seconds | notes |"
    echo "|---|---|---:|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUSES[$i]} | ${SECONDS_TAKEN[$i]} | ${NOTES[$i]} |"
    done
    echo
    # Every step bench's rows in one table (relu's two rows: the dense codes path's crossover).
    python3 - "$OUT" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json"))):
    try:
        rep = json.load(open(path))
    except (OSError, ValueError):
        continue
    if not isinstance(rep, dict) or "precision" not in rep:
        continue
    for r in rep.get("rows", []):
        rows.append((os.path.basename(path), rep["precision"], r))
if rows:
    print("| bench | precision | encoder | sparsifier | step ms | step / GEMM | tokens/s | L0 |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name, prec, r in rows:
        print(f"| {name} | {prec} | {r.get('encoder', '')} | {r['sparsifier']} | {r['step_ms']:.3f} "
              f"| {r['step_over_gemm']:.2f} | {r['tokens_per_s']:.0f} | {r['l0']:.1f} |")
    print()
EOF
    echo "total: ${TOTAL} s (budget on an H100/H200: 480 s)"
    if [ "$FAILED" = 1 ]; then echo "result: FAILED"; else echo "result: passed"; fi
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
rm -f "$OUT/.nvcc"
exit "$FAILED"
