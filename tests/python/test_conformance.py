"""Wire conformance: dcsupervisor against the published Python runner.

The same scenario runs twice, once with ``djangocommand-runner`` 0.1.0 (the
published runner, in its own venv under target/) and once with
``dcsupervisor``, each against its own fresh ``dccontrol serve`` on
loopback. Then what each runner sent, as ``GET /api/operator/requests``
logged it, is compared: endpoints, bodies and headers. Every difference we
accept is asserted explicitly, with the reason next to it, so a new
difference fails instead of slipping through. docs/conformance.md describes
the test and lists the accepted differences.

The scenario: start the runner, wait for its first heartbeat and sync, queue
``noop``, ``noisy --lines 3``, ``fail`` and ``shell`` (refused by both
runners' policy), wait until all four are finished, stop the runner
(SIGTERM, SIGKILL after 10 s).
"""

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "examples" / "demo"
DCCONTROL = ROOT / "target" / "debug" / "dccontrol"
DCSUPERVISOR = ROOT / "target" / "debug" / "dcsupervisor"
PUBLISHED_VENV = ROOT / "target" / "published-runner-venv"
PUBLISHED_PYTHON = PUBLISHED_VENV / "bin" / "python"
PUBLISHED_VERSION = "0.1.0"
DEFAULT_LISTS = ROOT / "python" / "djangocommand" / "default_commands.json"

API_KEY = "dc_conformance_test_key"
SCENARIO = {"noop": "", "noisy": "--lines 3", "fail": "", "shell": ""}
EXPECTED_END = {
    "noop": {"exit_code": 0, "status": "success"},
    "noisy": {"exit_code": 0, "status": "success"},
    "fail": {"exit_code": 1, "status": "failed"},
    "shell": {"exit_code": -1, "status": "failed"},
}
RUN_COMMANDS = ("noop", "noisy", "fail")  # the ones the policy lets run
# Seconds. Generous: the published runner pays a fresh interpreter and
# django.setup() per command, and CI machines are slow.
STARTUP_LIMIT = 60
EXECUTIONS_LIMIT = 90
STOP_GRACE = 10
# Both runners' protocol rhythms (PROTOCOL.md).
FLUSH_INTERVAL = 1.5
POLL_INTERVAL = 2.0

