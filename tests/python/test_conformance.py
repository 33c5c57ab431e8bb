"""Wire conformance: dcsupervisor against the published Python runner.

The same scenario runs twice, once with ``djangocommand-runner`` 0.1.0 (the
published runner, in its own venv) and once with ``dcsupervisor``, each
against a fresh ``dccontrol serve`` on loopback. Then what each runner sent,
as ``GET /api/operator/requests`` logged it, is compared: endpoints, bodies
and headers. The differences we accept are asserted explicitly (each test
says why), so a new difference fails instead of slipping through.
docs/conformance.md describes the test and the accepted differences.

The scenario: start the runner, wait for its first heartbeat and sync, queue
``noop``, ``noisy --lines 3``, ``fail`` and ``shell`` (refused by both
runners' policy), wait until all four are finished, stop the runner.
"""

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "examples" / "demo"
DCCONTROL = ROOT / "target" / "debug" / "dccontrol"
DCSUPERVISOR = ROOT / "target" / "debug" / "dcsupervisor"
PUBLISHED_VENV = ROOT / "target" / "published-runner-venv"
PUBLISHED_VERSION = "0.1.0"
DEFAULT_LISTS = ROOT / "python" / "djangocommand" / "default_commands.json"

API_KEY = "dc_conformance_test_key"
SCENARIO = {"noop": "", "noisy": "--lines 3", "fail": "", "shell": ""}
EXPECTED_END = {
    "noop": (0, "success"),
    "noisy": (0, "success"),
    "fail": (1, "failed"),
    "shell": (-1, "failed"),
}
# Seconds. Generous: the published runner pays a fresh interpreter and
# django.setup() per command, and CI machines are slow.
STARTUP_LIMIT = 60
EXECUTIONS_LIMIT = 90
STOP_GRACE = 10
# The published runner's flush interval; it sleeps it out before `complete`.
PUBLISHED_FLUSH_INTERVAL = 1.5

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EXECUTION_PATH = re.compile(
    r"^/api/runner/executions/(?P<id>[^/]+)/(?P<kind>start|output|complete|cancel-status)/$"
)
HEARTBEAT = "/api/runner/heartbeat/"
SYNC = "/api/runner/commands/sync/"
PENDING = "/api/runner/pending/"

pytestmark = pytest.mark.skipif(
    not (DCCONTROL.exists() and DCSUPERVISOR.exists()),
    reason=f"{DCCONTROL} or {DCSUPERVISOR} missing: build them first (`cargo build`; scripts/test does)",
)


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


