"""Fork hazards: what a project's ready() leaves in the worker that forked
jobs would share or lose, caught before forking.

examples/fidelity with FIDELITY_HAZARDS set installs the `hazards` app, which
does in ready() what real projects do: opens a connection outside the ORM (a
socket to a small server that numbers its answers), starts a thread and
makes a module-level random.Random(). A fresh `manage.py ping` always gets
"answer 1"; forked jobs sharing the connection would read each other's
answers. The worker reports each hazard (`check`, the start-up log) and,
while it holds a socket, runs jobs as fresh manage.py subprocesses.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from harness import (
    ROOT,
    ControlPlane,
    read_logs,
    start_supervisor,
    stop_process,
    wait_for,
)

PROJECT = ROOT / "examples" / "fidelity"
DCSUPERVISOR = ROOT / "target" / "debug" / "dcsupervisor"
DCCONTROL = ROOT / "target" / "debug" / "dccontrol"
PYTHON = Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv/bin/python")
API_KEY = "dc_fork_hazard_test_key"
TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    not (DCSUPERVISOR.exists() and DCCONTROL.exists()),
    reason="dcsupervisor or dccontrol missing: build them first (`cargo build`)",
)


def config(url: str, *, hazards: bool, env: str = "") -> str:
    env = env or ('{ FIDELITY_HAZARDS = "1" }' if hazards else "{}")
    return f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}
max_retries = 0

[django]
project_dir = {json.dumps(str(PROJECT))}
settings_module = "fidelity_site.settings"
python = {json.dumps(str(PYTHON))}
env = {env}

[policy]
add_allowed_commands = ["ping", "rand", "migrate"]

[runner]
poll_interval = 0.05
output_flush_interval = 0.05
"""


def dcsupervisor(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCSUPERVISOR_")}
    return subprocess.run(
        [str(DCSUPERVISOR), "--config", str(workdir / "dc.toml"), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def plane(tmp_path):
    control = ControlPlane(
        tmp_path, dccontrol=DCCONTROL, api_key=API_KEY, timeout=TIMEOUT
    )
    yield control
    control.close()


def test_check_lists_each_hazard_and_the_fix(tmp_path, plane):
    (tmp_path / "dc.toml").write_text(config(plane.url, hazards=True))
    out = dcsupervisor(tmp_path, "check").stdout
    assert "warn fork hazard (Socket): fd" in out, out
    assert "jobs run as fresh manage.py subprocesses, not forked" in out
    assert "warn fork hazard (Thread): thread 'echo-server'" in out
    assert "warn fork hazard (SharedRandom): hazards.apps.RNG" in out
    assert "os.register_at_fork(after_in_child=...)" in out

    (tmp_path / "dc.toml").write_text(config(plane.url, hazards=False))
    assert "ok   no fork hazards" in dcsupervisor(tmp_path, "check").stdout


def test_a_shared_connection_is_never_forked(tmp_path, plane):
    (tmp_path / "dc.toml").write_text(config(plane.url, hazards=True))
    # exec, twice: each a fresh manage.py, so each gets the first answer.
    for _ in range(2):
        done = dcsupervisor(tmp_path, "exec", "ping")
        assert (done.returncode, done.stdout, done.stderr) == (
            0,
            "answer 1 to ping\n",
            "",
        )

    # The runner, with jobs at once on one worker: none shares the connection.
    runner = start_supervisor(DCSUPERVISOR, tmp_path, config(plane.url, hazards=True))
    try:
        ids = [plane.queue("ping") for _ in range(4)]
        ended = wait_for(
            lambda: all(plane.ended(i) for i in ids) and [plane.ended(i) for i in ids],
            TIMEOUT,
            "the pings",
        )
        outputs = [
            "".join(s["content"] for c in e["chunks"] for s in c["segments"])
            for e in ended
        ]
        assert outputs == ["answer 1 to ping\n"] * 4, read_logs(tmp_path)
        assert "ping runs as a fresh manage.py, not forked" in read_logs(tmp_path)
    finally:
        stop_process(runner)
    assert "fork hazard: thread 'echo-server'" in read_logs(tmp_path)


def runner_outputs(tmp_path: Path, plane, config_text: str, command: str, jobs: int):
    """What `jobs` executions of `command`, queued at once, printed."""
    runner = start_supervisor(DCSUPERVISOR, tmp_path, config_text)
    try:
        ids = [plane.queue(command) for _ in range(jobs)]
        wait_for(lambda: all(plane.ended(i) for i in ids), TIMEOUT, command)
        return [
            "".join(
                s["content"] for c in plane.ended(i)["chunks"] for s in c["segments"]
            )
            for i in ids
        ]
    finally:
        stop_process(runner)


def test_a_shared_random_generator_is_reported_and_the_fork_hook_fixes_it(
    tmp_path, plane
):
    shared = config(plane.url, hazards=True, env='{ FIDELITY_HAZARDS = "random" }')
    (tmp_path / "dc.toml").write_text(shared)
    out = dcsupervisor(tmp_path, "check").stdout
    assert "warn fork hazard (SharedRandom): hazards.apps.RNG" in out, out
    assert "Socket" not in out, "no socket: jobs are forked"
    # The hazard as the issue found it: every forked job draws the same number.
    drawn = runner_outputs(tmp_path, plane, shared, "rand", 3)
    assert len(set(drawn)) == 1, drawn

    fixed = config(
        plane.url,
        hazards=True,
        env='{ FIDELITY_HAZARDS = "random", FIDELITY_HAZARDS_FIXED = "1" }',
    )
    drawn = runner_outputs(tmp_path, plane, fixed, "rand", 3)
    assert len(set(drawn)) == 3, drawn
