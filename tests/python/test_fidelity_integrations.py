"""Fidelity with the integrations production projects run beside their
commands: what they send and write is the same through dcsupervisor as under
`python manage.py`, once each, nothing lost.

examples/fidelity with its `integrations` app (FIDELITY_INTEGRATIONS=1):
sentry-sdk (from PyPI) initialised in settings.py, reporting to a capture
server this test runs on loopback, and logging to files in the current
directory: a FileHandler, a RotatingFileHandler, and a QueueHandler whose
QueueListener (started in ready(), stopped by an exit handler) writes from
its thread. Each case runs three ways with fidelity.py's machinery (output,
exit code, database, and the files: the logs), and what each way delivered
to Sentry is compared too: every event manage.py sends must arrive, once,
from the runner and from `exec`, and the runner's worker sends none of its
own. whitenoise's storage (its collectstatic) is there too.
"""

import copy
import dataclasses
import gzip
import http.server
import json
import os
import random
import threading
import time
from pathlib import Path

import fidelity
import pytest
from fidelity import Case, case

pytestmark = fidelity.NEEDS_BINARIES

CASES: list[Case] = [
    # Uncaught: a traceback, exit 1, and sentry-sdk's excepthook reports it.
    case("sentry-crash", "sentry_crash"),
    case("sentry-log-error", "sentry_log_error"),
    case("sentry-message", "sentry_message", "--count", "3"),
    # 30 lines: to the plain file, through two rotations, through the queue,
    # through a shipper's thread; and from module-level loggers.
    case("log-lines", "log_lines", "30"),
    # whitenoise's CompressedManifestStaticFilesStorage: hashed names, the
    # manifest and the gzipped copies (made on a thread pool) are the same.
    case("collectstatic", "collectstatic", "--noinput"),
]
# The cases whose manage.py sends events (if none arrives, the set-up is broken).
SENDING = {"sentry-crash", "sentry-log-error", "sentry-message"}


@dataclasses.dataclass(frozen=True)
class IntegrationsProject(fidelity.Project):
    """examples/fidelity, with its table in docs/fidelity.md named
    `integrations`."""

    @property
    def directory(self) -> Path:
        return fidelity.ROOT / "examples" / "fidelity"


# --- a Sentry that records what it is sent -----------------------------------


