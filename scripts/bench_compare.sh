#!/usr/bin/env bash
# Runs each PyTorch reference workload and elbo's reproduction of it, one process at a time
# (torch first, then elbo), each under /usr/bin/time for its peak RSS, and prints a table:
# medians (ms; GFLOP/s at 2048^3 for gemm), the ratio torch/elbo (above 1 means elbo is faster),
# both peak RSS figures and elbo's efficiency (analytic FLOPs of a step / time, as a fraction of
# the GEMM rate of one `elbo bench gemm` probe run first; see crates/elbo-cli/src/bench/flops.rs).
# usage: scripts/bench_compare.sh [gemm w1 w2 w3 w3_sdpa w4 w4_sdpa s1 s2 w5_mnist w5_digits
#          w5_mnist_small s3_ar s3_ar_sdpa s3_mdlm s3_mdlm_sdpa s3_bd3lm s3_bd3lm_sdpa]
#        (default: all but the s3_*_sdpa ones; w5_digits_small is also accepted)
#   PY           python with torch (default ~/.cache/torchenv/bin/python; create it with
#                python3 -m venv ~/.cache/torchenv && ~/.cache/torchenv/bin/pip install torch numpy scikit-learn)
#   TORCH_BENCH  path to torch_bench.py (default bench/torch_bench.py)
#   OUT          where the JSON lines and time logs go (default bench-results/compare); only the
#                named workloads' files are replaced, so several runs can fill one table
#   BENCH_FLAGS  extra flags for both sides, e.g. "--warmup 1 --iters 2" for a quick check
#   GEMM_GFLOPS  the GEMM rate for the efficiency column (default: one `elbo bench gemm` run)
#   REPORT_ONLY  =1: run nothing, print the table of the named workloads from the files in $OUT
# w5_PRESET: `elbo bench unet --preset PRESET` against bench/torch_unet_bench.py --preset PRESET
# (the PyTorch port of elbo's U-Net; parameter counts must agree, and before timing, the port's
# output on elbo's weights and input must equal elbo's: `elbo bench unet --export`, `--check`). s3_*: LM sampling throughput,
# 16 x 256 tokens per run (ms per run; tokens/s = 4096 / s), `elbo bench s3_*` against
# torch_bench.py s3_*; s3_*_sdpa are torch's --sdpa runs against the same elbo run.
# w3_sdpa / w4_sdpa are torch's `--sdpa` runs, compared against elbo's w3 / w4 (run once).
# w3/w4 use the same text on both sides: `torch_bench.py prep` writes corpus.txt into $OUT and
# elbo reads it with --corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/torchenv/bin/python}
TORCH_BENCH=${TORCH_BENCH:-bench/torch_bench.py}
OUT=${OUT:-bench-results/compare}
BENCH_FLAGS=${BENCH_FLAGS:-}
TORCH_UNET=bench/torch_unet_bench.py
workloads=${*:-gemm w1 w2 w3 w3_sdpa w4 w4_sdpa s1 s2 w5_mnist w5_digits w5_mnist_small s3_ar s3_mdlm s3_bd3lm}
if [ "${REPORT_ONLY:-0}" != 1 ]; then
[ -x "$PY" ] || { echo "no python with torch at $PY (set PY)" >&2; exit 1; }
[ -f "$TORCH_BENCH" ] || { echo "no torch_bench.py at $TORCH_BENCH (set TORCH_BENCH)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is needed for peak RSS" >&2; exit 1; }
cargo build --release -q -p elbo-cli
ELBO=target/release/elbo
mkdir -p "$OUT"

# run TAG CMD...: stdout -> $OUT/TAG.json, /usr/bin/time -v -> $OUT/TAG.time
run() {
  local tag=$1; shift
  if ! /usr/bin/time -v "$@" >"$OUT/$tag.json" 2>"$OUT/$tag.time"; then
    echo "$tag failed:" >&2; tail -n 5 "$OUT/$tag.time" >&2; return 1
  fi
}

for w in $workloads; do
  rm -f "$OUT/torch_$w".{json,time} "$OUT/elbo_${w%_sdpa}".{json,time}
done
if [[ " $workloads " == *" w3"* || " $workloads " == *" w4"* ]]; then
  "$PY" "$TORCH_BENCH" prep --out "$OUT" >&2
