#!/usr/bin/env bash
# Build, on a machine with network and Rust, everything scripts/gpu_check.sh needs on a GPU machine
# that has neither (no cargo, no crates, nothing to download): the `sae` binary with the kernels
# compiled ahead of time (nvcc from scripts/install-nvcc.sh, so the fatbin is embedded) and the two
# GPU test binaries, stripped (~11 MB each), in one folder. On the GPU machine, from the repo root:
#
#     scripts/gpu_check.sh --bundle BUNDLE_DIR OUT_DIR
#
#   scripts/gpu_bundle.sh [BUNDLE_DIR]        (default .gpu-bundle, ignored by git)
#
# BUNDLE_DIR/manifest.txt says what was built (commit, date, nvcc, host glibc: the GPU machine's
# glibc must be at least as new). Needs what a build needs (see README) and binutils' strip.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu-bundle}"
NVCC="${NVCC:-$(bash scripts/install-nvcc.sh)}"
export NVCC
mkdir -p "$DIR"
# One compile: the integration tests build target/release/sae too, with the same features.
LIST="$(mktemp)"
trap 'rm -f "$LIST" "$DIR"/*.tmp' EXIT
cargo test --release --no-run --test cuda_parity --test nvrtc_compile --message-format=json >"$LIST"
exe_of() { # TEST_NAME: the path of its test executable, from cargo's JSON messages
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[2] and m.get("executable"):
        print(m["executable"])
' "$LIST" "$1" | tail -n 1
}
for t in cuda_parity nvrtc_compile; do
    exe="$(exe_of "$t")"
    [ -x "$exe" ] || {
        echo "gpu_bundle: cargo built no executable for tests/$t.rs" >&2
        exit 1
    }
    strip -o "$DIR/$t.tmp" "$exe" && mv "$DIR/$t.tmp" "$DIR/$t"
done
strip -o "$DIR/sae.tmp" target/release/sae && mv "$DIR/sae.tmp" "$DIR/sae"
[ -f target/ptxas-report.txt ] && cp target/ptxas-report.txt "$DIR/ptxas-report.txt"
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD && echo || echo ' (+ uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "nvcc: $("$NVCC" --version | tail -n 1)"
    echo "glibc: $(ldd --version | head -n 1)"
    "$DIR/sae" --version | tail -n 1
} >"$DIR/manifest.txt"
grep -q "ahead of time" "$DIR/manifest.txt" || {
    echo "gpu_bundle: the binary has no embedded kernels (was NVCC found?): see $DIR/manifest.txt" >&2
    exit 1
}
du -sh "$DIR"/* | sed 's/^/gpu_bundle: /' >&2
cat "$DIR/manifest.txt" >&2
