#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and its driver: builds elbo with CUDA, runs the test suite on
# the GPU and the training workloads of `elbo bench` on it, and writes everything to a results
# directory. See docs/cuda.md.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default bench-results/gpu-<date>)
# Environment (all optional):
#   CUDA_COMPUTE_CAP   the GPU's compute capability without the dot (default: asked of
#                      nvidia-smi; 90 for H100/H200); passed to scripts/build_cuda.sh
#   GPU_CHECK_BENCH    the workloads (default "gemm w1 w2 w3 w4 unet"; s1 and s2 time the packed
#                      CPU sampling path and always run on the CPU)
#   GPU_CHECK_TESTS    0 skips the test suite
#   ELBO_DEVICE        the GPU (default cuda, i.e. cuda:0)
#
# The libraries the binary opens at run time (libcuda from the driver; libcublas, libcublasLt,
# libcurand, libnvrtc from the CUDA toolkit or the nvidia-cublas / nvidia-curand /
# nvidia-cuda-nvrtc wheels) must be on the loader's path: `elbo --version` lists what it finds.
# With ELBO_CUDA_LIBS_FROM_PIP=1 they are installed from PyPI into the build's cache and put on
# LD_LIBRARY_PATH.
#
# Exit status: 0 when the build, every test and every workload passed; 1 otherwise (the results
# directory says which: summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: >"$summary"
status=0
note() { echo "$*" | tee -a "$summary"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >"$out/nvidia-smi.txt" 2>&1; then
  note "FAIL nvidia-smi: no usable GPU driver here (see nvidia-smi.txt)"
  exit 1
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
  export CUDA_COMPUTE_CAP="${cap:-90}"
fi
export ELBO_DEVICE="${ELBO_DEVICE:-cuda}"
note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1);" \
  "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP ELBO_DEVICE=$ELBO_DEVICE"

# 1. The build (the same script as CI), into target/cuda.
start=$SECONDS
if ! scripts/build_cuda.sh >"$out/build.log" 2>&1; then
  note "FAIL build: scripts/build_cuda.sh (see build.log)"
  exit 1
fi
bin="$(tail -n 1 "$out/build.log")"
note "ok   build in $((SECONDS - start)) s: $bin"

# The run-time libraries, from PyPI if asked (same CUDA major version as the build).
if [ "${ELBO_CUDA_LIBS_FROM_PIP:-0}" = 1 ]; then
  venv="$(find "${ELBO_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo-cuda}" -maxdepth 1 -type d -name 'venv-*' -print -quit)"
  wheels="${ELBO_CUDA_WHEELS:-13.0.*}"
  "$venv/bin/python" -m pip install --quiet "nvidia-cublas==${wheels%%.*}.*" \
    "nvidia-curand==10.*" "nvidia-cuda-nvrtc==$wheels" >>"$out/build.log" 2>&1 ||
    note "warn pip install of the CUDA runtime wheels failed (see build.log)"
  libdir="$(find "$venv" -type d -path '*/site-packages/nvidia/cu*/lib' -print -quit)"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$bin" --version >"$out/version.txt" 2>&1
cat "$out/version.txt" | tee -a "$summary"
if ! grep -q '^CUDA: available' "$out/version.txt"; then
  note "FAIL elbo --version: CUDA not available (libraries missing? see version.txt)"
  exit 1
fi

# 2. The test suite with the cuda feature. Library tests build their tensors on the CPU (they
# check the CPU kernels, and the same code is what a cuda build ships); the device_fallback test
# runs the composed paths on the GPU against the fused CPU kernels; the CLI tests run the `elbo`
# binary, which trains on ELBO_DEVICE.
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  start=$SECONDS
  if (eval "$(scripts/build_cuda.sh --print-env)" &&
    cargo test --release --workspace --features elbo/cuda,elbo-cli/cuda) \
    >"$out/tests.log" 2>&1; then
    note "ok   cargo test --release --workspace (cuda) in $((SECONDS - start)) s: $(grep -c '^test .* ok$' "$out/tests.log") passed"
  else
    status=1
    note "FAIL cargo test --release --workspace (cuda): $(grep -E '^test .* FAILED$' "$out/tests.log" | tr '\n' ' ') (see tests.log)"
  fi
  if grep -q 'skipped: set ELBO_DEVICE' "$out/tests.log"; then
    status=1
    note "FAIL device_fallback was skipped: the GPU was not used"
  fi
fi

# 3. The reference workloads on the GPU, one JSON line each (same keys as on the CPU).
: >"$out/bench.jsonl"
for w in ${GPU_CHECK_BENCH:-gemm w1 w2 w3 w4 unet}; do
  if "$bin" bench "$w" >>"$out/bench.jsonl" 2>"$out/bench-$w.err"; then
    note "ok   elbo bench $w: $(grep -o '"median_ms":[0-9.e+-]*' "$out/bench.jsonl" | tail -n 1)"
  else
    status=1
    note "FAIL elbo bench $w (see bench-$w.err)"
  fi
done

note "results in $out"
exit $status