fi
# the GEMM rate of the efficiency column, measured once (not inside each run: its 48 MB of
# matrices would show in the peak RSS of the small workloads)
if [ -z "${GEMM_GFLOPS:-}" ] && [[ " $workloads " != " gemm " ]]; then
  GEMM_GFLOPS=$("$ELBO" bench gemm | python3 -c \
    'import json,sys; print(next(r["gflops"] for r in map(json.loads, sys.stdin) if r["n"] == 2048))')
  echo "== GEMM rate for the efficiency column: $GEMM_GFLOPS GFLOP/s" >&2
fi
for w in $workloads; do
  base=${w%_sdpa}
  sdpa=(); [[ $w == *_sdpa ]] && sdpa=(--sdpa)
  case $base in
    gemm|w1|w2|w3|w4|s1|s2|s3_ar|s3_mdlm|s3_bd3lm)
      [[ $w == *_sdpa && $base != w3 && $base != w4 && $base != s3_* ]] && { echo "no '$w'" >&2; exit 1; }
      targs=("$TORCH_BENCH" "$base" "${sdpa[@]}"); eargs=("$base") ;;
    w5_digits|w5_digits_small|w5_mnist|w5_mnist_small)
      [[ $w == *_sdpa ]] && { echo "no '$w'" >&2; exit 1; }
      targs=("$TORCH_UNET" --preset "${base#w5_}"); eargs=(unet --preset "${base#w5_}")
      # the port must compute elbo's function: same weights and input, same output
      "$ELBO" bench unet --preset "${base#w5_}" --export "$OUT/unet_port" 2>/dev/null
      "$PY" "$TORCH_UNET" --preset "${base#w5_}" --check "$OUT/unet_port" >&2 ;;
    *) echo "unknown workload '$w'" >&2; exit 1 ;;
  esac
  [[ $base == w3 || $base == w4 ]] && eargs+=(--corpus "$OUT/corpus.txt")
  [[ $base != gemm ]] && eargs+=(--gemm-gflops "$GEMM_GFLOPS")
  echo "== $w: torch" >&2
  # shellcheck disable=SC2086
  run "torch_$w" "$PY" "${targs[@]}" $BENCH_FLAGS
  if [ ! -s "$OUT/elbo_$base.json" ]; then
    echo "== $base: elbo" >&2
    # shellcheck disable=SC2086
    run "elbo_$base" "$ELBO" bench "${eargs[@]}" $BENCH_FLAGS
  fi
done
fi

python3 - "$OUT" $workloads <<'EOF'
import json, re, sys
out, names = sys.argv[1], sys.argv[2:]
def rec(tag):
    lines = [json.loads(l) for l in open(f"{out}/{tag}.json") if l.startswith("{")]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/{tag}.time").read())
    return lines, int(rss.group(1)) / 1024 if rss else float("nan")
print(f"{'bench':<15} {'torch':>10} {'elbo':>10} {'unit':>7} {'ratio':>6} {'torch_rss_MB':>12} "
      f"{'elbo_rss_MB':>11} {'GFLOP':>9} {'elbo_eff':>8}")
bad = False
for w in names:
    (tl, trss), (el, erss) = rec(f"torch_{w}"), rec(f"elbo_{w.removesuffix('_sdpa')}")
    if w == "gemm":
        t = next(r for r in tl if r["n"] == 2048)["gflops"]
        e = next(r for r in el if r["n"] == 2048)["gflops"]
        ratio, unit, flop, eff = e / t, "GFLOP/s", "-", "-"
    else:
        t, e = tl[-1]["median_ms"], el[-1]["median_ms"]
        ratio, unit = t / e, "ms"
        flop = f"{el[-1]['gflop']:.2f}" if "gflop" in el[-1] else "-"
        eff = f"{100 * el[-1]['gemm_fraction']:.1f}%" if "gemm_fraction" in el[-1] else "-"
    if w.startswith("w5_") and tl[-1]["params"] != el[-1]["params"]:
        print(f"{w}: torch has {tl[-1]['params']} parameters, elbo {el[-1]['params']}", file=sys.stderr)
        bad = True
    print(f"{w:<15} {t:>10.1f} {e:>10.1f} {unit:>7} {ratio:>6.2f} {trss:>12.0f} {erss:>11.0f} "
          f"{flop:>9} {eff:>8}")
print("ratio = torch time / elbo time (gemm: elbo GFLOP/s / torch GFLOP/s); above 1 means elbo is faster")
print("GFLOP: analytic matmul/conv FLOPs of elbo's step (s1/s2/s3: of a whole sampling run); "
      "elbo_eff: their rate as a fraction of elbo's GEMM rate at 2048^3")
sys.exit(1 if bad else 0)
EOF
