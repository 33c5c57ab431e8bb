#!/usr/bin/env bash
# Benchmarks output delivery (bench/output.py): line latency for sparse output,
# a flood, and 100 MB end to end, dcsupervisor and the published Python runner
# side by side; the table goes to stdout and into docs/benchmarks.md between
# the output markers. Options pass through (e.g. --only dcsupervisor --no-doc).
# Needs network access once, to create target/published-runner-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/venv
cargo build --release --bins
exec .venv/bin/python bench/output.py "$@"
