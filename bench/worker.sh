#!/usr/bin/env bash
# Runs the preloaded-worker benchmark (benches/worker_overhead.rs, release
# profile) and records its output in docs/benchmarks.md between the
# worker-overhead markers, leaving the rest of the file as it is.
# Knobs (passed through to the bench): BENCH_RUNS, BENCH_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

doc=docs/benchmarks.md
start='<!-- worker-overhead:start -->'
end='<!-- worker-overhead:end -->'

output=$(mktemp)
block=$(mktemp)
trap 'rm -f "$output" "$block"' EXIT

# Bench first: if it fails, the doc is left untouched. Progress goes to
# stderr; the tables (stdout) are shown and kept.
cargo bench --bench worker_overhead | tee "$output"

if [ ! -f "$doc" ]; then
    mkdir -p "$(dirname "$doc")"
    cat >"$doc" <<DOC
# Benchmarks

Figures measured on one machine; rerun the named script to refresh a section.
Compare rows within a section rather than across machines.

## Preloaded worker vs \`python manage.py\`

$start
$end
DOC
fi
has_start=$(grep -cFx -- "$start" "$doc" || true)
has_end=$(grep -cFx -- "$end" "$doc" || true)
if [ "$has_start" = 0 ] && [ "$has_end" = 0 ]; then
    printf '\n## Preloaded worker vs `python manage.py`\n\n%s\n%s\n' "$start" "$end" >>"$doc"
elif [ "$has_start" != 1 ] || [ "$has_end" != 1 ]; then
    echo "$doc: expected exactly one '$start' and one '$end' line" >&2
    exit 1
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    echo
    echo "Measured $(date -u +%Y-%m-%d) at commit $commit with \`bash bench/worker.sh\`."
    echo
    cat "$output"
    echo
} >"$block"

# Replace whatever lies between the markers with the new block.
awk -v start="$start" -v end="$end" -v block="$block" '
    $0 == start { print; while ((getline line < block) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }
' "$doc" >"$doc.tmp"
mv "$doc.tmp" "$doc"
echo "updated $doc" >&2