UUID4 = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
EXECUTION_PATH = re.compile(
    r"/api/runner/executions/(?P<id>[^/]+)/(?P<kind>start|output|complete|cancel-status)/"
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


def stop_process(process: subprocess.Popen, grace: float = STOP_GRACE) -> bool:
    """SIGTERM to the process group, SIGKILL after `grace` s; True if it exited by itself."""
    exited = process.poll() is not None
    if not exited:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
            exited = True
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (a command the runner started) goes too.
    signal_group(process, signal.SIGKILL)
    process.wait()
    return exited


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
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def queue(self, command: str, args: str) -> str:
        return self.call(
            "POST", "/api/operator/executions", {"command": command, "args": args}
        )["id"]

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
    answered = {r["path"] for r in plane.requests() if r["status"] == 200}
    return {HEARTBEAT, SYNC} <= answered


def all_finished(plane: ControlPlane, ids: dict[str, str]) -> dict[str, dict] | None:
    details = {command: plane.execution(i) for command, i in ids.items()}
    done = all(d["status"] not in ("pending", "running") for d in details.values())
    return details if done else None


@dataclass
class Capture:
    """What one runner did in the scenario."""

    name: str
    requests: list[dict]  # the control plane's request log, in arrival order
    ids: dict[str, str]  # command -> execution id
    executions: dict[str, dict]  # command -> the operator's view of it
    stopped_by_itself: bool  # exited within STOP_GRACE of SIGTERM

    def for_execution(self, command: str) -> list[tuple[str, dict]]:
        """(kind, request) of every request about one execution, in arrival order."""
        found = []
        for request in self.requests:
            match = EXECUTION_PATH.fullmatch(request["path"])
            if match and match["id"] == self.ids[command]:
                found.append((match["kind"], request))
        return found

    def kinds(self, command: str) -> list[str]:
        return [kind for kind, _ in self.for_execution(command)]

    def of_kind(self, command: str, kind: str) -> list[dict]:
        return [request for k, request in self.for_execution(command) if k == kind]

    def to(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]


def run_scenario(name: str, workdir: Path, start_runner) -> Capture:
    """The scenario, with `start_runner(url, workdir)` starting the runner under test."""
    plane = ControlPlane(workdir)
    runner = None
    try:
        runner = start_runner(plane.url, workdir)
        wait_for(
            lambda: synced(plane) or runner.poll() is not None,
            STARTUP_LIMIT,
            "heartbeat + sync",
        )
        assert runner.poll() is None, f"{name} exited early"
        ids = {
            command: plane.queue(command, args) for command, args in SCENARIO.items()
        }
        executions = wait_for(
            lambda: all_finished(plane, ids), EXECUTIONS_LIMIT, "the executions", 0.2
        )
        stopped_by_itself = stop_process(runner)
        return Capture(name, plane.requests(), ids, executions, stopped_by_itself)
    except BaseException:
        print(
            f"--- {name}: logs in {workdir} ---\n{read_logs(workdir)}", file=sys.stderr
        )
        raise
    finally:
        if runner is not None:
            stop_process(runner)
        plane.close()


def read_logs(workdir: Path) -> str:
    return "".join(
        f"== {path.name}\n{path.read_text(errors='replace')}"
        for path in sorted(workdir.glob("*.log"))
    )


# --- the two runners -------------------------------------------------------


def demo_allowlist_additions() -> list[str]:
    """The demo's `[policy] add_allowed_commands`, given to both runners."""
    text = (DEMO_DIR / "dc.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough for a regex
        block = re.search(r"add_allowed_commands\s*=\s*\[(.*?)\]", text, re.DOTALL)
        return re.findall(r'"([^"]+)"', block.group(1))
    return tomllib.loads(text)["policy"]["add_allowed_commands"]


def project_python() -> Path:
    return Path(
        os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv" / "bin" / "python"
    )


def ensure_published_venv() -> None:
    """target/published-runner-venv with Django and the published runner, made once."""
    if has_published_runner():
        return
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(PUBLISHED_VENV)],
            check=True,
            capture_output=True,
        )
        pip = [
            str(PUBLISHED_PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]
        packages = ["django", f"djangocommand-runner=={PUBLISHED_VERSION}"]
        subprocess.run(
            pip + packages, check=True, capture_output=True, text=True, timeout=600
        )
    except subprocess.CalledProcessError as error:
        pytest.skip(
            f"cannot install djangocommand-runner=={PUBLISHED_VERSION} (offline?): {error.stderr[-500:]}"
        )
    assert has_published_runner(), (
        f"{PUBLISHED_VENV} has no usable djangocommand {PUBLISHED_VERSION}"
    )


def has_published_runner() -> bool:
    if not PUBLISHED_PYTHON.exists():
        return False
    probe = "import django, djangocommand; print(djangocommand.__version__)"
    result = subprocess.run(
        [str(PUBLISHED_PYTHON), "-c", probe],
        check=False,
        capture_output=True,
        text=True,
    )
    return result.returncode == 0 and result.stdout.strip() == PUBLISHED_VERSION


def start_published(url: str, workdir: Path) -> subprocess.Popen:
    """`manage.py djangocommand start` with a settings module written for this run."""
    ensure_published_venv()
    additions = tuple(demo_allowlist_additions())
    (workdir / "conformance_settings.py").write_text(
        "# Written by tests/python/test_conformance.py: the demo settings plus the runner.\n"
        "from demo_project.settings import *  # noqa: F403\n"
        "from djangocommand import DEFAULT_ALLOWED_COMMANDS\n\n"
        'INSTALLED_APPS = INSTALLED_APPS + ["djangocommand"]  # noqa: F405\n'
        "DEBUG = False  # no autoreloader: one runner process\n"
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
        # temp dir keeps parallel runs (and stale PID files) apart.
        TMPDIR=str(workdir),
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # Django's own options go before the subcommand: `start` refuses them.
    argv = [
        str(PUBLISHED_PYTHON),
        "manage.py",
        "djangocommand",
        "--settings",
        "conformance_settings",
        "start",
    ]
    return start_process(argv, workdir / "runner.log", cwd=DEMO_DIR, env=env)


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
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DCSUPERVISOR_", "DJANGOCOMMAND_"))
    }
    env["NO_COLOR"] = "1"
    argv = [str(DCSUPERVISOR), "--config", str(workdir / "dc.toml"), "-v"]
    return start_process(argv, workdir / "runner.log", env=env)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Capture:
    return run_scenario(
        "published runner", tmp_path_factory.mktemp("published"), start_published
    )


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Capture:
    return run_scenario(
        "dcsupervisor", tmp_path_factory.mktemp("dcsupervisor"), start_dcsupervisor
    )


@pytest.fixture(scope="module")
def both(published, ours) -> tuple[Capture, Capture]:
    return published, ours


# --- helpers for the comparisons -------------------------------------------


def commands_hash(commands: list[dict]) -> str:
    """PROTOCOL.md's commands hash, computed the way the protocol defines it."""
    canonical = json.dumps(
        sorted(commands, key=lambda c: c["name"]), sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def sync_list(capture: Capture) -> list[dict]:
    return capture.to(SYNC)[0]["body"]["commands"]


def by_name(commands: list[dict]) -> dict[str, dict]:
    return {command["name"]: command for command in commands}


# PROTOCOL.md: where the published runner's default lists and SEED-README.md
# differ, SEED-README.md wins. Its allowlist table names these three, which
# the published DEFAULT_ALLOWED_COMMANDS leaves out (and its blocklist names
# dbrestore and loaddata, which SEED-README's blocklist table does not).
SEED_README_ONLY_ALLOWED = {"dbrestore", "loaddata", "print_settings"}
PUBLISHED_ONLY_DISALLOWED = {"dbrestore", "loaddata"}


def stream_text(execution: dict, is_stderr: bool) -> str:
    return "".join(
        segment["content"]
        for chunk in execution["chunks"]
        if chunk["is_stderr"] == is_stderr
        for segment in chunk["segments"]
    )


def run_python(python: Path, code: str):
    """The JSON that `code` prints, run by `python`."""
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def endpoint(path: str) -> str:
    """The path with the execution id replaced, e.g. /api/runner/executions/<id>/start/."""
    return EXECUTION_PATH.sub(r"/api/runner/executions/<id>/\g<kind>/", path)


# --- what must be the same -------------------------------------------------


def test_every_request_is_answered_200(both):
    for capture in both:
        refused = [
            (r["method"], r["path"], r["status"])
            for r in capture.requests
            if r["status"] != 200
        ]
        assert not refused, f"{capture.name}: {refused}"


def test_both_stop_on_sigterm(both):
    for capture in both:
        assert capture.stopped_by_itself, f"{capture.name} needed SIGKILL"


def test_start_up_is_heartbeat_then_sync(both):
    """The heartbeat first (it validates the key), then the one sync it asks
    for, before any execution is touched. (dcsupervisor's first `/pending/`
    poll may overtake the sync: it only waits for the heartbeat's answer.)"""
    for capture in both:
        paths = [r["path"] for r in capture.requests]
        assert paths[0] == HEARTBEAT, f"{capture.name}: {paths[:5]}"
        assert paths.count(SYNC) == 1, f"{capture.name} synced more than once"
        first_execution = next(
            i for i, p in enumerate(paths) if EXECUTION_PATH.fullmatch(p)
        )
        assert paths.index(SYNC) < first_execution, capture.name


def test_endpoints_and_methods_are_the_same(both):
    theirs, mine = (
        {(r["method"], endpoint(r["path"])) for r in capture.requests}
        for capture in both
    )
    # cancel-status: dcsupervisor had no reason to ask (test_cancel_status_polling_starts_later).
    assert theirs - mine == {("GET", "/api/runner/executions/<id>/cancel-status/")}
    assert mine <= theirs


def test_heartbeat_body(both):
    published, ours = both
    for capture in both:
        for request in capture.to(HEARTBEAT):
            body = request["body"]
            assert set(body) == {
                "runner_version",
                "python_version",
                "django_version",
                "commands_hash",
            }
            assert all(isinstance(value, str) and value for value in body.values()), (
                capture.name,
                body,
            )
    # Each reports its own interpreter and Django.
    probe = (
        "import json, platform, django;"
        "print(json.dumps([platform.python_version(), django.get_version()]))"
    )
    for capture, python in ((published, PUBLISHED_PYTHON), (ours, project_python())):
        body = capture.to(HEARTBEAT)[0]["body"]
        assert [body["python_version"], body["django_version"]] == run_python(
            python, probe
        ), capture.name


def test_each_heartbeat_sends_the_hash_of_the_synced_list(both):
    for capture in both:
        expected = commands_hash(sync_list(capture))
        assert {r["body"]["commands_hash"] for r in capture.to(HEARTBEAT)} == {
            expected
        }, capture.name


def test_synced_commands(both):
    published, ours = both
    theirs, mine = by_name(sync_list(published)), by_name(sync_list(ours))
    for capture, commands in ((published, theirs), (ours, mine)):
        for command in commands.values():
            assert set(command) == {"name", "app_label", "help_text"}, (
                capture.name,
                command["name"],
            )
            assert all(isinstance(value, str) for value in command.values()), command[
                "name"
            ]
    # Same names (but the default-list difference below), same app labels,
    # same help texts.
    assert set(mine) - set(theirs) == SEED_README_ONLY_ALLOWED & set(mine)
    assert set(theirs) <= set(mine)
    for name in theirs:
        assert mine[name] == theirs[name], name
    # So the same list hashes the same, whoever sends it.
    assert commands_hash([mine[name] for name in theirs]) == commands_hash(
        list(theirs.values())
    )
    assert set(RUN_COMMANDS) <= set(theirs)
    assert "shell" not in mine and "djangocommand" not in theirs


def test_each_execution_is_start_output_complete(both):
    for capture in both:
        for command in SCENARIO:
            kinds = [kind for kind in capture.kinds(command) if kind != "cancel-status"]
            assert kinds[0] == "start" and kinds[-1] == "complete", (
                capture.name,
                command,
                kinds,
            )
            assert set(kinds[1:-1]) <= {"output"}, (capture.name, command, kinds)
            assert capture.kinds(command).count("complete") == 1


def test_start_has_no_body(both):
    for capture in both:
        for command in SCENARIO:
            start = capture.of_kind(command, "start")[0]
            assert start["body"] is None and "raw_body" not in start, (
                capture.name,
                command,
            )


def test_output_chunk_structure(both):
    for capture in both:
        for command in SCENARIO:
            chunks = [r["body"] for r in capture.of_kind(command, "output")]
            # Numbered from 1 across both streams, in the order they are sent.
            assert [c["chunk_number"] for c in chunks] == list(
                range(1, len(chunks) + 1)
            ), (capture.name, command)
            for chunk in chunks:
                assert set(chunk) == {"chunk_number", "segments", "is_stderr"}
                assert isinstance(chunk["is_stderr"], bool)
                assert chunk["segments"], "no empty chunks"
                for segment in chunk["segments"]:
                    assert set(segment) == {"timestamp", "content"}
                    assert segment["timestamp"] is None or isinstance(
                        segment["timestamp"], float
                    )
                    assert isinstance(segment["content"], str) and segment["content"]


def test_segments_start_lines_with_timestamps(both):
    """A segment that starts a line has a timestamp; only a continuation has none."""
    for capture in both:
        for command in SCENARIO:
            at_line_start = {False: True, True: True}
            for request in capture.of_kind(command, "output"):
                chunk = request["body"]
                for segment in chunk["segments"]:
                    has_timestamp = segment["timestamp"] is not None
                    assert has_timestamp == at_line_start[chunk["is_stderr"]], (
                        capture.name,
                        command,
                        segment,
                    )
                    at_line_start[chunk["is_stderr"]] = segment["content"].endswith(
                        "\n"
                    )


def test_output_text_is_the_same(both):
    published, ours = both
    for command in SCENARIO:
        for is_stderr in (False, True):
            theirs = stream_text(published.executions[command], is_stderr)
            assert stream_text(ours.executions[command], is_stderr) == theirs, (
                command,
                is_stderr,
            )
    assert stream_text(ours.executions["noisy"], False) == "out 0\nout 1\nout 2\n"
    assert stream_text(ours.executions["noisy"], True) == "err 0\nerr 1\nerr 2\n"
    assert stream_text(ours.executions["fail"], True) == "CommandError: demo failure\n"


def test_completion(both):
    for capture in both:
        for command, expected in EXPECTED_END.items():
            assert capture.of_kind(command, "complete")[0]["body"] == expected, (
                capture.name,
                command,
            )
            assert capture.executions[command]["status"] == expected["status"]


def test_rejection_is_start_one_stderr_chunk_complete(both):
    for capture in both:
        # Never run, so never asked about: no cancel-status either.
        assert capture.kinds("shell") == ["start", "output", "complete"], capture.name
        chunk = capture.of_kind("shell", "output")[0]["body"]
        assert (
            chunk["chunk_number"] == 1
            and chunk["is_stderr"] is True
            and len(chunk["segments"]) == 1
        )
    # With `configured_in = "django-settings"` the wording is the published
    # one, word for word (the default, dc.toml, names dc.toml instead).
    theirs, text = (
        c.of_kind("shell", "output")[0]["body"]["segments"][0]["content"] for c in both
    )
    assert text == theirs
    assert text.startswith("Command 'shell' rejected by runner security policy.\n")
    assert "Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist\n" in text


def test_protocol_headers(both):
    for capture in both:
        for request in capture.requests:
            headers = request["headers"]
            # dccontrol logs the bearer key redacted once it matched.
            assert headers["authorization"] == "Bearer <redacted>", request["path"]
            assert headers["content-type"] == "application/json", request["path"]
            timestamp = headers["x-request-timestamp"]
            assert re.fullmatch(r"[0-9]+", timestamp), timestamp
            assert abs(int(timestamp) - request["time"]) <= 2, "stamped when sent"
            assert UUID4.fullmatch(headers["x-request-nonce"]), headers[
                "x-request-nonce"
            ]
    nonces = [
        r["headers"]["x-request-nonce"] for capture in both for r in capture.requests
    ]
    assert len(nonces) == len(set(nonces)), "a nonce was used twice"


# --- the accepted differences, asserted ------------------------------------


def test_runner_version_differs(both):
    published, ours = both
    assert {r["body"]["runner_version"] for r in published.to(HEARTBEAT)} == {
        PUBLISHED_VERSION
    }
    assert {r["body"]["runner_version"] for r in ours.to(HEARTBEAT)} == {
        "0.1.0+dcsupervisor"
    }


def test_user_agent_differs(both):
    published, ours = both
    assert {r["headers"]["user-agent"].split("/")[0] for r in published.requests} == {
        "python-requests"
    }
    assert {r["headers"]["user-agent"] for r in ours.requests} == {
        f"dcsupervisor/{PUBLISHED_VERSION}"
    }


def header_names(capture: Capture) -> dict[str, set[str]]:
    """Endpoint -> every header name sent to it."""
    names: dict[str, set[str]] = {}
    for request in capture.requests:
        names.setdefault(endpoint(request["path"]), set()).update(request["headers"])
    return names


def test_requests_library_headers_only_in_published(both):
    """`requests` adds Accept, Accept-Encoding and Connection: keep-alive.

    None of them carries meaning here: `*/*` is what no Accept means, an
    uncompressed answer is always allowed, and HTTP/1.1 connections persist
    by default.
    """
    published, ours = both
    theirs, mine = header_names(published), header_names(ours)
    # cancel-status: see test_cancel_status_polling_starts_later.
    assert set(theirs) - set(mine) == {"/api/runner/executions/<id>/cancel-status/"}
    for path in mine:
        extra = {"accept", "accept-encoding", "connection"}
        assert theirs[path] - mine[path] == extra, path
        assert mine[path] - theirs[path] == set(), path


def test_start_announces_an_empty_body(both):
    """Front ends that insist on it answer 411 Length Required without it."""
    for capture in both:
        for command in SCENARIO:
            assert (
                capture.of_kind(command, "start")[0]["headers"].get("content-length")
                == "0"
            ), capture.name


def test_synced_list_order(both):
    """The published runner sends get_commands() order, dcsupervisor sorts by name.

    Not significant: the hash sorts the list, and a list of commands is a set.
    """
    _, ours = both
    names = [command["name"] for command in sync_list(ours)]
    assert names == sorted(names)


def test_default_lists_differ_only_where_seed_readme_says():
    """The published package's default lists against ours (SEED_README_ONLY_ALLOWED)."""
    ensure_published_venv()
    probe = (
        "import json, djangocommand as d;"
        "print(json.dumps([d.DEFAULT_ALLOWED_COMMANDS, d.DEFAULT_DISALLOWED_COMMANDS]))"
    )
    their_allowed, their_disallowed = map(set, run_python(PUBLISHED_PYTHON, probe))
    ours = json.loads(DEFAULT_LISTS.read_text())
    assert set(ours["allowed"]) - their_allowed == SEED_README_ONLY_ALLOWED
    assert their_allowed - set(ours["allowed"]) == set()
    assert their_disallowed - set(ours["disallowed"]) == PUBLISHED_ONLY_DISALLOWED
    assert set(ours["disallowed"]) - their_disallowed == set()


def test_published_heartbeats_twice_at_start_up(both):
    """Its main loop starts with `last_heartbeat = 0`, so a second heartbeat
    follows the start-up one at once. dcsupervisor waits an interval (5 s here)."""
    published, ours = both
    assert [r["path"] for r in published.requests[:3]] == [HEARTBEAT, SYNC, HEARTBEAT]
    beats = [r["time"] for r in ours.to(HEARTBEAT)]
    assert all(later - earlier > 4.5 for earlier, later in itertools.pairwise(beats)), (
        beats
    )


def test_published_completes_a_flush_interval_after_start(both):
    """Its output thread sleeps a whole flush interval (1.5 s) before the last
    flush, and `complete` waits for that thread: every command that runs takes
    at least 1.5 s from `start` to `complete`, however short it is.
    dcsupervisor completes as soon as the command's pipes are closed."""
    published, ours = both
    for command in RUN_COMMANDS:
        for capture, at_least in ((published, True), (ours, False)):
            start, complete = (
                capture.of_kind(command, k)[0] for k in ("start", "complete")
            )
            took = complete["time"] - start["time"]
            assert (took >= FLUSH_INTERVAL) == at_least, (capture.name, command, took)


def test_cancel_status_polling_starts_later(both):
    """The published runner asks at once after `start`, then every 2 s;
    dcsupervisor every 2 s from the start of the command, so a command that
    ends sooner is never asked about. PROTOCOL.md only says "polled every
    2 s"; an execution that ends within 2 s leaves nothing to cancel."""
    published, ours = both
    for command in RUN_COMMANDS:
        assert published.kinds(command)[:2] == ["start", "cancel-status"], command
        assert "cancel-status" not in ours.kinds(command), command


def test_pending_polled_early_when_a_slot_frees(both):
    """dcsupervisor polls `/pending/` every 2 s and also at once when an
    execution ends (a slot freed up) or a heartbeat reports pending work; the
    published runner only every 2 s. More requests, bounded by the completion
    rate, and what lets a queue drain faster than 4 executions per 2 s."""
    published, ours = both

    def early_polls(capture):
        polls = [r["time"] for r in capture.to(PENDING)]
        return [
            t
            for previous, t in itertools.pairwise(polls)
            if t - previous < POLL_INTERVAL * 0.9
        ]

    assert early_polls(published) == []
    triggers = [
        r["time"]
        for r in ours.requests
        if r["path"].endswith("/complete/") or r["path"] == HEARTBEAT
    ]
    early = early_polls(ours)
    assert early, "dcsupervisor polled again when its executions ended"
    for poll in early:
        assert any(0 <= poll - t < 0.5 for t in triggers), (
            f"early poll at {poll} follows no completion"
        )


def test_json_spacing_differs(both):
    """`requests` writes bodies with `json.dumps` defaults (", " and ": ",
    non-ASCII escaped), dcsupervisor compact JSON in UTF-8: the same JSON
    values. The log shows parsed bodies, so Content-Length tells the forms
    apart (bodies without floats only: dccontrol's float parsing may move a
    timestamp by one digit)."""
    forms = {
        "published runner": lambda body: json.dumps(body),
        "dcsupervisor": lambda body: json.dumps(
            body, separators=(",", ":"), ensure_ascii=False
        ),
    }
    for capture in both:
        requests = capture.to(HEARTBEAT) + capture.to(SYNC)
        requests += [r for c in SCENARIO for r in capture.of_kind(c, "complete")]
        for request in requests:
            length = len(forms[capture.name](request["body"]).encode())
            assert int(request["headers"]["content-length"]) == length, (
                capture.name,
                request["path"],
            )
