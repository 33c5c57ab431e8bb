"""Benchmark: dcsupervisor against the published Python runner, draining a queue.

For each runner, in one run: a fresh `dccontrol serve` (release build) on
loopback gets N `noop` executions queued at once, then the runner starts and
drains them (4 at a time for both). Measured:

* drain time: first `start` to last `complete`, and executions per second;
* start→complete per execution, p50 and p95;
  (both from dccontrol's `started_at`/`completed_at`, the times it handled
  the runner's `start` and `complete` requests)
* the runner process's resident memory (VmRSS) right after the drain; for
  dcsupervisor its own process only, the Python worker is reported apart;
* idle CPU: utime+stime from /proc/<pid>/stat across `--idle` seconds (30)
  with nothing queued, as a percentage of one core;
* where the CPU goes during the drain, per execution: the command processes
  (cutime+cstime of whoever reaps them), the runner, dcsupervisor's worker
  and dccontrol. All share this machine's CPUs, so their sum bounds the
  drain rate; a sampler thread takes the start-up share (Django set-up,
  discovery) out.

Prints a Markdown table and writes it into docs/benchmarks.md between
`<!-- runner:start -->` and `<!-- runner:end -->`. Run it with
`bash bench/runner.sh` (it builds the release binaries first).
"""

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The set-up shared with the conformance test (tests/python/harness.py): both
# must start dccontrol and the two runners the same way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import harness

ROOT = harness.ROOT
DCCONTROL = harness.target_binary("dccontrol", "release")
DCSUPERVISOR = harness.target_binary("dcsupervisor", "release")
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- runner:start -->"
END_MARK = "<!-- runner:end -->"

API_KEY = "dc_benchmark_key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTUP_LIMIT = 120  # seconds for the first heartbeat
REQUEST_TIMEOUT = 30  # seconds for one call to dccontrol's operator API

# What the project aims for (README / task); the table marks each figure.
TARGETS = {
    "p50_ms": 15.0,  # start→complete p50 at most
    "rate": 100.0,  # executions per second at least
    "rss_mb": 10.0,  # supervisor process at most
    "idle_cpu": 0.05,  # percent of a core at most
}


# --- processes -------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list, merged)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of the process (all its threads, living or gone), or with
    `reaped_children` cutime + cstime: the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    first = 13 if reaped_children else 11
    return (int(fields[first]) + int(fields[first + 1])) / CLOCK_TICKS


# --- the runners -----------------------------------------------------------


def ensure_published_venv() -> None:
    """target/published-runner-venv with Django and the published runner, made once."""
    if harness.has_published_runner():
        return
    print(f"creating {harness.PUBLISHED_VENV}", file=sys.stderr)
    harness.install_published_runner()


def start_published(url: str, workdir: Path) -> subprocess.Popen:
    """`manage.py djangocommand start`; its own process is the one measured."""
    return harness.start_published_runner(
        url,
        workdir,
        api_key=API_KEY,
        settings_module="bench_settings",
        written_by="bench/runner.py",
    )


def start_dcsupervisor(url: str, workdir: Path) -> subprocess.Popen:
    """dcsupervisor with the demo allowlist and the defaults the task fixes."""
    config = harness.demo_config(
        url,
        workdir,
        api_key=API_KEY,
        python=PROJECT_PYTHON,
        tail=(
            "\n[runner]\n"
            "# The defaults, written out: the published runner's rhythm and concurrency.\n"
            "poll_interval = 2.0\n"
            "max_concurrent = 4\n"
        ),
    )
    return harness.start_supervisor(DCSUPERVISOR, workdir, config)


@dataclass(frozen=True)
class Runner:
    name: str
    start: Callable[[str, Path], subprocess.Popen]
    has_worker: bool  # a Python worker as its one child (dcsupervisor)


RUNNERS = (
    Runner(
        f"published runner {harness.PUBLISHED_VERSION}",
        start_published,
        has_worker=False,
    ),
    Runner("dcsupervisor", start_dcsupervisor, has_worker=True),
)


