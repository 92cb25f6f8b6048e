#!/usr/bin/env bash
# Runs a PyTorch reference workload and elbo's reproduction of it, one after the other, and prints
# both medians and the ratio (PyTorch median / elbo median: above 1 means elbo is faster).
# usage: scripts/bench_compare.sh [w1|s2 ...]
#   PY      python with torch (default ~/.cache/torchenv/bin/python; create it with
#           python3 -m venv ~/.cache/torchenv && ~/.cache/torchenv/bin/pip install torch numpy)
#   TORCH_BENCH  path to torch_bench.py (default ../shared/bench-ref/torch_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/torchenv/bin/python}
TORCH_BENCH=${TORCH_BENCH:-../shared/bench-ref/torch_bench.py}
[ -x "$PY" ] || { echo "no python with torch at $PY (set PY)" >&2; exit 1; }
[ -f "$TORCH_BENCH" ] || { echo "no torch_bench.py at $TORCH_BENCH (set TORCH_BENCH)" >&2; exit 1; }
cargo build --release -q -p elbo-cli
workloads=${*:-w1 s2}
printf '%-6s %12s %12s %8s %14s %14s\n' bench torch_ms elbo_ms ratio torch_rss_MB elbo_rss_MB
for w in $workloads; do
  t=$( { /usr/bin/time -f 'RSS %M' "$PY" "$TORCH_BENCH" "$w" 2>&1 1>&3 | grep RSS; } 3>/tmp/elbo_bench_torch.json )
  e=$( { /usr/bin/time -f 'RSS %M' target/release/elbo bench "$w" 2>&1 1>&3 | grep RSS; } 3>/tmp/elbo_bench_elbo.json )
  tm=$(python3 -c 'import json,sys; print(json.loads(open("/tmp/elbo_bench_torch.json").read().strip().splitlines()[-1])["median_ms"])')
  em=$(python3 -c 'import json,sys; print(json.loads(open("/tmp/elbo_bench_elbo.json").read().strip().splitlines()[-1])["median_ms"])')
  printf '%-6s %12.1f %12.1f %8.2f %14d %14d\n' "$w" "$tm" "$em" "$(python3 -c "print($tm/$em)")" \
    "$(( ${t#RSS } / 1024 ))" "$(( ${e#RSS } / 1024 ))"
done
