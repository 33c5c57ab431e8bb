"""Shared set-up for the tests that run real processes, and for bench/runner.py.

Its job: start and stop what those tests drive (a local ``dccontrol serve``,
dcsupervisor, the published Python runner ``djangocommand-runner``) the same
way everywhere, so the conformance test and the benchmark measure the very
same set-up. What each caller checks or measures stays in its own file.

Not a test module (pytest collects ``test_*.py`` only). pytest's default
``prepend`` import mode puts ``tests/python`` on ``sys.path`` (it has no
``__init__.py``), so the tests import it as ``harness``; bench/runner.py adds
the folder itself. It needs the standard library only, not pytest: a failure
to set something up raises, and the caller decides whether that skips.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "examples" / "demo"
WORKER_PATH = ROOT / "python" / "djangocommand" / "_worker.py"
# The published runner lives in its own venv, made once and kept under
# target/ (cargo clean removes it with the builds).
PUBLISHED_VENV = ROOT / "target" / "published-runner-venv"
PUBLISHED_PYTHON = PUBLISHED_VENV / "bin" / "python"
PUBLISHED_VERSION = "0.1.0"
STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL
# Figures measured in session fixtures, for the test using the fixture to
# record (record_property("figure", ...)); conftest.py prints them.
FIGURES: list[str] = []


def target_binary(name: str, profile: str = "debug") -> Path:
    """A binary cargo built: the tests use debug builds, the benchmark release."""
    return ROOT / "target" / profile / name


def load_worker() -> ModuleType:
    """The worker script, loaded from its path: the supervisor ships it as a
    lone script, not as part of the package, so that is how it must work."""
    spec = importlib.util.spec_from_file_location("dcsupervisor_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    except ProcessLookupError:  # the whole group is gone already
        pass


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


def read_logs(workdir: Path, tail: int | None = None) -> str:
    """Every *.log in `workdir`, each headed by its name (its last `tail`
    characters only, when given), to print when something went wrong."""
    texts = []
    for path in sorted(workdir.glob("*.log")):
        text = path.read_text(errors="replace")
        texts.append(f"== {path.name}\n{text if tail is None else text[-tail:]}")
    return "".join(texts)


# --- the control plane -----------------------------------------------------


class ControlPlane:
    """A `dccontrol serve` on a free loopback port, and its operator API.

    It logs to workdir/dccontrol.log, next to the runner's log, so that
    read_logs(workdir) shows both when something fails."""

    def __init__(self, workdir: Path, *, dccontrol: Path, api_key: str, timeout: float):
        self.api_key = api_key
        self.timeout = timeout  # seconds for one request (and for `finished`)
        # Port 0: the kernel picks a free port, so parallel runs never clash;
        # dccontrol prints the address it got as its first line.
        self.process = start_process(
            [str(dccontrol), "serve", "--listen", "127.0.0.1:0", "--api-key", api_key],
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
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read() or b"null")

    def queue(self, command: str, args: str | None = None) -> str:
        """Queues an execution; its id. Without `args` the body has none at all."""
        body = {"command": command}
        if args is not None:
            body["args"] = args
        return self.call("POST", "/api/operator/executions", body)["id"]

    def execution(self, execution_id: str) -> dict:
        return self.call("GET", f"/api/operator/executions/{execution_id}")

    def executions(self) -> list[dict]:
        return self.call("GET", "/api/operator/executions")["executions"]

    def requests(self) -> list[dict]:
        """Every request a runner sent, as dccontrol logged it, in arrival order."""
        return self.call("GET", "/api/operator/requests")["requests"]

    def ended(self, execution_id: str) -> dict | None:
        """The execution once it has ended, None while pending or running."""
        execution = self.execution(execution_id)
        return execution if execution["status"] not in ("pending", "running") else None

    def finished(self, command: str) -> dict:
        """Queues `command` and waits (up to `timeout` s) until it has ended."""
        execution_id = self.queue(command)
        return wait_for(
            lambda: self.ended(execution_id),
            self.timeout,
            f"{command} to finish",
            interval=0.2,
        )


# --- the runners under test ------------------------------------------------


def demo_allowlist_additions() -> list[str]:
    """The demo's `[policy] add_allowed_commands` (dc.toml), given to both runners."""
    text = (DEMO_DIR / "dc.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough for a regex
        block = re.search(r"add_allowed_commands\s*=\s*\[(.*?)\]", text, re.DOTALL)
        return re.findall(r'"([^"]+)"', block.group(1))
    return tomllib.loads(text)["policy"]["add_allowed_commands"]


def has_published_runner() -> bool:
    """Whether PUBLISHED_VENV has Django and the published runner's version."""
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


def install_published_runner(**run_options) -> None:
    """Creates PUBLISHED_VENV and installs Django and the published runner
    from PyPI into it; `run_options` go to both subprocess.run calls.
    Raises CalledProcessError when that fails (offline, say)."""
    subprocess.run(
        [sys.executable, "-m", "venv", str(PUBLISHED_VENV)], check=True, **run_options
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
    subprocess.run(pip + packages, check=True, **run_options)


def start_published_runner(
    url: str,
    workdir: Path,
    *,
    api_key: str,
    settings_module: str,
    written_by: str,
    extra_settings: str = "",
) -> subprocess.Popen:
    """`manage.py djangocommand start` in the demo project, with a settings
    module written into `workdir` for this run (the demo settings plus the
    published runner, `extra_settings` appended)."""
    additions = tuple(demo_allowlist_additions())
    (workdir / f"{settings_module}.py").write_text(
        f"# Written by {written_by}: the demo settings plus the published runner.\n"
        "from demo_project.settings import *  # noqa: F403\n"
        "from djangocommand import DEFAULT_ALLOWED_COMMANDS\n\n"
        'INSTALLED_APPS = INSTALLED_APPS + ["djangocommand"]  # noqa: F405\n'
        "DEBUG = False  # no autoreloader: one runner process\n"
        f"DJANGOCOMMAND_API_KEY = {api_key!r}\n"
        f"DJANGOCOMMAND_SERVER_URL = {url!r}\n"
        f"{extra_settings}"
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
        settings_module,
        "start",
    ]
    return start_process(argv, workdir / "runner.log", cwd=DEMO_DIR, env=env)


def demo_config(
    url: str,
    workdir: Path,
    *,
    api_key: str,
    python: Path,
    server_extra: str = "",
    tail: str = "",
) -> str:
    """dcsupervisor's dc.toml for the demo project and the demo allowlist:
    `server_extra` ends the [server] table, `tail` follows the [policy] one."""
    return f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(api_key)}
{server_extra}
[django]
project_dir = {json.dumps(str(DEMO_DIR))}
settings_module = "demo_project.settings"
python = {json.dumps(str(python))}
env = {{ DEMO_DB_PATH = {json.dumps(str(workdir / "db.sqlite3"))} }}

[policy]
add_allowed_commands = {json.dumps(demo_allowlist_additions())}
{tail}"""


def start_supervisor(
    binary: Path, workdir: Path, config: str, *flags: str
) -> subprocess.Popen:
    """dcsupervisor on `config`, written to workdir/dc.toml, logging to runner.log."""
    (workdir / "dc.toml").write_text(config)
    # DCSUPERVISOR_* would override the file and DJANGOCOMMAND_* the key:
    # the run must depend on the config alone, not on the caller's shell.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DCSUPERVISOR_", "DJANGOCOMMAND_"))
    }
    env["NO_COLOR"] = "1"  # plain log lines, whatever the caller's terminal
    argv = [str(binary), "--config", str(workdir / "dc.toml"), *flags]
    return start_process(argv, workdir / "runner.log", env=env)
