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
* idle CPU: utime+stime from /proc/<pid>/stat across IDLE seconds with
  nothing queued, as a percentage of one core.

Prints a Markdown table and writes it into docs/benchmarks.md between
`<!-- runner:start -->` and `<!-- runner:end -->`. Run it with
`bash bench/runner.sh` (it builds the release binaries first).
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, living or gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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
    import tomllib

    return tomllib.loads((DEMO_DIR / "dc.toml").read_text())["policy"][
        "add_allowed_commands"
    ]


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


RUNNERS = {
    f"published runner {PUBLISHED_VERSION}": start_published,
    "dcsupervisor": start_dcsupervisor,
}


# --- one measurement -------------------------------------------------------


@dataclass
class Result:
    runner: str
    executions: int
    drain_s: float
    latencies_ms: list[float]
    rss_kib: int
    idle_cpu_percent: float
    idle_ticks: int
    worker_rss_kib: int | None = None  # dcsupervisor's Python worker
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.executions / self.drain_s

    def percentile(self, p: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[p - 1]


def bench(name: str, start_runner, count: int, idle: float, workdir: Path) -> Result:
    """Queues `count` noops, starts the runner, measures the drain and the idle."""
    plane = ControlPlane(workdir)
    runner = None
    try:
        for _ in range(count):
            plane.call(
                "POST", "/api/operator/executions", {"command": "noop", "args": ""}
            )
        print(
            f"{name}: {count} executions queued; starting the runner", file=sys.stderr
        )
        runner = start_runner(plane.url, workdir)
        limit = STARTUP_LIMIT + count * 5  # the published runner needs ~2 s per 4
        executions = wait_for(
            lambda: drained(plane, runner), limit, "the queue to drain", 0.5
        )
        rss = rss_kib(runner.pid)
        worker = children(runner.pid) if name == "dcsupervisor" else []
        worker_rss = sum(rss_kib(pid) for pid in worker) if worker else None
        print(f"{name}: drained; {idle:g} s idle", file=sys.stderr)
        idle_cpu, ticks = idle_cpu_percent(runner.pid, idle)
        result = summarize(name, executions, rss, worker_rss, idle_cpu, ticks)
        result.notes += refused_requests(plane.requests())
        return result
    except BaseException:
        print(f"{name}: failed; logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        if runner is not None:
            stop_process(runner)
        plane.close()


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


def summarize(name, executions, rss, worker_rss, idle_cpu, ticks) -> Result:
    statuses = {e["status"] for e in executions}
    if statuses != {"success"}:
        raise RuntimeError(
            f"{name}: executions ended {statuses}, expected success only"
        )
    first_start = min(e["started_at"] for e in executions)
    last_complete = max(e["completed_at"] for e in executions)
    latencies = [1000 * (e["completed_at"] - e["started_at"]) for e in executions]
    return Result(
        name,
        len(executions),
        last_complete - first_start,
        latencies,
        rss,
        idle_cpu,
        ticks,
        worker_rss,
    )


def refused_requests(requests: list[dict]) -> list[str]:
    """Requests the control plane refused (e.g. starting an execution twice)."""
    refused: dict[tuple[str, int], int] = {}
    for request in requests:
        if request["status"] != 200:
            kind = request["path"].rstrip("/").rsplit("/", 1)[-1]
            key = (kind, request["status"])
            refused[key] = refused.get(key, 0) + 1
    return [
        f"{n} `{kind}` requests answered {status}"
        for (kind, status), n in sorted(refused.items())
    ]


# --- the report ------------------------------------------------------------


def mark(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return "✅" if met else "❌"


def table(results: list[Result]) -> str:
    t = TARGETS
    rows = [
        ("executions drained", "", lambda r: f"{r.executions}"),
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
        (
            "start→complete p50",
            f"≤ {t['p50_ms']:g} ms",
            lambda r: (
                f"{r.percentile(50):.1f} ms {mark(r.percentile(50), t['p50_ms'], True)}"
            ),
        ),
        ("start→complete p95", "", lambda r: f"{r.percentile(95):.1f} ms"),
        (
            "runner process RSS after the drain",
            f"≤ {t['rss_mb']:g} MB",
            lambda r: (
                f"{r.rss_kib / 1024:.1f} MiB {mark(r.rss_kib / 1024, t['rss_mb'], True)}"
            ),
        ),
        (
            "+ Python worker RSS (fork parent)",
            "",
            lambda r: (
                "—"
                if r.worker_rss_kib is None
                else f"{r.worker_rss_kib / 1024:.1f} MiB"
            ),
        ),
        (
            "idle CPU, runner process",
            f"≤ {t['idle_cpu']:g} %",
            lambda r: (
                f"{r.idle_cpu_percent:.3f} % ({r.idle_ticks} ticks) "
                f"{mark(r.idle_cpu_percent, t['idle_cpu'], True)}"
            ),
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
    for name, start_runner in RUNNERS.items():
        with tempfile.TemporaryDirectory(prefix="dc-bench-") as workdir:
            results.append(
                bench(
                    name, start_runner, options.executions, options.idle, Path(workdir)
                )
            )
    notes = [f"- {r.runner}: {note}" for r in results for note in r.notes]
    block = environment(options.executions, options.idle) + "\n\n" + table(results)
    if notes:
        block += "\n\nRefused requests during the run:\n\n" + "\n".join(notes)
    print(block)
    if not options.no_doc:
        write_doc(block)
        print(f"updated {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