# --- one measurement -------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far by the processes of one run."""

    runner: float  # dcsupervisor itself, or the published runner
    worker: float | None  # dcsupervisor's Python worker (fork parent)
    commands: float  # command processes, reaped by the worker or the runner
    dccontrol: float  # the control plane: same machine, same CPUs

    def __sub__(self, other: "CpuTimes") -> "CpuTimes":
        worker = None if self.worker is None else self.worker - (other.worker or 0.0)
        return CpuTimes(
            self.runner - other.runner,
            worker,
            self.commands - other.commands,
            self.dccontrol - other.dccontrol,
        )


def read_cpu(runner_pid: int, worker_pid: int | None, dccontrol_pid: int) -> CpuTimes:
    # Commands are children of whoever forks them, the worker or the
    # published runner itself: their CPU lands in its cutime + cstime.
    reaper = worker_pid or runner_pid
    return CpuTimes(
        runner=cpu_seconds(runner_pid),
        worker=None if worker_pid is None else cpu_seconds(worker_pid),
        commands=cpu_seconds(reaper, reaped_children=True),
        dccontrol=cpu_seconds(dccontrol_pid),
    )


class CpuSampler(threading.Thread):
    """Samples CPU times while the runner starts and drains, so that the
    drain's share can be told from start-up (Django set-up, discovery)."""

    INTERVAL = 0.02  # seconds; /proc counts in 10 ms ticks anyway

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read = read
        self.samples: list[tuple[float, CpuTimes]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.INTERVAL):
            with contextlib.suppress(OSError, ValueError):  # a process not there (yet)
                self.samples.append((time.time(), self.read()))

    def stop(self) -> None:
        self.done.set()
        self.join()

    def before(self, moment: float) -> CpuTimes:
        """The last sample taken before `moment` (unix time)."""
        earlier = [times for taken, times in self.samples if taken < moment]
        if not earlier:
            raise RuntimeError("no CPU sample before the first execution started")
        return earlier[-1]


@dataclass
class Result:
    runner: str
    executions: list[dict]  # dccontrol's view, after the drain
    rss_kib: int  # the runner process, right after the drain
    worker_rss_kib: int | None
    drain_cpu: CpuTimes  # from the first start to the last complete
    idle_cpu_percent: float = 0.0
    idle_ticks: int = 0
    refused: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.executions)

    @property
    def first_start(self) -> float:
        return min(e["started_at"] for e in self.executions)

    @property
    def drain_s(self) -> float:
        return max(e["completed_at"] for e in self.executions) - self.first_start

    @property
    def rate(self) -> float:
        return self.count / self.drain_s

    def latency_ms(self, percent: int) -> float:
        latencies = [
            1000 * (e["completed_at"] - e["started_at"]) for e in self.executions
        ]
        return statistics.quantiles(latencies, n=100, method="inclusive")[percent - 1]

    def per_execution_ms(self, cpu_s: float | None) -> str:
        return "—" if cpu_s is None else f"{1000 * cpu_s / self.count:.1f} ms"


def bench(runner: Runner, count: int, idle: float, workdir: Path) -> Result:
    """Queues `count` noops, starts the runner, measures the drain and the idle."""
    plane = harness.ControlPlane(
        workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=REQUEST_TIMEOUT
    )
    process = sampler = None
    try:
        for _ in range(count):
            plane.queue("noop", "")
        print(f"{runner.name}: {count} executions queued; starting it", file=sys.stderr)
        process = runner.start(plane.url, workdir)
        sampler = CpuSampler(
            lambda: read_cpu(
                process.pid, worker_pid(runner, process), plane.process.pid
            )
        )
        sampler.start()
        limit = STARTUP_LIMIT + count * 5  # the published runner needs ~2 s per 4
        executions = harness.wait_for(
            lambda: drained(plane, process), limit, "the queue to drain", 0.5
        )
        at_end = read_cpu(process.pid, worker_pid(runner, process), plane.process.pid)
        sampler.stop()
        worker = worker_pid(runner, process)
        result = Result(
            runner.name,
            executions,
            rss_kib(process.pid),
            None if worker is None else rss_kib(worker),
            drain_cpu=at_end - sampler.before(min(e["started_at"] for e in executions)),
        )
        print(f"{runner.name}: drained; measuring {idle:g} s of idle", file=sys.stderr)
        result.idle_cpu_percent, result.idle_ticks = idle_cpu_percent(process.pid, idle)
        result.refused = refused_requests(plane.requests())
        return result
    except BaseException:
        print(
            f"{runner.name}: failed; its logs:\n{harness.read_logs(workdir, tail=5000)}",
            file=sys.stderr,
        )
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if process is not None:
            harness.stop_process(process)
        plane.close()


