#!/usr/bin/env bash
# Mutation testing of the decision core: every mutant cargo-mutants makes of
# src/decision.rs and src/code.rs must make a test fail. Not in CI: about
# half an hour on 2 cores. Runs the library's unit tests and the behaviour
# suites that exercise the decision (decisions, pkce, events, model, races);
# the server and store suites add minutes per mutant and test neither file.
# Arguments go to cargo-mutants (e.g. `--list`, `-j 2`, `--re grace`).
# Results: mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-mutants >/dev/null; then
  cargo install --locked cargo-mutants
fi
# cargo-mutants exits 2 when a mutant is missed, 3 on a timeout: report
# the counts either way, then pass its status on.
status=0
cargo mutants \
  --file src/decision.rs --file src/code.rs \
  --all-features \
  --timeout 300 \
  "$@" \
  -- --lib --test decisions --test pkce --test events --test model --test races \
  || status=$?
count() { if [ -f "mutants.out/$1.txt" ]; then wc -l < "mutants.out/$1.txt"; else echo 0; fi; }
echo "mutants: $(count caught) caught, $(count missed) missed, $(count timeout) timed out," \
  "$(count unviable) unviable (mutants.out/missed.txt lists the misses)"
exit "$status"
