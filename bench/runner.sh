#!/usr/bin/env bash
# Benchmarks dcsupervisor against the published Python runner (bench/runner.py):
# both drain the same queue of `noop` executions from a local dccontrol; the
# table goes to stdout and into docs/benchmarks.md between the runner markers.
# Options pass through (e.g. --executions 50 --idle 10 --no-doc for a quick look).
# Needs network access once, to create target/published-runner-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/venv
cargo build --release --bins
exec .venv/bin/python bench/runner.py "$@"
