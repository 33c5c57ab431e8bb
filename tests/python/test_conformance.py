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
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    PUBLISHED_PYTHON,
    PUBLISHED_VENV,
    PUBLISHED_VERSION,
    ROOT,
    ControlPlane,
    demo_config,
    has_published_runner,
    install_published_runner,
    read_logs,
    start_published_runner,
    start_supervisor,
    stop_process,
    target_binary,
    wait_for,
)

DCCONTROL = target_binary("dccontrol")
DCSUPERVISOR = target_binary("dcsupervisor")
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
REQUEST_TIMEOUT = 10  # one call to dccontrol's operator API
# Both runners' protocol rhythms (the published protocol).
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


# --- the scenario ----------------------------------------------------------


def synced(plane: ControlPlane) -> bool:
    """Whether the runner's first heartbeat and its sync were both answered."""
    answered = {r["path"] for r in plane.requests() if r["status"] == 200}
    return {HEARTBEAT, SYNC} <= answered


def all_finished(plane: ControlPlane, ids: dict[str, str]) -> dict[str, dict] | None:
    ended = {command: plane.ended(i) for command, i in ids.items()}
    return ended if all(ended.values()) else None


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
    plane = ControlPlane(
        workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=REQUEST_TIMEOUT
    )
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


# --- the two runners -------------------------------------------------------


def project_python() -> Path:
    return Path(
        os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv" / "bin" / "python"
    )


def ensure_published_venv() -> None:
    """target/published-runner-venv with Django and the published runner, made once."""
    if has_published_runner():
        return
    try:
        install_published_runner(capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as error:
        pytest.skip(
            f"cannot install djangocommand-runner=={PUBLISHED_VERSION} (offline?): {error.stderr[-500:]}"
        )
    assert has_published_runner(), (
        f"{PUBLISHED_VENV} has no usable djangocommand {PUBLISHED_VERSION}"
    )


def start_published(url: str, workdir: Path) -> subprocess.Popen:
    """`manage.py djangocommand start` with a settings module written for this run."""
    ensure_published_venv()
    return start_published_runner(
        url,
        workdir,
        api_key=API_KEY,
        settings_module="conformance_settings",
        written_by="tests/python/test_conformance.py",
        extra_settings="DJANGOCOMMAND_HEARTBEAT_INTERVAL = 5\n",
    )


def start_dcsupervisor(url: str, workdir: Path) -> subprocess.Popen:
    """dcsupervisor with the demo allowlist and the published wording for refusals."""
    config = demo_config(
        url,
        workdir,
        api_key=API_KEY,
        python=project_python(),
        server_extra="heartbeat_interval = 5\n",
        tail=(
            "# Refusals then name the Django settings, as the published runner's do.\n"
            'configured_in = "django-settings"\n'
        ),
    )
    return start_supervisor(DCSUPERVISOR, workdir, config, "-v")


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
    """The published protocol's commands hash, computed the way the protocol defines it."""
    canonical = json.dumps(
        sorted(commands, key=lambda c: c["name"]), sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def sync_list(capture: Capture) -> list[dict]:
    return capture.to(SYNC)[0]["body"]["commands"]


def by_name(commands: list[dict]) -> dict[str, dict]:
    return {command["name"]: command for command in commands}


# The published protocol: where the published runner's default lists and the
# published package README differ, the README wins. Its allowlist table names
# these three, which the published DEFAULT_ALLOWED_COMMANDS leaves out (and its
# blocklist names dbrestore and loaddata, which the README's blocklist table
# does not).
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
    ends sooner is never asked about. The published protocol only says "polled
    every 2 s"; an execution that ends within 2 s leaves nothing to cancel."""
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
