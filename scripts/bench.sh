#!/usr/bin/env bash
# The one reproducible command: every benchmark, then the redeem plot
# (docs/redeem-vs-size.svg) and the Markdown tables for BENCHMARKS.md.
# Arguments go to `cargo bench`, e.g. `scripts/bench.sh --bench refresh`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench "$@"
python3 scripts/plot.py
