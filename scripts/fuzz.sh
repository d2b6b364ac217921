#!/usr/bin/env bash
# Run one fuzz target (or `all`, one after the other) for SECONDS each, on
# the stable toolchain, and print libFuzzer's execution count and coverage
# (FUZZING.md records a campaign's numbers).
#
#   scripts/fuzz.sh TARGET SECONDS    e.g. scripts/fuzz.sh token_form 600
#   scripts/fuzz.sh all SECONDS
#   scripts/fuzz.sh TARGET|all cmin
#
# The committed seed corpus fuzz/corpus/TARGET is read, never written: new
# inputs go to fuzz/work/TARGET (ignored by git), crashes to
# fuzz/artifacts/TARGET. `cmin` merges both and minimizes them with
# `cargo fuzz cmin` into fuzz/corpus/TARGET, the corpus worth committing
# (inputs named regression-* are kept whatever coverage they add).
#
# cargo-fuzz wants nightly for the sanitizer flags; with the sanitizer off
# (`-s none`) stable builds it once RUSTC_BOOTSTRAP lets it pass -Z flags.
# Runs at nice 19 (FUZZ_NICE overrides): the fuzzer takes a whole core.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ] || ! [[ $2 =~ ^([0-9]+|cmin)$ ]]; then
    echo "usage: $0 TARGET|all SECONDS|cmin" >&2
    exit 2
fi
target=$1
seconds=$2

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=$(cd fuzz && cargo fuzz list)
if [ "$target" = all ]; then
    run=$targets
elif grep -qx "$target" <<<"$targets"; then
    run=$target
else
    echo "no fuzz target $target; there are:" $targets >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
if [ "$seconds" = cmin ]; then
    for t in $run; do
        mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
        cp -n "fuzz/corpus/$t"/* "fuzz/work/$t"/ 2>/dev/null || true
        # A set-cover merge on edges alone (no hit counts) keeps the
        # inputs that reach every edge reached, in far fewer files than
        # cmin's default merge on all features: a corpus small enough to
        # commit (policy_toml: 313 files instead of 1,671).
        nice -n "${FUZZ_NICE:-19}" cargo fuzz cmin -s none "$t" "fuzz/work/$t" \
            -- -set_cover_merge=1 -use_counters=0 >"fuzz/work/$t.cmin.log" 2>&1
        keep=$(mktemp -d)
        cp "fuzz/corpus/$t"/regression-* "$keep"/ 2>/dev/null || true
        rm -rf "fuzz/corpus/$t"
        cp -r "fuzz/work/$t" "fuzz/corpus/$t"
        cp "$keep"/* "fuzz/corpus/$t"/ 2>/dev/null || true
        rm -rf "$keep"
        echo "$t: $(ls "fuzz/corpus/$t" | wc -l) files, $(du -sb "fuzz/corpus/$t" | cut -f1) bytes"
    done
    exit 0
fi
status=0
for t in $run; do
    mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
    log="fuzz/work/$t.log"
    echo "== $t: ${seconds}s" >&2
    # `cargo fuzz run` runs from fuzz/'s parent; the corpus paths are
    # relative to it.
    if ! nice -n "${FUZZ_NICE:-19}" cargo fuzz run -s none "$t" \
        "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        status=1
        echo "$t: FAILED, see $log and fuzz/artifacts/$t" >&2
        tail -n 40 "$log" >&2
    fi
    # The last status line (`#N DONE cov: .. ft: .. corp: ..`) and the
    # execution count.
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
    grep -E '^Done [0-9]+ runs' "$log" || true
    grep -E '^stat::number_of_executed_units' "$log" || true
done
exit $status
