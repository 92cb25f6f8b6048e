#!/usr/bin/env bash
# Builds the `elbo` binary with the `cuda` feature on any Linux x86-64 machine, GPU or not, and
# checks that it runs there. See docs/cuda.md.
#
# The CUDA compiler comes from NVIDIA's PyPI wheels (nvcc, ptxas, cicc, the runtime headers and
# CCCL), installed once into a virtual environment under the cache directory: no system CUDA
# toolkit is needed. candle's kernels are compiled to PTX for CUDA_COMPUTE_CAP (no GPU is queried).
# The binary opens libcuda, libcublas(Lt), libcurand and libnvrtc at run time (cudarc's
# `dynamic-loading`), so it links without them and runs, on the CPU, where they are missing.
#
# Usage: scripts/build_cuda.sh [extra cargo build args]
#        scripts/build_cuda.sh --print-env   (prints the build environment as `export` lines, for
#                                             other cargo commands: eval "$(... --print-env)")
# Environment (all optional):
#   ELBO_CUDA_CACHE      where the wheels' venv lives (default ${XDG_CACHE_HOME:-~/.cache}/elbo-cuda)
#   ELBO_CUDA_WHEELS     version pattern of the CUDA wheels (default 13.0.*, matching
#                        CUDARC_CUDA_VERSION; all five wheels are pinned to it)
#   CUDA_COMPUTE_CAP     the GPU generation the PTX targets (default 90: H100/H200)
#   CUDARC_CUDA_VERSION  the CUDA API cudarc binds (default 13000; cudarc 0.19.10 knows <= 13.4)
#   CARGO_TARGET_DIR     the build directory (default target/cuda, apart from the CPU build's)
#   ELBO_CUDA_NICE       a prefix for the cargo command (e.g. "nice -n 19")
# Prints the binary's path last; exits non-zero if the build or the run check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

cache="${ELBO_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/elbo-cuda}"
wheels="${ELBO_CUDA_WHEELS:-13.0.*}"
venv="$cache/venv-${wheels//[^0-9A-Za-z.]/_}"
python="${PYTHON:-python3}"

# 1. The CUDA compiler wheels (once per cache directory and version).
if [ ! -f "$venv/.complete" ]; then
  echo "build_cuda: installing the CUDA $wheels compiler wheels into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  pkgs=("nvidia-cuda-nvcc==$wheels" "nvidia-cuda-crt==$wheels" "nvidia-nvvm==$wheels"
    "nvidia-cuda-runtime==$wheels" "nvidia-cuda-cccl==$wheels")
  if "$python" -m venv "$venv" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}"
  else
    # no venv module (Debian without python3-venv): pip's --target into the same place
    rm -rf "$venv"
    "$python" -m pip install --quiet --disable-pip-version-check \
      --target "$venv/lib/site-packages" "${pkgs[@]}"
  fi
  touch "$venv/.complete"
fi
cuda_root="$(find "$venv" -type f -path '*/site-packages/nvidia/cu*/bin/nvcc' -print -quit)"
if [ -z "$cuda_root" ]; then
  echo "build_cuda: no nvcc under $venv (delete it and rerun)" >&2
  exit 1
fi
cuda_root="$(cd "$(dirname "$cuda_root")/.." && pwd)"

# 2. The build environment. candle-kernels (through cudaforge) finds nvcc on PATH and the headers
# under CUDA_ROOT / CUDA_PATH; cudarc takes the API version from CUDARC_CUDA_VERSION (it would
# refuse a newer nvcc's version than it knows).
export PATH="$cuda_root/bin:$PATH"
export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
# candle-kernels links its statically compiled MoE / GGUF kernels against the CUDA runtime with
# `-lcudart` (a dynamic libcudart.so.13 the binary would need to start at all). Here `-lcudart`
# finds a linker script (as glibc's libc.so is one) that links NVIDIA's libcudart_static.a
# instead: it opens libcuda itself at run time, so the binary still starts without any CUDA
# library. LIBRARY_PATH reaches the linker through the cc driver and, unlike RUSTFLAGS, does not
# change cargo's fingerprints.
cudart_static="$(find "$cuda_root" -name libcudart_static.a -print -quit)"
if [ -z "$cudart_static" ]; then
  echo "build_cuda: no libcudart_static.a under $cuda_root" >&2
  exit 1
fi
link_dir="$cache/link-${wheels//[^0-9A-Za-z.]/_}"
mkdir -p "$link_dir"
echo "INPUT($cudart_static)" >"$link_dir/libcudart.so"
export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [ "${1:-}" = --print-env ]; then
  for v in PATH CUDA_ROOT CUDA_PATH CUDA_HOME CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION \
    CARGO_TARGET_DIR LIBRARY_PATH; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  exit 0
fi
nvcc --version | tail -n 2 >&2
echo "build_cuda: CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" \
  "CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2

# 3. The build.
start=$SECONDS
# shellcheck disable=SC2086
${ELBO_CUDA_NICE:-} cargo build --release -p elbo-cli --features cuda "$@"
echo "build_cuda: cargo build took $((SECONDS - start)) s" >&2
bin="$CARGO_TARGET_DIR/release/elbo"

# 4. The binary must run here, GPU or not: `--version` names the CUDA libraries it found.
version="$("$bin" --version)"
echo "$version"
if ! grep -q '^CUDA: ' <<<"$version"; then
  echo "build_cuda: '$bin --version' does not report CUDA" >&2
  exit 1
fi
# Without a usable GPU, asking for CUDA must be a clean error (exit 1), never a crash.
if grep -q '^CUDA: unavailable' <<<"$version"; then
  set +e
  msg="$(ELBO_DEVICE=cuda "$bin" train --model gaussian --data 8gaussians --steps 1 \
    --out "$(mktemp -d)/run" --quiet 2>&1)"
  rc=$?
  set -e
  if [ "$rc" != 1 ] || ! grep -q 'CUDA' <<<"$msg"; then
    echo "build_cuda: ELBO_DEVICE=cuda without a GPU gave exit $rc (expected 1):" >&2
    echo "$msg" >&2
    exit 1
  fi
  echo "build_cuda: ELBO_DEVICE=cuda without a GPU fails cleanly: $(tail -n 1 <<<"$msg")" >&2
fi
echo "$bin"
