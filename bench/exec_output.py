"""Large output through `dcsupervisor exec` vs `python manage.py`.

Issue 9 measured `dumpdata --indent 2` of 3.9 MB at 2-2.5x manage.py's time
through `exec`; the target is at most 1.1x, to a file and to a pipe. This
fills examples/fidelity's database with enough notes (and their reversion
revisions) for a dump of about that size, then times the same command both
ways, alternating, and prints the medians side by side with their ratio.

    .venv/bin/python bench/exec_output.py [--notes 6000] [--runs 5]

Uses target/release/dcsupervisor when it exists, else the debug build (the
output path has no copy in it either way: exec passes its own descriptors to
the command). Figures go to docs/benchmarks.md by hand.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "examples" / "fidelity"
PYTHON = Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv/bin/python")
COMMAND = ["dumpdata", "--indent", "2"]


def binary() -> Path:
    release = ROOT / "target" / "release" / "dcsupervisor"
    return release if release.exists() else ROOT / "target" / "debug" / "dcsupervisor"


def env() -> dict[str, str]:
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DJANGO_"))
    }
    return keep | {"LANG": "C.UTF-8"}


def fill_database(directory: Path, notes: int) -> None:
    manage = [str(PYTHON), str(PROJECT / "manage.py")]
    subprocess.run(
        [*manage, "migrate", "-v", "0"], cwd=directory, env=env(), check=True
    )
    code = (
        "import reversion\n"
        "from notes.models import Note\n"
        f"for i in range({notes}):\n"
        "    with reversion.create_revision():\n"
        "        Note.objects.create(title=f'note {i}', body='lorem ipsum ' * 8)\n"
    )
    subprocess.run(
        [*manage, "shell", "-c", code],
        cwd=directory,
        env=env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def timed(argv: list[str], directory: Path, to_file: bool) -> tuple[float, int]:
    """Seconds to run `argv` with stdout to a file or a pipe; bytes written."""
    start = time.perf_counter()
    if to_file:
        with (directory / "out.json").open("wb") as out:
            subprocess.run(argv, cwd=directory, env=env(), stdout=out, check=True)
        size = (directory / "out.json").stat().st_size
    else:
        done = subprocess.run(
            argv, cwd=directory, env=env(), stdout=subprocess.PIPE, check=True
        )
        size = len(done.stdout)
    return time.perf_counter() - start, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes", type=int, default=6000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dcsupervisor-bench-"))
    try:
        fill_database(work, options.notes)
        config = work / "dc.toml"
        config.write_text(
            f"[django]\nproject_dir = {json.dumps(str(PROJECT))}\n"
            'settings_module = "fidelity_site.settings"\n'
            f"python = {json.dumps(str(PYTHON))}\n"
        )
        ways = {
            "python manage.py": [str(PYTHON), str(PROJECT / "manage.py"), *COMMAND],
            "dcsupervisor exec": [
                str(binary()),
                "--config",
                str(config),
                "exec",
                *COMMAND,
            ],
        }
        print(
            f"binary: {binary().relative_to(ROOT)}; {options.runs} runs each, alternating"
        )
        print(
            f"| {' '.join(COMMAND)} | MB | manage.py s (median) | exec s (median) | exec / manage.py |"
        )
        print("|---|---:|---:|---:|---:|")
        for to_file in (True, False):
            times: dict[str, list[float]] = {way: [] for way in ways}
            size = 0
            for _ in range(options.runs):
                for way, argv in ways.items():
                    seconds, size = timed(argv, work, to_file)
                    times[way].append(seconds)
            reference, ours = (statistics.median(t) for t in times.values())
            target = "to a file" if to_file else "to a pipe"
            print(
                f"| {target} | {size / 1e6:.1f} | {reference:.2f} | {ours:.2f} | {ours / reference:.2f}× |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
