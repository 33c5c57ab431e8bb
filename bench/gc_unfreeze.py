"""What `gc.unfreeze()` in a forked job costs.

The worker keeps its preloaded heap in the collector's permanent generation
(`gc.freeze()`) so forks share its pages; a job calls `gc.unfreeze()` when
it first walks the heap (`gc.get_objects()`, `gc.get_referrers()`), so it
sees the whole heap as in a fresh interpreter (docs/fidelity.md). This sets
Django up on examples/fidelity as the worker does, then forks jobs that each
run a full collection, with and without the unfreeze, and prints per job:
the unfreeze itself, the first full collection, and the page faults taken
(pages copied from the worker).

    .venv/bin/python bench/gc_unfreeze.py [--jobs 30]
"""

import argparse
import gc
import os
import resource
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "examples" / "fidelity"


def set_up_like_the_worker() -> None:
    sys.path.insert(0, str(PROJECT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "fidelity_site.settings"
    import django
    from django.core import checks
    from django.core.management import get_commands, load_command_class

    django.setup()
    for name, app in get_commands().items():
        try:
            load_command_class(app, name).create_parser("manage.py", name)
        except Exception:  # noqa: BLE001,S112 - as the worker's warm-up
            continue
    checks.run_checks()
    gc.freeze()


def job(unfreeze: bool) -> tuple[float, float, int]:
    """Forks one job; its (unfreeze ms, first full collection ms, minor faults)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        if unfreeze:
            gc.unfreeze()
        unfrozen = time.perf_counter()
        gc.collect()
        collected = time.perf_counter()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        os.write(
            write,
            struct.pack(
                "<ddq", (unfrozen - start) * 1e3, (collected - unfrozen) * 1e3, faults
            ),
        )
        os._exit(0)
    os.close(write)
    data = os.read(read, 24)
    os.close(read)
    os.waitpid(pid, 0)
    return struct.unpack("<ddq", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    options = parser.parse_args()
    set_up_like_the_worker()
    print(f"heap objects frozen in the worker: {gc.get_freeze_count()}")
    print("| job | unfreeze ms | first gc.collect() ms | page faults |")
    print("|---|---:|---:|---:|")
    for unfreeze in (False, True):
        runs = [job(unfreeze) for _ in range(options.jobs)]
        medians = [statistics.median(r[i] for r in runs) for i in range(3)]
        label = (
            "walks the heap (gc.unfreeze())"
            if unfreeze
            else "never walks the heap (stays frozen)"
        )
        print(f"| {label} | {medians[0]:.2f} | {medians[1]:.1f} | {medians[2]:.0f} |")


if __name__ == "__main__":
    main()