def worker_pid(runner: Runner, process: subprocess.Popen) -> int | None:
    if not runner.has_worker:
        return None
    found = children(process.pid)
    return found[0] if found else None


def drained(plane: harness.ControlPlane, runner: subprocess.Popen) -> list[dict] | None:
    if runner.poll() is not None:
        raise RuntimeError(f"the runner exited with status {runner.returncode}")
    executions = plane.executions()
    return (
        executions if all(e["completed_at"] is not None for e in executions) else None
    )


def idle_cpu_percent(pid: int, seconds: float) -> tuple[float, int]:
    """CPU used by `pid` over `seconds` of idling, as % of one core, and in clock ticks."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
    return 100 * used / elapsed, round(used * CLOCK_TICKS)


def refused_requests(requests: list[dict]) -> list[str]:
    """Requests the control plane refused (e.g. starting an execution twice)."""
    refused: dict[tuple[str, int], int] = {}
    for request in requests:
        if request["status"] != 200:
            key = (request["path"].rstrip("/").rsplit("/", 1)[-1], request["status"])
            refused[key] = refused.get(key, 0) + 1
    return [
        f"{n} `{kind}` requests answered {status}"
        for (kind, status), n in sorted(refused.items())
    ]


# --- the report ------------------------------------------------------------


def megabytes(kib: int) -> float:
    """VmRSS counts KiB; the target is in MB (10^6 bytes)."""
    return kib * 1024 / 1e6


def mark(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return "✅" if met else "❌"


def table(results: list[Result]) -> str:
    t = TARGETS

    def p50(r: Result) -> str:
        return f"{r.latency_ms(50):.1f} ms {mark(r.latency_ms(50), t['p50_ms'], True)}"

    def rss(r: Result) -> str:
        mb = megabytes(r.rss_kib)
        return f"{mb:.1f} MB {mark(mb, t['rss_mb'], True)}"

    def worker_rss(r: Result) -> str:
        return (
            "—" if r.worker_rss_kib is None else f"{megabytes(r.worker_rss_kib):.1f} MB"
        )

    def idle_cpu(r: Result) -> str:
        met = mark(r.idle_cpu_percent, t["idle_cpu"], True)
        return f"{r.idle_cpu_percent:.3f} % ({r.idle_ticks} ticks) {met}"

    rows = [
        ("executions drained", "", lambda r: f"{r.count}"),
        (
            "drain time (first start → last complete)",
            "",
            lambda r: f"{r.drain_s:.2f} s",
        ),
        (
            "drain rate",
            f"≥ {t['rate']:g}/s",
            lambda r: f"{r.rate:.1f}/s {mark(r.rate, t['rate'], False)}",
        ),
        ("start→complete p50", f"≤ {t['p50_ms']:g} ms", p50),
        ("start→complete p95", "", lambda r: f"{r.latency_ms(95):.1f} ms"),
        ("runner process RSS after the drain", f"≤ {t['rss_mb']:g} MB", rss),
        ("+ Python worker RSS (fork parent)", "", worker_rss),
        ("idle CPU, runner process", f"≤ {t['idle_cpu']:g} %", idle_cpu),
        # CPU from the first start to the last complete, per execution: where it goes.
        (
            "CPU per execution: the command's process",
            "",
            lambda r: r.per_execution_ms(r.drain_cpu.commands),
        ),
        (
            "CPU per execution: runner process",
            "",
            lambda r: r.per_execution_ms(r.drain_cpu.runner),
        ),
        (
            "CPU per execution: Python worker",
            "",
            lambda r: r.per_execution_ms(r.drain_cpu.worker),
        ),
        (
            "CPU per execution: dccontrol",
            "",
            lambda r: r.per_execution_ms(r.drain_cpu.dccontrol),
        ),
    ]
    lines = [
        "| metric | target | " + " | ".join(r.runner for r in results) + " |",
        "|---|---|" + "---:|" * len(results),
    ]
    lines += [
        f"| {label} | {target} | " + " | ".join(cell(r) for r in results) + " |"
        for label, target, cell in rows
    ]
    return "\n".join(lines)


def cpu_bound(result: Result) -> str:
    """What the CPU used per execution allows on this machine: the drain's ceiling."""
    cpu = result.drain_cpu
    total = cpu.runner + (cpu.worker or 0.0) + cpu.commands + cpu.dccontrol
    per_execution = total / result.count
    cpus = os.cpu_count() or 1
    return (
        f"{result.runner}: {1000 * per_execution:.1f} ms of CPU per execution, all processes "
        f"together (dccontrol included); with {cpus} CPUs that caps the drain near "
        f"{cpus / per_execution:.0f}/s."
    )