class Capture:
    """An HTTP server on loopback that accepts Sentry envelopes (POST
    /api/<project>/envelope/) and keeps their items, by project: each way
    and case reports to a project of its own (its DSN), the runner's worker
    to one for all its jobs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[int, dict, dict]] = []  # project, header, payload
        self.projects: dict[str, int] = {}
        capture = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                project = int(self.path.split("/")[2])
                capture.record(project, body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = bind_loopback(Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, project: int, envelope: bytes) -> None:
        lines = iter(envelope.split(b"\n")[1:])
        with self.lock:
            for line in lines:
                if not line.strip():
                    continue
                header = json.loads(line)
                payload = next(lines, b"")
                if "length" in header:
                    payload = payload[: header["length"]]
                try:
                    value = json.loads(payload)
                except ValueError:
                    value = {"<bytes>": len(payload)}
                self.items.append((project, header, value))

    def dsn(self, key: str) -> str:
        with self.lock:
            project = self.projects.setdefault(key, len(self.projects) + 1)
        return f"http://public@127.0.0.1:{self.port}/{project}"

    def sent(self, key: str) -> list[tuple[int, dict, dict]]:
        project = self.projects.get(key)
        with self.lock:
            return [item for item in self.items if item[0] == project]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def bind_loopback(handler) -> http.server.ThreadingHTTPServer:
    """A port in 43000-43999 (the range these tests may use)."""
    ports = list(range(43000, 44000))
    random.shuffle(ports)
    for port in ports[:50]:
        try:
            return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            continue
    raise OSError("no free port in 43000-43999")


def summary(header: dict, event: dict) -> dict:
    """What a Sentry item says, without what differs between two runs of
    manage.py itself (ids, times, the machine, the interpreter's paths)."""
    if header.get("type") != "event":
        return {"type": header.get("type")}
    argv = list(event.get("extra", {}).get("sys.argv", []))
    if argv:
        argv[0] = os.path.basename(argv[0])  # documented: always manage.py
    exceptions = [
        {
            "type": e.get("type"),
            "value": e.get("value"),
            "mechanism": e.get("mechanism"),
            "frames": [
                (f.get("module"), f.get("function"))
                for f in e.get("stacktrace", {}).get("frames", [])
            ],
        }
        for e in event.get("exception", {}).get("values", [])
    ]
    breadcrumbs = [
        (b.get("category"), b.get("level"), b.get("message"))
        for b in event.get("breadcrumbs", {}).get("values", [])
    ]
    return {
        "type": "event",
        "level": event.get("level"),
        "logger": event.get("logger"),
        "message": event.get("message")
        or event.get("logentry", {}).get("formatted")
        or event.get("logentry", {}).get("message"),
        "exception": exceptions,
        "breadcrumbs": breadcrumbs,
        "argv": argv,
    }


# --- the test ----------------------------------------------------------------


class Database(fidelity.SQLite):
    """SQLite, and a DSN of its own for each way and case (and one for the
    runner's worker)."""

    def __init__(self, workdir: Path, project, capture: Capture):
        self.capture = capture
        super().__init__(workdir, project)

    def fresh(self, directory: Path, key: str, blank=False) -> dict[str, str]:
        return super().fresh(directory, key, blank) | {
            "FIDELITY_SENTRY_DSN": self.capture.dsn(key)
        }


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A capture server, and the database with its template made (once for
    the module: the tests below make copies of it)."""
    server = Capture()
    workdir = tmp_path_factory.mktemp("integrations")
    try:
        yield server, Database(workdir, project_with(server), server)
    finally:
        server.close()


def test_cases_are_named_once():
    fidelity.check_cases_are_named_once(project_with(None))


def project_with(capture: Capture | None) -> IntegrationsProject:
    env = {"FIDELITY_INTEGRATIONS": "1"}
    if capture is not None:
        env["FIDELITY_SENTRY_DSN"] = capture.dsn("template")
    return IntegrationsProject(
        name="integrations",
        settings="fidelity_site.settings",
        cases=tuple(CASES),
        template_steps=(("migrate", "-v", "0"),),
        env=tuple(env.items()),
    )


def test_integrations_send_and_write_as_manage_py_does(tmp_path, made):
    capture, database = made
    project = database.project
    results = fidelity.every_case_three_ways(tmp_path, database)
    fidelity.check_against_the_list(
        database.cases(), results, fidelity.allowed_differences(project)
    )

    # The runner's jobs have flushed before they reported their end; a
    # moment more for anything stray (the worker's own, a second send).
    time.sleep(0.5)
    runner_sent = [summary(h, p) for _, h, p in capture.sent("runner")]
    problems = []
    for c in CASES:
        expected = [summary(h, p) for _, h, p in capture.sent(f"{c.name}.manage.py")]
        if c.name in SENDING:
            assert expected, f"{c.name}: manage.py sent nothing: the test is broken"
        argv = ["manage.py", *c.args]
        seen = {
            "exec": [summary(h, p) for _, h, p in capture.sent(f"{c.name}.exec")],
            "runner": [s for s in runner_sent if s.get("argv") == argv],
        }
        for way, got in seen.items():
            if got != expected:
                problems.append(
                    f"{c.name} via {way} sent to Sentry:\n  {got}\n"
                    f"manage.py sent:\n  {expected}"
                )
    argvs = [["manage.py", *c.args] for c in CASES]
    stray = [s for s in runner_sent if s.get("argv") not in argvs]
    if stray:
        problems.append(f"the runner sent events of no job: {stray}")
    assert not problems, "\n\n".join(problems)


def run_on(runner: fidelity.Runner, *args: str) -> dict:
    """One job on the runner, in its directory as it is (not made afresh)."""
    execution_id = runner.plane.queue(args[0], " ".join(args[1:]))
    return fidelity.wait_for(
        lambda: runner.plane.ended(execution_id), fidelity.TIMEOUT, args[0], 0.05
    )


# Seconds between two rollovers of timed.log (a TimedRotatingFileHandler).
TIMED_INTERVAL = 3


@pytest.fixture(scope="module")
def reporting_import(tmp_path_factory, made):
    """The project whose ready() logs an error (FIDELITY_READY_ERROR), a
    capture server of its own, copies of the database, and one runner on
    it, shared by the tests below (a runner's start costs a second or two)."""
    workdir = tmp_path_factory.mktemp("reporting-import")
    server = Capture()
    database = copy.copy(made[1])
    database.capture = server
    database.project = dataclasses.replace(
        database.project,
        env=(
            *database.project.env,
            ("FIDELITY_READY_ERROR", "1"),
            ("FIDELITY_TIMED_LOG", str(TIMED_INTERVAL)),
        ),
    )
    (workdir / "runner").mkdir()
    runner = fidelity.Runner(workdir / "runner", database)
    try:
        yield workdir, server, database, runner
    finally:
        runner.close()
        server.close()


def test_a_log_file_rotated_away_between_jobs_gets_the_next_jobs_lines(
    reporting_import,
):
    """logrotate (without copytruncate) renames the log file; the next
    manage.py opens a new one. So does the runner's next job, though its
    worker opened the files before: the FileHandler of the settings' LOGGING
    and those a ready() made (for the queue listener, and one it added to
    a configured logger)."""
    _, _, _, runner = reporting_import
    debug = "a debug line (the level a ready() set)\n"
    modules = (
        "INFO jobs.commands from the command module's logger\n"
        "INFO jobs.models from the models module's logger\n"
    )
    logs = {
        "integrations.log": (
            "INFO integrations ",
            f"DEBUG integrations {debug}{modules}",
        ),
        "queued.log": ("INFO ", f"DEBUG {debug}"),
        "added.log": ("INFO ", f"DEBUG {debug}"),
    }
    assert run_on(runner, "log_lines", "2")["exit_code"] == 0
    for name in logs:
        (runner.directory / name).rename(runner.directory / f"{name}.old")
    assert run_on(runner, "log_lines", "1")["exit_code"] == 0
    for name, (prefix, end) in logs.items():
        old = (runner.directory / f"{name}.old").read_text()
        # After what the template and the worker's start wrote there.
        assert old.endswith(f"{prefix}line 1 of 2\n{prefix}line 2 of 2\n{end}"), name
        new = (runner.directory / name).read_text()
        assert new == f"{prefix}line 1 of 1\n{end}", name


def test_what_the_import_reports_is_sent_once_by_the_worker(reporting_import):
    """An error logged in a ready() (FIDELITY_READY_ERROR): every manage.py
    sends it, since every manage.py imports the project. The worker imported
    it once, so the worker sends it, once (documented in docs/fidelity.md);
    no job sends it again, and jobs are still forked (the worker's
    connection to Sentry is closed before the next fork)."""
    workdir, capture, database, runner = reporting_import
    check = case("check", "check")
    config = fidelity.exec_config(workdir, database.project)
    for way, argv in fidelity.local_ways(config, database.project).items():
        directory, env = fidelity.fresh_dir(workdir, way, database)
        outcome = fidelity.run_local(argv, check, directory, env, database)
        assert outcome.exit == 0, outcome.stderr
    for _ in range(3):
        assert run_on(runner, "check")["exit_code"] == 0
    time.sleep(0.5)

    def startup_errors(key: str) -> list[list[str]]:
        return [
            s["argv"][:1]
            for s in (summary(h, p) for _, h, p in capture.sent(key))
            if s.get("message") == "an error at start-up"
        ]

    assert startup_errors("manage.py") == [["manage.py"]]
    # The worker's own command line (`python -`), not a job's.
    assert startup_errors("exec") == [["-"]]
    assert startup_errors("runner") == [["-"]]
    log = fidelity.read_logs(workdir / "runner")
    assert "fresh manage.py" not in log, log
    # The worker's threads, sentry-sdk's and the queue listener's, are not
    # hazards (the log shipper's thread is: the job's configuration of
    # logging makes the job's own shipper).
    hazards = [line for line in log.splitlines() if "fork hazard" in line]
    assert [line for line in hazards if "log-shipper" not in line] == [], hazards


def test_a_time_rotated_log_is_rolled_over_by_one_job_only(reporting_import):
    """A TimedRotatingFileHandler computes when to roll over when it is made
    (from the file's time), and again after each rollover, in the process
    that rolled over. The worker made it (in a ready(), so the job's
    configuration of logging keeps it): once that time had passed, every
    job rolled the log over again, to the same name, removing the file the
    job before had made, lines and all. A job computes it afresh, from the
    file, as manage.py does: every line is kept, once, in order."""
    *_, runner = reporting_import
    timed = runner.directory / "timed.log"
    # The worker's time to roll over has passed.
    time.sleep(max(0.0, timed.stat().st_mtime + TIMED_INTERVAL + 0.2 - time.time()))
    for count in (3, 4, 5):
        assert run_on(runner, "log_lines", str(count))["exit_code"] == 0
    logs = sorted(runner.directory.glob("timed.log.*")) + [timed]
    lines = [line for log in logs for line in log.read_text().splitlines()]
    ours = [
        f"INFO integrations line {i} of {count}"
        for count in (3, 4, 5)
        for i in range(1, count + 1)
    ]
    assert [line for line in lines if line in ours] == ours, lines
