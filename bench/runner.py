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
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "examples" / "demo"
DCCONTROL = ROOT / "target" / "release" / "dccontrol"
DCSUPERVISOR = ROOT / "target" / "release" / "dcsupervisor"
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
PUBLISHED_VENV = ROOT / "target" / "published-runner-venv"
PUBLISHED_PYTHON = PUBLISHED_VENV / "bin" / "python"
PUBLISHED_VERSION = "0.1.0"
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- runner:start -->"
END_MARK = "<!-- runner:end -->"

API_KEY = "dc_benchmark_key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTUP_LIMIT = 120  # seconds for the first heartbeat
STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL

# What the project aims for (README / task); the table marks each figure.
TARGETS = {
    "p50_ms": 15.0,  # start→complete p50 at most
    "rate": 100.0,  # executions per second at least
    "rss_mb": 10.0,  # supervisor process at most
    "idle_cpu": 0.05,  # percent of a core at most
}


# --- processes -------------------------------------------------------------


def start_process(argv, log_path: Path, **kwargs) -> subprocess.Popen:
    """Starts `argv` in its own session, so stopping it takes its children too."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=kwargs.pop("stdout", log),
            stderr=log,
            start_new_session=True,
            **kwargs,
        )


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL to what is left of it."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    signal_group(process, signal.SIGKILL)
    process.wait()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


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


# --- the control plane -----------------------------------------------------


class ControlPlane:
    """A `dccontrol serve` on a free loopback port, and its operator API."""

    def __init__(self, workdir: Path):
        self.process = start_process(
            [str(DCCONTROL), "serve", "--listen", "127.0.0.1:0", "--api-key", API_KEY],
            workdir / "dccontrol.log",
            stdout=subprocess.PIPE,
        )
        line = self.process.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"dccontrol did not announce its address: {line!r}")
        self.url = line.removeprefix("listening on ").strip()

    def close(self) -> None:
        stop_process(self.process)
        self.process.stdout.close()

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {API_KEY}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def executions(self) -> list[dict]:
        return self.call("GET", "/api/operator/executions")["executions"]

    def requests(self) -> list[dict]:
        return self.call("GET", "/api/operator/requests")["requests"]


def wait_for(predicate, limit: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {limit} s waiting for {what}")
        time.sleep(interval)
    return value


# --- the runners -----------------------------------------------------------


def demo_allowlist_additions() -> list[str]:
    """The demo's `[policy] add_allowed_commands` (dc.toml), for both runners."""
    text = (DEMO_DIR / "dc.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough for a regex
        block = re.search(r"add_allowed_commands\s*=\s*\[(.*?)\]", text, re.DOTALL)
        return re.findall(r'"([^"]+)"', block.group(1))
    return tomllib.loads(text)["policy"]["add_allowed_commands"]


def ensure_published_venv() -> None:
    """target/published-runner-venv with Django and the published runner, made once."""
    probe = "import django, djangocommand; print(djangocommand.__version__)"
    if PUBLISHED_PYTHON.exists():
        found = subprocess.run(
            [str(PUBLISHED_PYTHON), "-c", probe],
            check=False,
            capture_output=True,
            text=True,
        )
        if found.stdout.strip() == PUBLISHED_VERSION:
            return
    print(f"creating {PUBLISHED_VENV}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PUBLISHED_VENV)], check=True)
    pip = [
        str(PUBLISHED_PYTHON),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    subprocess.run(
        pip + ["django", f"djangocommand-runner=={PUBLISHED_VERSION}"], check=True
    )


def start_published(url: str, workdir: Path) -> subprocess.Popen:
    """`manage.py djangocommand start`; its own process is the one measured."""
    additions = tuple(demo_allowlist_additions())
    (workdir / "bench_settings.py").write_text(
        "# Written by bench/runner.py: the demo settings plus the published runner.\n"
        "from demo_project.settings import *  # noqa: F403\n"
        "from djangocommand import DEFAULT_ALLOWED_COMMANDS\n\n"
        'INSTALLED_APPS = INSTALLED_APPS + ["djangocommand"]  # noqa: F405\n'
        "DEBUG = False  # no autoreloader: one runner process\n"
        f"DJANGOCOMMAND_API_KEY = {API_KEY!r}\n"
        f"DJANGOCOMMAND_SERVER_URL = {url!r}\n"
        f"DJANGOCOMMAND_ALLOWED_COMMANDS = DEFAULT_ALLOWED_COMMANDS + {additions!r}\n"
    )
    env = dict(
        os.environ, PYTHONPATH=str(workdir), DEMO_DB_PATH=str(workdir / "db.sqlite3")
    )
    env["TMPDIR"] = str(workdir)  # its PID file goes there: no clash with other runs
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # Django's own options go before the subcommand: `start` refuses them.
    argv = [
        str(PUBLISHED_PYTHON),
        "manage.py",
        "djangocommand",
        "--settings",
        "bench_settings",
        "start",
    ]
    return start_process(argv, workdir / "runner.log", cwd=DEMO_DIR, env=env)


def start_dcsupervisor(url: str, workdir: Path) -> subprocess.Popen:
    """dcsupervisor with the demo allowlist and the defaults the task fixes."""
    config = f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}

[django]
project_dir = {json.dumps(str(DEMO_DIR))}
settings_module = "demo_project.settings"
python = {json.dumps(str(PROJECT_PYTHON))}
env = {{ DEMO_DB_PATH = {json.dumps(str(workdir / "db.sqlite3"))} }}

[policy]
add_allowed_commands = {json.dumps(demo_allowlist_additions())}

[runner]
# The defaults, written out: the published runner's rhythm and concurrency.
poll_interval = 2.0
max_concurrent = 4
"""
    (workdir / "dc.toml").write_text(config)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DCSUPERVISOR_", "DJANGOCOMMAND_"))
    }
    env["NO_COLOR"] = "1"
    argv = [str(DCSUPERVISOR), "--config", str(workdir / "dc.toml")]
    return start_process(argv, workdir / "runner.log", env=env)


@dataclass(frozen=True)
class Runner:
    name: str
    start: Callable[[str, Path], subprocess.Popen]
    has_worker: bool  # a Python worker as its one child (dcsupervisor)


RUNNERS = (
    Runner(f"published runner {PUBLISHED_VERSION}", start_published, has_worker=False),
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
    plane = ControlPlane(workdir)
    process = sampler = None
    try:
        for _ in range(count):
            plane.call(
                "POST", "/api/operator/executions", {"command": "noop", "args": ""}
            )
        print(f"{runner.name}: {count} executions queued; starting it", file=sys.stderr)
        process = runner.start(plane.url, workdir)
        sampler = CpuSampler(
            lambda: read_cpu(
                process.pid, worker_pid(runner, process), plane.process.pid
            )
        )
        sampler.start()
        limit = STARTUP_LIMIT + count * 5  # the published runner needs ~2 s per 4
        executions = wait_for(
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
            f"{runner.name}: failed; its logs:\n{read_logs(workdir)}", file=sys.stderr
        )
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if process is not None:
            stop_process(process)
        plane.close()


def worker_pid(runner: Runner, process: subprocess.Popen) -> int | None:
    if not runner.has_worker:
        return None
    found = children(process.pid)
    return found[0] if found else None


def drained(plane: ControlPlane, runner: subprocess.Popen) -> list[dict] | None:
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


def read_logs(workdir: Path) -> str:
    return "".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-5000:]}"
        for p in sorted(workdir.glob("*.log"))
    )


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


def environment(count: int, idle: float) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    probe = "import django, platform; print(platform.python_version(), django.get_version())"
    versions = subprocess.run(
        [str(PROJECT_PYTHON), "-c", probe], check=True, capture_output=True, text=True
    )
    python_version, django_version = versions.stdout.split()
    return (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} at commit {commit or 'unknown'} "
        f"with `bash bench/runner.sh`: {count} `noop` executions queued before the runner starts, "
        f"4 at a time, against `dccontrol` (release) on loopback; idle CPU over {idle:g} s "
        f"(one clock tick is {100 / CLOCK_TICKS / idle:.3f} % at this length).\n\n"
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {python_version}, "
        f"Django {django_version}; demo project (examples/demo)."
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


def write_doc(block: str) -> None:
    """Puts `block` between the runner markers, adding them at the end if missing."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START_MARK not in text or END_MARK not in text:
        section = "\n## Runner: dcsupervisor vs the published Python runner\n\n"
        text = text.rstrip("\n") + "\n" + section + f"{START_MARK}\n{END_MARK}\n"
    head, rest = text.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    DOC.write_text(f"{head}{START_MARK}\n\n{block}\n\n{END_MARK}{tail}")


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