def commit() -> str:
    """The short hash of HEAD, or "unknown"."""
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return found or "unknown"


def machine() -> str:
    """One line naming the machine and the versions measured (shared by bench/output.py)."""
    probe = "import django, platform; print(platform.python_version(), django.get_version())"
    versions = subprocess.run(
        [str(PROJECT_PYTHON), "-c", probe], check=True, capture_output=True, text=True
    )
    python_version, django_version = versions.stdout.split()
    return (
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {python_version}, "
        f"Django {django_version}; demo project (examples/demo)."
    )


def environment(count: int, idle: float) -> str:
    return (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} at commit {commit()} "
        f"with `bash bench/runner.sh`: {count} `noop` executions queued before the runner starts, "
        f"4 at a time, against `dccontrol` (release) on loopback; idle CPU over {idle:g} s "
        f"(one clock tick is {100 / CLOCK_TICKS / idle:.3f} % at this length).\n\n"
        f"{machine()}"
    )


def report(results: list[Result], count: int, idle: float) -> str:
    block = environment(count, idle) + "\n\n" + table(results)
    block += "\n\n" + "\n".join(f"- {cpu_bound(r)}" for r in results)
    refused = [f"- {r.runner}: {note}" for r in results for note in r.refused]
    if refused:
        block += "\n\nRequests dccontrol refused during the run:\n\n" + "\n".join(
            refused
        )
    return block


def write_marked_section(
    doc: Path, start: str, end: str, heading: str, block: str
) -> None:
    """Puts `block` between `start` and `end` in `doc`, adding them (under
    `heading`) at the end if missing; the rest of the file stays as it is."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start not in text or end not in text:
        section = f"\n## {heading}\n\n"
        text = text.rstrip("\n") + "\n" + section + f"{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n\n{block}\n\n{end}{tail}")


def write_doc(block: str) -> None:
    """Puts `block` between the runner markers."""
    write_marked_section(
        DOC,
        START_MARK,
        END_MARK,
        "Runner: dcsupervisor vs the published Python runner",
        block,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--executions", type=int, default=200, help="noops to queue (default 200)"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=30.0,
        help="seconds of idle CPU measurement (default 30)",
    )
    parser.add_argument(
        "--no-doc", action="store_true", help=f"print only, leave {DOC.name} alone"
    )
    options = parser.parse_args()
    for binary in (DCCONTROL, DCSUPERVISOR):
        if not binary.exists():
            sys.exit(
                f"{binary} missing: run `cargo build --release` (bench/runner.sh does)"
            )
    ensure_published_venv()
    results = []
    for runner in RUNNERS:
        with tempfile.TemporaryDirectory(prefix="dc-bench-") as workdir:
            results.append(
                bench(runner, options.executions, options.idle, Path(workdir))
            )
    block = report(results, options.executions, options.idle)
    print(block)
    if not options.no_doc:
        write_doc(block)
        print(f"updated {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