def stop_process(process: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM to the process group, SIGKILL to it after `grace` seconds."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (a command the runner forked) goes too.
    signal_group(process, signal.SIGKILL)
    process.wait()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


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
            stop_process(self.process)
            raise RuntimeError(f"dccontrol did not announce its address: {line!r}")
        self.url = line.removeprefix("listening on ").strip()

    def close(self) -> None:
        stop_process(self.process)
        self.process.stdout.close()

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def queue(self, command: str, args: str) -> str:
        return self.call("POST", "/api/operator/executions", {"command": command, "args": args})["id"]

    def execution(self, execution_id: str) -> dict:
        return self.call("GET", f"/api/operator/executions/{execution_id}")

    def requests(self) -> list[dict]:
        return self.call("GET", "/api/operator/requests")["requests"]


def wait_for(predicate, limit: float, what: str, interval: float = 0.1):
    """Polls `predicate` until it returns something truthy; fails after `limit` s."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(interval)


def synced(plane: ControlPlane) -> bool:
    """Whether the runner's first heartbeat and its sync were both answered."""
    answered = [r["path"] for r in plane.requests() if r["status"] == 200]
    return HEARTBEAT in answered and SYNC in answered


def finished(plane: ControlPlane, ids: dict[str, str]):
    details = {command: plane.execution(i) for command, i in ids.items()}
    done = all(d["status"] not in ("pending", "running") for d in details.values())
    return details if done else None


@dataclass
class Capture:
    """What one runner did in the scenario."""

    name: str
    requests: list[dict]
    ids: dict[str, str]  # command -> execution id
    executions: dict[str, dict]  # command -> operator view of the execution
    log: str

    def for_execution(self, command: str) -> list[tuple[str, dict]]:
        """(kind, request) of every request about one execution, in arrival order."""
        wanted = self.ids[command]
        found = []
        for request in self.requests:
            match = EXECUTION_PATH.match(request["path"])
            if match and match["id"] == wanted:
                found.append((match["kind"], request))
        return found

    def first(self, path: str) -> dict:
        return next(r for r in self.requests if r["path"] == path)


def run_scenario(name: str, workdir: Path, start_runner) -> Capture:
    """The scenario, with `start_runner(url, workdir)` starting the runner under test."""
    plane = ControlPlane(workdir)
    runner = None
    try:
        runner = start_runner(plane.url, workdir)
        wait_for(lambda: synced(plane) or runner.poll() is not None, STARTUP_LIMIT, "heartbeat + sync")
        assert runner.poll() is None, f"{name} exited early:\n{read_log(workdir)}"
        ids = {command: plane.queue(command, args) for command, args in SCENARIO.items()}
        executions = wait_for(lambda: finished(plane, ids), EXECUTIONS_LIMIT, "the executions", 0.2)
        stop_process(runner)
        return Capture(name, plane.requests(), ids, executions, read_log(workdir))
    except BaseException:
        print(f"--- {name} logs ---\n{read_log(workdir)}", file=sys.stderr)
        raise
    finally:
        if runner is not None:
            stop_process(runner)
        plane.close()


def read_log(workdir: Path) -> str:
    return "".join(
        f"== {path.name}\n{path.read_text(errors='replace')}" for path in sorted(workdir.glob("*.log"))
    )


# --- the two runners -------------------------------------------------------


def demo_allowlist_additions() -> list[str]:
    """The demo's `[policy] add_allowed_commands`, used by both runners."""
    text = (DEMO_DIR / "dc.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough for a regex
        block = re.search(r"add_allowed_commands\s*=\s*\[(.*?)\]", text, re.S)
        return re.findall(r'"([^"]+)"', block.group(1))
    return tomllib.loads(text)["policy"]["add_allowed_commands"]


def project_python() -> Path:
    return Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv" / "bin" / "python")


def published_python() -> Path:
    """The published runner's venv (target/published-runner-venv), made on first use."""
    python = PUBLISHED_VENV / "bin" / "python"
    if has_published_runner(python):
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PUBLISHED_VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            + ["django", f"djangocommand-runner=={PUBLISHED_VERSION}"],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot install djangocommand-runner=={PUBLISHED_VERSION} (offline?): {error.stderr[-500:]}")
    assert has_published_runner(python)
    return python


def has_published_runner(python: Path) -> bool:
    if not python.exists():
        return False
    probe = "import django, djangocommand; print(djangocommand.__version__)"
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == PUBLISHED_VERSION


def start_published(url: str, workdir: Path) -> subprocess.Popen:
    """`manage.py djangocommand start` with settings made for this run."""
    additions = tuple(demo_allowlist_additions())
    (workdir / "conformance_settings.py").write_text(
        "# Written by tests/python/test_conformance.py: the demo settings plus the runner.\n"
        "from demo_project.settings import *  # noqa: F403\n"
        "from djangocommand import DEFAULT_ALLOWED_COMMANDS\n\n"
        'INSTALLED_APPS = INSTALLED_APPS + ["djangocommand"]  # noqa: F405\n'
        "DEBUG = False  # no autoreloader: one process to measure and to stop\n"
        f"DJANGOCOMMAND_API_KEY = {API_KEY!r}\n"
        f"DJANGOCOMMAND_SERVER_URL = {url!r}\n"
        "DJANGOCOMMAND_HEARTBEAT_INTERVAL = 5\n"
        f"DJANGOCOMMAND_ALLOWED_COMMANDS = DEFAULT_ALLOWED_COMMANDS + {additions!r}\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(workdir),
        DEMO_DB_PATH=str(workdir / "db.sqlite3"),
        # Its PID file lives in the temp dir, keyed by BASE_DIR: a private
        # temp dir keeps parallel runs (and stale files) from clashing.
        TMPDIR=str(workdir),
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # Django's own options go before the subcommand: `start` does not take them.
    argv = [str(published_python()), "manage.py", "djangocommand", "--settings", "conformance_settings"]
    return start_process(argv + ["-v", "2", "start"], workdir / "runner.log", cwd=DEMO_DIR, env=env)


def start_dcsupervisor(url: str, workdir: Path) -> subprocess.Popen:
    """dcsupervisor with the demo allowlist and the published wording for refusals."""
    config = f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}
heartbeat_interval = 5

[django]
project_dir = {json.dumps(str(DEMO_DIR))}
settings_module = "demo_project.settings"
python = {json.dumps(str(project_python()))}
env = {{ DEMO_DB_PATH = {json.dumps(str(workdir / "db.sqlite3"))} }}

[policy]
add_allowed_commands = {json.dumps(demo_allowlist_additions())}
# Refusals then name the Django settings, as the published runner's do.
configured_in = "django-settings"
"""
    (workdir / "dc.toml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCSUPERVISOR_", "DJANGOCOMMAND_"))}
    env["NO_COLOR"] = "1"
    argv = [str(DCSUPERVISOR), "--config", str(workdir / "dc.toml"), "-v"]
    return start_process(argv, workdir / "runner.log", env=env)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Capture:
    return run_scenario("published runner", tmp_path_factory.mktemp("published"), start_published)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Capture:
    return run_scenario("dcsupervisor", tmp_path_factory.mktemp("dcsupervisor"), start_dcsupervisor)


@pytest.fixture(scope="module")
def both(published, ours) -> tuple[Capture, Capture]:
    return published, ours


# --- helpers for the comparisons -------------------------------------------


def commands_hash(commands: list[dict]) -> str:
    """PROTOCOL.md's hash, computed the way the protocol defines it."""
    canonical = json.dumps(sorted(commands, key=lambda c: c["name"]), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def synced_commands(capture: Capture) -> dict[str, dict]:
    return {c["name"]: c for c in capture.first(SYNC)["body"]["commands"]}


def extra_default_allowed() -> set[str]:
    """Commands dcsupervisor allows by default and the published runner does not.

    PROTOCOL.md: where the published runner's list and SEED-README.md differ,
    SEED-README.md wins; its allowlist table names `dbrestore`, `loaddata`
    and `print_settings`, which the published package's
    DEFAULT_ALLOWED_COMMANDS leaves out.
    """
    return {"dbrestore", "loaddata", "print_settings"}


def stream_text(execution: dict, is_stderr: bool) -> str:
    return "".join(
        segment["content"]
        for chunk in execution["chunks"]
        if chunk["is_stderr"] == is_stderr
        for segment in chunk["segments"]
    )


def versions_of(python: Path) -> dict[str, str]:
    probe = "import json, platform, django; print(json.dumps([platform.python_version(), django.get_version()]))"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
    python_version, django_version = json.loads(out)
    return {"python_version": python_version, "django_version": django_version}


# --- the comparisons -------------------------------------------------------


def test_every_request_is_answered_200(both):
    for capture in both:
        refused = [(r["method"], r["path"], r["status"]) for r in capture.requests if r["status"] != 200]
        assert not refused, f"{capture.name}: {refused}"


def test_start_up_is_heartbeat_then_sync(both):
    for capture in both:
        paths = [r["path"] for r in capture.requests]
        assert paths[:2] == [HEARTBEAT, SYNC], f"{capture.name}: {paths[:5]}"
        assert paths.count(SYNC) == 1, f"{capture.name} synced more than once"


def test_endpoints_and_methods_are_the_same(both):
    def endpoints(capture):
        return {(r["method"], EXECUTION_PATH.sub(r"/api/runner/executions/<id>/\g<kind>/", r["path"])) for r in capture.requests}

    published, ours = both
    # cancel-status: see test_cancel_status_polling; the rest must be identical.
    cancel = ("GET", "/api/runner/executions/<id>/cancel-status/")
    assert endpoints(published) - {cancel} == endpoints(ours) - {cancel}


def test_heartbeat_body(both):
    published, ours = both
    bodies = {c.name: c.first(HEARTBEAT)["body"] for c in both}
    for name, body in bodies.items():
        assert set(body) == {"runner_version", "python_version", "django_version", "commands_hash"}, name
        assert all(isinstance(value, str) and value for value in body.values()), (name, body)
    # Each reports its own interpreter and Django.
    assert versions_of(PUBLISHED_VENV / "bin" / "python").items() <= bodies[published.name].items()
    assert versions_of(project_python()).items() <= bodies[ours.name].items()
    # Accepted difference: runner_version names each runner's own version.
    assert bodies[published.name]["runner_version"] == PUBLISHED_VERSION
    assert bodies[ours.name]["runner_version"] != PUBLISHED_VERSION


def test_every_heartbeat_sends_the_hash_of_the_synced_list(both):
    for capture in both:
        expected = commands_hash(list(synced_commands(capture).values()))
        hashes = {r["body"]["commands_hash"] for r in capture.requests if r["path"] == HEARTBEAT}
        assert hashes == {expected}, capture.name


def test_synced_commands(both):
    published, ours = both
    theirs, mine = synced_commands(published), synced_commands(ours)
    for capture, commands in ((published, theirs), (ours, mine)):
        for command in commands.values():
            assert set(command) == {"name", "app_label", "help_text"}, (capture.name, command)
            assert all(isinstance(value, str) for value in command.values()), command
    # Accepted difference: the default allowlist (see extra_default_allowed).
    assert set(mine) - set(theirs) <= extra_default_allowed()
    assert set(theirs) <= set(mine)
    assert "loaddata" in set(mine) - set(theirs), "Django's loaddata is discovered and allowed by default"
    for name in theirs:
        assert mine[name] == theirs[name], name
    # Everything else equal, so the same list hashes the same.
    common = [mine[name] for name in theirs]
    assert commands_hash(common) == commands_hash(list(theirs.values()))
    assert set(SCENARIO) - {"shell"} <= set(theirs)
    assert "shell" not in mine and "djangocommand" not in theirs


def test_sync_answer_adopted_without_resync(both):
    """dccontrol hashes the list itself; both runners' hashes agree with it."""
    for capture in both:
        assert [r["path"] for r in capture.requests].count(SYNC) == 1, capture.name


def test_each_execution_is_start_output_complete(both):
    for capture in both:
        for command in SCENARIO:
            kinds = [kind for kind, _ in capture.for_execution(command) if kind != "cancel-status"]
            assert kinds[0] == "start" and kinds[-1] == "complete", (capture.name, command, kinds)
            assert set(kinds[1:-1]) <= {"output"}, (capture.name, command, kinds)
            assert Counter(kinds)["start"] == 1 and Counter(kinds)["complete"] == 1


def test_start_has_no_body(both):
    for capture in both:
        for command in SCENARIO:
            start = capture.for_execution(command)[0][1]
            assert start["body"] is None and "raw_body" not in start, (capture.name, command)


def test_output_chunks(both):
    published, ours = both
    for capture in both:
        for command in SCENARIO:
            chunks = [r["body"] for kind, r in capture.for_execution(command) if kind == "output"]
            numbers = [c["chunk_number"] for c in chunks]
            assert numbers == list(range(1, len(chunks) + 1)), (capture.name, command, numbers)
            for chunk in chunks:
                assert set(chunk) == {"chunk_number", "segments", "is_stderr"}
                assert isinstance(chunk["is_stderr"], bool)
                for segment in chunk["segments"]:
                    assert set(segment) == {"timestamp", "content"}
                    assert segment["timestamp"] is None or isinstance(segment["timestamp"], float)
                    assert isinstance(segment["content"], str) and segment["content"]
    for command in SCENARIO:
        for is_stderr in (False, True):
            assert stream_text(published.executions[command], is_stderr) == stream_text(
                ours.executions[command], is_stderr
            ), (command, "stderr" if is_stderr else "stdout")
    assert stream_text(ours.executions["noisy"], False) == "out 0\nout 1\nout 2\n"
    assert stream_text(ours.executions["noisy"], True) == "err 0\nerr 1\nerr 2\n"


def test_segments_start_lines_with_timestamps(both):
    """A segment that starts a line has a timestamp; only continuations have none."""
    for capture in both:
        for command in SCENARIO:
            at_line_start = {False: True, True: True}
            for kind, request in capture.for_execution(command):
                if kind != "output":
                    continue
                chunk = request["body"]
                for segment in chunk["segments"]:
                    starts_line = at_line_start[chunk["is_stderr"]]
                    assert (segment["timestamp"] is not None) == starts_line, (capture.name, command, segment)
                    at_line_start[chunk["is_stderr"]] = segment["content"].endswith("\n")


def test_completion(both):
    for capture in both:
        for command, (exit_code, status) in EXPECTED_END.items():
            complete = capture.for_execution(command)[-1][1]["body"]
            assert complete == {"exit_code": exit_code, "status": status}, (capture.name, command)
            assert capture.executions[command]["status"] == status


def test_rejection(both):
    published, ours = both
    texts = {}
    for capture in both:
        kinds = [kind for kind, _ in capture.for_execution("shell")]
        # Never run, so no cancel-status either: start, one stderr chunk, complete.
        assert kinds == ["start", "output", "complete"], (capture.name, kinds)
        chunk = capture.for_execution("shell")[1][1]["body"]
        assert chunk["chunk_number"] == 1 and chunk["is_stderr"] is True
        assert len(chunk["segments"]) == 1
        texts[capture.name] = chunk["segments"][0]["content"]
    # With `configured_in = "django-settings"` the wording is the published one.
    assert texts[ours.name] == texts[published.name]
    assert "Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist\n" in texts[ours.name]


def test_headers(both):
    for capture in both:
        nonces = []
        for request in capture.requests:
            headers = request["headers"]
            assert headers["authorization"] == "Bearer <redacted>", request["path"]
            assert headers["content-type"] == "application/json", request["path"]
            timestamp = headers["x-request-timestamp"]
            assert re.fullmatch(r"[0-9]+", timestamp), timestamp
            assert abs(int(timestamp) - request["time"]) <= 2, "stamped when sent"
            assert UUID4.match(headers["x-request-nonce"]), headers["x-request-nonce"]
            nonces.append(headers["x-request-nonce"])
        assert len(nonces) == len(set(nonces)), f"{capture.name} reused a nonce"


def test_user_agent(both):
    published, ours = both
    # Accepted difference: each client names itself.
    assert {r["headers"]["user-agent"].split("/")[0] for r in published.requests} == {"python-requests"}
    assert {r["headers"]["user-agent"].split("/")[0] for r in ours.requests} == {"dcsupervisor"}


def test_other_headers(both):
    """Header names beyond the protocol's: only the HTTP clients' own differ."""
    published, ours = both

    def names(capture, method):
        return set().union(*(r["headers"].keys() for r in capture.requests if r["method"] == method))

    # Accepted difference: `requests` always offers compressed answers and
    # says it keeps the connection alive; HTTP/1.1 keeps it alive anyway, and
    # an uncompressed answer is always allowed.
    requests_only = {"accept", "accept-encoding", "connection"}
    for method in ("GET", "POST"):
        assert names(published, method) - names(ours, method) == requests_only, method
        assert names(ours, method) - names(published, method) == set(), method


def test_completion_timing(both):
    """Accepted difference: the published runner completes later.

    Its output thread sleeps a whole flush interval (1.5 s) before its last
    flush, and `complete` waits for that thread: every execution that runs
    a command takes at least 1.5 s from `start` to `complete`. dcsupervisor
    flushes as soon as the command's pipes close.
    """
    published, ours = both
    for command in ("noop", "noisy", "fail"):
        requests = published.for_execution(command)
        assert requests[-1][1]["time"] - requests[0][1]["time"] >= PUBLISHED_FLUSH_INTERVAL, command
        requests = ours.for_execution(command)
        assert requests[-1][1]["time"] - requests[0][1]["time"] < PUBLISHED_FLUSH_INTERVAL, command


def test_cancel_status_polling(both):
    """Accepted difference: when cancel-status is first asked.

    The published runner asks once right after `start` and then every 2 s;
    dcsupervisor asks every 2 s from the start of the command, so a command
    shorter than that is never asked about. PROTOCOL.md only promises "polled
    every 2 s"; a cancel of an execution that ends within 2 s has nothing to
    stop anyway.
    """
    published, ours = both
    for command in ("noop", "noisy", "fail"):
        kinds = [kind for kind, _ in published.for_execution(command)]
        assert "cancel-status" in kinds, command
        assert kinds.index("cancel-status") > kinds.index("start")
        assert "cancel-status" not in [kind for kind, _ in ours.for_execution(command)], command


def test_default_lists_differ_only_where_the_seed_readme_says(both):
    """The default lists: dcsupervisor's follow SEED-README.md (PROTOCOL.md)."""
    probe = "import json, djangocommand as d; print(json.dumps([d.DEFAULT_ALLOWED_COMMANDS, d.DEFAULT_DISALLOWED_COMMANDS]))"
    out = subprocess.run([str(PUBLISHED_VENV / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    their_allowed, their_disallowed = map(set, json.loads(out.stdout))
    ours = json.loads(DEFAULT_LISTS.read_text())
    assert set(ours["allowed"]) - their_allowed == extra_default_allowed()
    assert their_allowed - set(ours["allowed"]) == set()
    # The published blocklist also names dbrestore and loaddata; SEED-README's does not.
    assert their_disallowed - set(ours["disallowed"]) == {"dbrestore", "loaddata"}
    assert set(ours["disallowed"]) - their_disallowed == set()


if __name__ == "__main__":  # pragma: no cover - a manual aid: dump both captures
    shutil.rmtree("/tmp/conformance-dump", ignore_errors=True)
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
