#!/usr/bin/env bash
# Crash test of `elbo train` (issue 13, item 7): kill -9 training at random moments over many
# cycles (during start-up, steps, evaluations, `best/` and checkpoint writes), resume it each time
# with `elbo train --resume DIR`, and check that every run ends bit for bit where an uninterrupted
# run of the same config ends.
#
# Usage:
#   scripts/crash_test.sh [--cycles N] [--seed S] [--elbo PATH] [--workdir DIR] [--max-delay SEC]
#                         [--quick] [--strict|--lenient] [--keep]
#
#   --cycles N       kills that must land on a live training process (default 50; env
#                    CRASH_TEST_CYCLES)
#   --seed S         seed of the random kill times, printed at the start so that a failing run can
#                    be repeated (default: from the clock; env CRASH_TEST_SEED). Timing noise means
#                    a repeat kills at the same delays, not at the same instructions.
#   --elbo PATH      the elbo binary (default target/release/elbo, built with
#                    `cargo build --release -p elbo-cli` if missing; env ELBO_BIN)
#   --workdir DIR    where runs and logs go (default: a fresh mktemp directory, removed on success
#                    and kept, with its path printed, on failure; a DIR given here is always kept)
#   --max-delay SEC  kill delays are uniform in [0, SEC] after each (re)start (default: a quarter
#                    of the uninterrupted run's duration); one kill in eight instead comes within
#                    0.1 s of the start, so that start-up (config, metrics truncation, checkpoint
#                    loading) is hit too
#   --quick          a tiny config (1-2 s uninterrupted; the whole test well under a minute) for
#                    CI: scripts/crash_test.sh --cycles 3 --quick
#   --strict         fail when leftovers of a crashed save (`*.tmp-*`, `*.old`) are still in a
#                    run directory at the end (the default: elbo cleans them when it resumes)
#   --lenient        only warn about such leftovers
#   --keep           keep the work directory on success too
#
# What it does: writes a small DDPM-on-digits config (400 steps, about 20 s on one shared core;
# checkpoint every 4 steps, evaluation and `best/` every 50, one metrics line per step; 50 kills
# take 2-3 minutes), trains it uninterrupted into WORK/ref, then starts the same training into
# WORK/crash-1 and loops: let it run a random time, `kill -9` it, `elbo train --resume` it.
# Should a run finish before all kills have landed, it is checked and a new round starts in
# WORK/crash-2, and so on; once N kills have landed, the last process runs to the end. Only kills
# that hit a live process count. Nothing inside a run directory is ever touched by this script
# between cycles: elbo must recover by itself. If `--resume` fails while the run has never had a
# checkpoint (killed before its first one; older elbo cannot resume that), the original
# `elbo train --config ... --out ...` is run again and the fallback is logged.
#
# Failures on the way: a resume that exits with an error (other than that fallback), a resume
# that starts from another step than the checkpoint on disk (its "resuming ... at step K" line),
# a checkpoint on disk that goes back to an earlier step or disappears, a process that dies of
# anything but the script's SIGKILL, a last run that hangs.
#
# Each round passes when its final checkpoint/ and best/ hold the same files as ref/ with
# byte-identical contents (every *.safetensors and state.json), config.json is identical, and
# metrics.jsonl is identical line for line once the wall-clock `elapsed_s` field is removed.
# Warnings (the first a failure unless --lenient): leftovers such as `checkpoint.tmp-PID`,
# `best.tmp-PID` or `checkpoint.old`; a loss.png missing or unlike the uninterrupted run's.
# Every process's command, exit code, kill delay, the phase the kill landed in (as far as the
# files tell) and its stderr go to WORK/crash.log. Exit status 0 on PASS, 1 on FAIL, 2 on bad use.
# Training runs on one thread (RAYON_NUM_THREADS=1 unless set), the same for ref and crash runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CYCLES="${CRASH_TEST_CYCLES:-50}"
SEED="${CRASH_TEST_SEED:-}"
ELBO="${ELBO_BIN:-}"
WORK="${CRASH_TEST_WORKDIR:-}"
MAX_DELAY=""
QUICK=0
STRICT=1
KEEP=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() {
    echo "crash_test: $*" >&2
    exit 2
}
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --cycles) need_arg "$@"; CYCLES="$2"; shift 2 ;;
    --seed) need_arg "$@"; SEED="$2"; shift 2 ;;
    --elbo) need_arg "$@"; ELBO="$2"; shift 2 ;;
    --workdir) need_arg "$@"; WORK="$2"; shift 2 ;;
    --max-delay) need_arg "$@"; MAX_DELAY="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --strict) STRICT=1; shift ;;
    --lenient) STRICT=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$CYCLES" =~ ^[0-9]+$ ]] || die "--cycles must be a non-negative integer, not '$CYCLES'"
