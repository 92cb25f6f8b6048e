#!/usr/bin/env bash
# Runs each PyTorch reference workload and elbo's reproduction of it, one process at a time
# (torch first, then elbo), each under /usr/bin/time for its peak RSS, and prints a table:
# medians (ms; GFLOP/s at 2048^3 for gemm), the ratio torch/elbo (above 1 means elbo is faster)
# and both peak RSS figures.
# usage: scripts/bench_compare.sh [gemm w1 w2 w3 w3_sdpa w4 w4_sdpa s1 s2]   (default: all)
#   PY           python with torch (default ~/.cache/torchenv/bin/python; create it with
#                python3 -m venv ~/.cache/torchenv && ~/.cache/torchenv/bin/pip install torch numpy scikit-learn)
#   TORCH_BENCH  path to torch_bench.py (default bench/torch_bench.py)
#   OUT          where the JSON lines and time logs go (default bench-results/compare)
#   BENCH_FLAGS  extra flags for both sides, e.g. "--warmup 1 --iters 2" for a quick check
# w3_sdpa / w4_sdpa are torch's `--sdpa` runs, compared against elbo's w3 / w4 (run once).
# w3/w4 use the same text on both sides: `torch_bench.py prep` writes corpus.txt into $OUT and
# elbo reads it with --corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/torchenv/bin/python}
TORCH_BENCH=${TORCH_BENCH:-bench/torch_bench.py}
OUT=${OUT:-bench-results/compare}
BENCH_FLAGS=${BENCH_FLAGS:-}
[ -x "$PY" ] || { echo "no python with torch at $PY (set PY)" >&2; exit 1; }
[ -f "$TORCH_BENCH" ] || { echo "no torch_bench.py at $TORCH_BENCH (set TORCH_BENCH)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is needed for peak RSS" >&2; exit 1; }
cargo build --release -q -p elbo-cli
ELBO=target/release/elbo
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.time
workloads=${*:-gemm w1 w2 w3 w3_sdpa w4 w4_sdpa s1 s2}

# run TAG CMD...: stdout -> $OUT/TAG.json, /usr/bin/time -v -> $OUT/TAG.time
run() {
  local tag=$1; shift
  if ! /usr/bin/time -v "$@" >"$OUT/$tag.json" 2>"$OUT/$tag.time"; then
    echo "$tag failed:" >&2; tail -n 5 "$OUT/$tag.time" >&2; return 1
  fi
}

if [[ " $workloads " == *" w3"* || " $workloads " == *" w4"* ]]; then
  "$PY" "$TORCH_BENCH" prep --out "$OUT" >&2
fi
for w in $workloads; do
  base=${w%_sdpa}
  case $w in
    gemm|w1|w2|w3|w4|s1|s2) targs=("$base") ;;
    w3_sdpa|w4_sdpa) targs=("$base" --sdpa) ;;
    *) echo "unknown workload '$w'" >&2; exit 1 ;;
  esac
  eargs=("$base")
  [[ $base == w3 || $base == w4 ]] && eargs+=(--corpus "$OUT/corpus.txt")
  echo "== $w: torch" >&2
  # shellcheck disable=SC2086
  run "torch_$w" "$PY" "$TORCH_BENCH" "${targs[@]}" $BENCH_FLAGS
  if [ ! -s "$OUT/elbo_$base.json" ]; then
    echo "== $base: elbo" >&2
    # shellcheck disable=SC2086
    run "elbo_$base" "$ELBO" bench "${eargs[@]}" $BENCH_FLAGS
  fi
done

python3 - "$OUT" $workloads <<'EOF'
import json, re, sys
out, names = sys.argv[1], sys.argv[2:]
def rec(tag):
    lines = [json.loads(l) for l in open(f"{out}/{tag}.json") if l.startswith("{")]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/{tag}.time").read())
    return lines, int(rss.group(1)) / 1024 if rss else float("nan")
print(f"{'bench':<9} {'torch':>12} {'elbo':>12} {'unit':>7} {'ratio':>7} {'torch_rss_MB':>13} {'elbo_rss_MB':>12}")
for w in names:
    (tl, trss), (el, erss) = rec(f"torch_{w}"), rec(f"elbo_{w.removesuffix('_sdpa')}")
    if w == "gemm":
        t = next(r for r in tl if r["n"] == 2048)["gflops"]
        e = next(r for r in el if r["n"] == 2048)["gflops"]
        ratio, unit = e / t, "GFLOP/s"
    else:
        t, e = tl[-1]["median_ms"], el[-1]["median_ms"]
        ratio, unit = t / e, "ms"
    print(f"{w:<9} {t:>12.1f} {e:>12.1f} {unit:>7} {ratio:>7.2f} {trss:>13.0f} {erss:>12.0f}")
print("ratio = torch time / elbo time (gemm: elbo GFLOP/s / torch GFLOP/s); above 1 means elbo is faster")
EOF