[[ -z "$SEED" || "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer"
[[ -z "$MAX_DELAY" || "$MAX_DELAY" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--max-delay must be seconds"
[[ -n "$SEED" ]] || SEED=$(($(date +%s) % 1000000))
RANDOM=$SEED # seeds bash's generator: the kill delays follow from SEED

# ---- the binary ------------------------------------------------------------------------------
if [[ -z "$ELBO" ]]; then
    ELBO="$ROOT/target/release/elbo"
    if [[ ! -x "$ELBO" ]]; then
        echo "building $ELBO (cargo build --release -p elbo-cli)"
        (cd "$ROOT" && cargo build --release -p elbo-cli)
    fi
fi
[[ -x "$ELBO" ]] || die "elbo binary '$ELBO' not found or not executable"
ELBO="$(cd "$(dirname "$ELBO")" && pwd)/$(basename "$ELBO")"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

# ---- the work directory ----------------------------------------------------------------------
if [[ -z "$WORK" ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/elbo-crash-test.XXXXXX")"
else
    KEEP=1
    mkdir -p "$WORK"
    [[ -z "$(ls -A "$WORK")" ]] || die "work directory $WORK is not empty"
    WORK="$(cd "$WORK" && pwd)"
fi
LOG="$WORK/crash.log"
mkdir -p "$WORK/logs"
: >"$LOG"

CHILD=""      # the elbo process running now, if any
RESULT="FAIL" # until proven otherwise
on_exit() {
    local rc=$?
    if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
        kill -9 "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    if [[ "$RESULT" == PASS && "$KEEP" == 0 ]]; then
        rm -rf "$WORK"
    else
        echo "work directory kept: $WORK (log: $LOG)" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

log() { echo "$*" >>"$LOG"; }
say() {
    echo "$*"
    log "$*"
}
now_us() { local t="${EPOCHREALTIME//[.,]/}"; echo "$((10#$t))"; }
secs() { printf '%d.%03d' $(($1 / 1000000)) $(($1 % 1000000 / 1000)); } # microseconds -> "s.mmm"

# ---- the config ------------------------------------------------------------------------------
# DDPM with EMA and AdamW on the 8x8 digits: checkpoints are three safetensors files (model, ema,
# optim) plus state.json; the evaluation is the VLB of held-out images (a real share of the run).
if [[ "$QUICK" == 1 ]]; then
    STEPS=60 EVAL_EVERY=20 CKPT_EVERY=2 HIDDEN=64 LAYERS=2 T=100 BATCH=64 EVAL_N=20 EMBED=16
else
    STEPS=400 EVAL_EVERY=50 CKPT_EVERY=4 HIDDEN=256 LAYERS=3 T=1000 BATCH=256 EVAL_N=40 EMBED=32
fi
CFG="$WORK/crash.toml"
cat >"$CFG" <<EOF
# written by scripts/crash_test.sh
[model]
name = "ddpm"
timesteps = $T
parameterization = "levels"

[model.net]
backbone = "mlp"
hidden = $HIDDEN
layers = $LAYERS
time_embed_dim = $EMBED

[data]
name = "digits"

[train]
steps = $STEPS
batch_size = $BATCH
lr = 1e-3
warmup_steps = 20
ema_decay = 0.99
seed = 7
eval_every = $EVAL_EVERY
eval_examples = $EVAL_N
checkpoint_every = $CKPT_EVERY
log_every = 1
EOF

T0=$(now_us)
REPEAT="--seed $SEED"
[[ "$QUICK" == 0 ]] || REPEAT+=" --quick"
say "crash test: $CYCLES kills, seed $SEED (repeat with $REPEAT), elbo $ELBO"
say "work directory $WORK, RAYON_NUM_THREADS=$RAYON_NUM_THREADS"

# ---- reference: uninterrupted ----------------------------------------------------------------
t=$(now_us)
rc=0
"$ELBO" train --config "$CFG" --out "$WORK/ref" --quiet 2>"$WORK/logs/ref.stderr" || rc=$?
REF_US=$(($(now_us) - t))
if [[ "$rc" != 0 ]]; then
    say "FAIL: the uninterrupted reference run failed (exit $rc):"
    sed 's/^/    /' "$WORK/logs/ref.stderr" | tee -a "$LOG"
    exit 1
fi
say "reference run: $STEPS steps in $(secs "$REF_US") s"
if [[ -n "$MAX_DELAY" ]]; then
    MAX_US=$(awk -v s="$MAX_DELAY" 'BEGIN { printf "%d", s * 1000000 }')
else
    MAX_US=$((REF_US / 4))
fi
EARLY_US=100000
FINISH_LIMIT_US=$((REF_US * 10 + 120000000)) # a last run taking longer than this hangs
say "kill delays: uniform in [0, $(secs "$MAX_US")] s, one in eight in [0, $(secs "$EARLY_US")] s"

# ---- helpers ---------------------------------------------------------------------------------
# The step of the checkpoint a resume of run DIR would load (0 if none).
ckpt_step() {
    local d="$1" f
    for f in "$d/checkpoint/state.json" "$d/checkpoint.old/state.json"; do
        if [[ -f "$f" ]]; then
            sed -n 's/^  "step": \([0-9]*\).*/\1/p' "$f" | head -n1
            return
        fi
    done
    echo 0
}

# The largest step of a complete line of DIR/metrics.jsonl (0 if none).
last_step() {
    local m="$1/metrics.jsonl"
    [[ -f "$m" ]] || { echo 0; return; }
    awk '/\}$/ && match($0, /"step":[0-9]+/) { s = substr($0, RSTART + 7, RLENGTH - 7) + 0; if (s > max) max = s }
         END { print max + 0 }' "$m"
}

# Where in the run a kill landed, from what the killed process (PID) left in DIR; START is the
# step it started from. A best guess: only the file system is looked at.
phase_of() {
    local d="$1" pid="$2" start="$3" m="$1/metrics.jsonl" last line step
    if [[ ! -f "$d/config.json" ]]; then
        echo "start-up (before config.json)"
    elif [[ -e "$d/checkpoint.tmp-$pid" ]]; then
        echo "checkpoint write (temporary directory)"
    elif [[ -e "$d/checkpoint.old" && ! -e "$d/checkpoint" ]]; then
        echo "checkpoint swap (between the renames)"
    elif [[ -e "$d/checkpoint.old" ]]; then
        echo "checkpoint swap (after the renames: directory fsync, removing .old)"
    elif [[ -e "$d/best.tmp-$pid" || -e "$d/best.old" ]]; then
        echo "best/ write"
    elif compgen -G "$d/*.tmp-$pid" >/dev/null; then
        echo "start-up (atomic file write)"
    elif [[ -s "$m" && "$(tail -c1 "$m" | od -An -c | tr -d ' ')" != '\n' ]]; then
        echo "metrics line write (partial line)"
    else
        last=$(last_step "$d")
        line=$(tail -n1 "$m" 2>/dev/null || true)
        if ((last <= start)); then
            echo "start-up (no step logged yet)"
        elif [[ "$line" == *eval_nll* ]]; then
            echo "after an evaluation"
        else
            step=$last
            if ((step % EVAL_EVERY == 0 || step == STEPS)); then
                echo "evaluation"
            elif ((step % CKPT_EVERY == 0)); then
                echo "steps (at a checkpoint step)"
            else
                echo "steps"
            fi
        fi
    fi
}

FAILURES=0
WARNINGS=0
fail() {
    FAILURES=$((FAILURES + 1))
    say "  FAIL: $*"
}
warn() {
    WARNINGS=$((WARNINGS + 1))
    say "  warning: $*"
}

# The names of the entries of directory DIR, sorted, on one line.
names() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | paste -sd' ' -; }

# Compare run DIR with the reference, bit for bit.
check_run() {
    local d="$1" sub f name left
    for sub in checkpoint best; do
        if [[ ! -d "$d/$sub" ]]; then
            fail "$d/$sub is missing"
            continue
        fi
        if [[ "$(names "$WORK/ref/$sub")" != "$(names "$d/$sub")" ]]; then
            fail "$sub/ holds other files than ref/$sub/: $(names "$d/$sub")"
        fi
        for f in "$WORK/ref/$sub"/*; do
            name=$(basename "$f")
            if ! cmp -s "$f" "$d/$sub/$name"; then
                fail "$sub/$name differs from the uninterrupted run's"
            fi
        done
    done
    cmp -s "$WORK/ref/config.json" "$d/config.json" || fail "config.json differs"
    if ! diff <(sed -E 's/"elapsed_s":[^,}]*,?//' "$WORK/ref/metrics.jsonl") \
        <(sed -E 's/"elapsed_s":[^,}]*,?//' "$d/metrics.jsonl") >"$WORK/logs/metrics.diff"; then
        fail "metrics.jsonl differs from the uninterrupted run's (without elapsed_s), first lines of the diff:"
        head -n 8 "$WORK/logs/metrics.diff" | sed 's/^/      /' | tee -a "$LOG"
    fi
    left=$(find "$d" -mindepth 1 -maxdepth 1 \( -name '*.tmp-*' -o -name '*.old' \) -printf '%f\n' |
        sort | tr '\n' ' ')
    left="${left% }"
    if [[ -n "$left" ]]; then
        if [[ "$STRICT" == 1 ]]; then
            fail "leftovers of crashed writes in $d: $left"
        else
            warn "leftovers of crashed writes in $d (a failure unless --lenient): $left"
        fi
    fi
    if [[ ! -f "$d/loss.png" ]]; then
        warn "no loss.png in $d"
    elif ! cmp -s "$WORK/ref/loss.png" "$d/loss.png"; then
        warn "loss.png differs from the uninterrupted run's"
    fi
}

# ---- crash runs ------------------------------------------------------------------------------
KILLS=0
PROCS=0
ROUND=0
FALLBACKS=0
declare -A PHASES=()
while :; do
    ROUND=$((ROUND + 1))
    DIR="$WORK/crash-$ROUND"
    say "round $ROUND: $DIR"
    cmd=(train --config "$CFG" --out "$DIR" --quiet)
    finished=0
    max_ck=0 # the latest checkpoint step seen on disk in this run: it must never go back
    while :; do
        PROCS=$((PROCS + 1))
        start=$(ckpt_step "$DIR")
        if ((KILLS < CYCLES)); then
            if ((RANDOM % 8 == 0)); then
                delay=$((EARLY_US * RANDOM / 32768))
            else
                delay=$((MAX_US * (RANDOM * 32768 + RANDOM) / 1073741824))
            fi
            deadline_text="kill after $(secs "$delay") s"
        else
            delay=$FINISH_LIMIT_US
            deadline_text="run to the end"
        fi
        err="$WORK/logs/proc-$PROCS.stderr"
        t=$(now_us)
        "$ELBO" "${cmd[@]}" 2>"$err" &
        CHILD=$!
        deadline=$((t + delay))
        while kill -0 "$CHILD" 2>/dev/null && (($(now_us) < deadline)); do
            sleep 0.005
        done
        killed=0
        if kill -0 "$CHILD" 2>/dev/null; then
            kill -9 "$CHILD" 2>/dev/null && killed=1
        fi
        rc=0
        { wait "$CHILD"; } 2>/dev/null || rc=$? # (no "Killed" notice from bash)
        ran=$(($(now_us) - t))
        pid=$CHILD
        CHILD=""
        what="process $PROCS (pid $pid): elbo ${cmd[*]} from step $start, $deadline_text"
        # a resume must start from the checkpoint on disk, not from an older one or from scratch
        at=$(sed -n 's/^resuming .* at step \([0-9]*\) of [0-9]*$/\1/p' "$err" | head -n1)
        if [[ -n "$at" && "$at" != "$start" ]]; then
            log "$what: exit $rc after $(secs "$ran") s"
            sed 's/^/    | /' "$err" >>"$LOG"
            fail "process $PROCS resumed at step $at, but the checkpoint on disk was of step $start"
            break
        fi
        ck=$(ckpt_step "$DIR")
        if ((ck < max_ck)); then
            log "$what: exit $rc after $(secs "$ran") s"
            sed 's/^/    | /' "$err" >>"$LOG"
            fail "the checkpoint on disk went back from step $max_ck to step $ck"
            break
        fi
        max_ck=$ck
        if [[ "$rc" == 137 && "$killed" == 1 ]]; then
            if ((KILLS >= CYCLES)); then
                log "$what: exit $rc after $(secs "$ran") s"
                sed 's/^/    | /' "$err" >>"$LOG"
                fail "the last run did not finish within $(secs "$FINISH_LIMIT_US") s (hung?)"
                break
            fi
            KILLS=$((KILLS + 1))
            phase=$(phase_of "$DIR" "$pid" "$start")
            PHASES[$phase]=$((${PHASES[$phase]:-0} + 1))
            log "$what: KILLED (kill $KILLS) after $(secs "$ran") s during $phase, at step $(last_step "$DIR") of the metrics"
            sed 's/^/    | /' "$err" >>"$LOG"
            cmd=(train --resume "$DIR" --quiet)
            continue
        fi
        log "$what: exit $rc after $(secs "$ran") s"
        sed 's/^/    | /' "$err" >>"$LOG"
        if [[ "$rc" == 0 ]]; then
            finished=1
            break
        fi
        if [[ "${cmd[1]}" == --resume && ! -e "$DIR/checkpoint" && ! -e "$DIR/checkpoint.old" ]]; then
            if ((max_ck > 0)); then
                fail "process $PROCS: the run had a checkpoint, now it has none (lost); its stderr:"
                sed 's/^/      /' "$err" | tee -a "$LOG"
                break
            fi
            FALLBACKS=$((FALLBACKS + 1))
            log "  --resume refused a run killed before its first checkpoint: running the original command again"
            cmd=(train --config "$CFG" --out "$DIR" --quiet)
            continue
        fi
        fail "process $PROCS (elbo ${cmd[*]}) exited with $rc; its stderr:"
        sed 's/^/      /' "$err" | tee -a "$LOG"
        break
    done
    if [[ "$finished" == 1 ]]; then
        say "round $ROUND finished after $KILLS kills in all; comparing with the uninterrupted run"
        before=$FAILURES
        check_run "$DIR"
        ((FAILURES > before)) || say "  round $ROUND: identical to the uninterrupted run"
    fi
    if ((FAILURES > 0 || KILLS >= CYCLES)); then
        break
    fi
done

# ---- summary ---------------------------------------------------------------------------------
TOTAL_US=$(($(now_us) - T0))
say ""
say "summary: $KILLS kills landed (of $CYCLES asked) over $PROCS processes in $ROUND rounds, seed $SEED"
for phase in "${!PHASES[@]}"; do
    printf '  %3d  %s\n' "${PHASES[$phase]}" "$phase"
done | sort -k2 | tee -a "$LOG"
say "  resumes that fell back to a fresh start (no checkpoint yet): $FALLBACKS"
say "  warnings: $WARNINGS, failures: $FAILURES"
if ((FAILURES == 0 && KILLS >= CYCLES)); then
    RESULT=PASS
fi
say "total time $(secs "$TOTAL_US") s (reference run $(secs "$REF_US") s): $RESULT"
[[ "$RESULT" == PASS ]]
