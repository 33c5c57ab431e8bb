"""The ``djangocommand`` Python package: what SEED-README promises Django developers.

Three layers:

* the settings variants of the seed README, each in its own interpreter with
  its own settings module, against the shared vectors in
  ``tests/policy_vectors.json`` (the Rust supervisor is held to the same file),
  plus the bad settings and their messages;
* ``manage.py djangocommand`` driven against stand-in supervisors (small
  scripts that take the lock as dcsupervisor does), so the process control is
  tested without the Rust build;
* end to end (marked ``slow``, still part of scripts/test): the wheels in
  $DCSUPERVISOR_TEST_WHEEL_DIR (scripts/test's dev-profile wheel, or
  scripts/wheels' release set; built here with the dev profile when unset),
  installed offline into a fresh venv with no cargo on PATH (Django's wheels
  fetched beforehand), a copy of the demo project using it, ``start -d``/
  ``status``/``restart``/``stop``, an execution through the local control
  plane, and ``Runner``'s ``run_once()`` and ``run()``; ``--target`` and
  ``--user`` installs of the same wheel finding their binary.

The fast layers import the package from ``python/`` (PYTHONPATH); the slow one
runs the same variant checks again against the installed wheel.
"""

import ast
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import DEMO_DIR, FIGURES, ROOT, ControlPlane, target_binary, wait_for

PACKAGE_SRC = ROOT / "python"
DEFAULTS = json.loads(
    (PACKAGE_SRC / "djangocommand" / "default_commands.json").read_text()
)
VECTORS = json.loads((ROOT / "tests" / "policy_vectors.json").read_text())
SEED_README = ROOT.parent / "shared" / "SEED-README.md"
DCCONTROL = target_binary("dccontrol")
TEST_PYTHON = os.environ.get("DCSUPERVISOR_TEST_PYTHON") or sys.executable
API_KEY = "dc_local_demo_key"
TIMEOUT = 60  # seconds for one step; generous for a loaded CI machine

# The in-process unit tests import the package from the source tree.
sys.path.insert(0, str(PACKAGE_SRC))

from djangocommand import runner as runner_module
from djangocommand import supervisor_config

try:  # 3.11+: reads back what we write
    import tomllib
except ModuleNotFoundError:  # 3.10: only the tests that read TOML are skipped
    tomllib = None

needs_tomllib = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11+")

MANAGE_PY = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "variant_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

BASE_SETTINGS = """\
SECRET_KEY = "test-only-not-secret"
INSTALLED_APPS = ["djangocommand"]
USE_TZ = True

"""

# Runs in the variant's interpreter; prints what the helpers return.
PROBE = """\
import json, sys
import django

django.setup()
import djangocommand
from djangocommand import (
    DEFAULT_ALLOWED_COMMANDS,
    DEFAULT_DISALLOWED_COMMANDS,
    get_allowed_commands,
    get_disallowed_commands,
    is_command_allowed,
    is_using_blocklist,
)
from djangocommand.conf import policy_settings
from djangocommand.supervisor_config import policy_table

commands = json.loads(sys.argv[1])
results = {name: is_command_allowed(name) for name in commands}
allowed, disallowed = get_allowed_commands(), get_disallowed_commands()
print(json.dumps({
    "package": djangocommand.__file__,
    "verdicts": {name: list(result) for name, result in results.items()},
    "verdict_types_ok": all(
        type(r) is tuple and len(r) == 2 and type(r[0]) is bool and type(r[1]) is str
        for r in results.values()
    ),
    "is_using_blocklist": is_using_blocklist(),
    "allowed": sorted(allowed),
    "disallowed": sorted(disallowed),
    "types": [type(x).__name__ for x in (
        allowed, disallowed, DEFAULT_ALLOWED_COMMANDS, DEFAULT_DISALLOWED_COMMANDS,
        is_using_blocklist(),
    )],
    "policy_table": policy_table(policy_settings()),
}))
"""

# The seed's "Checking Command Permissions" snippet, verbatim.
PERMISSIONS_SNIPPET = """\
from djangocommand import (
    is_command_allowed,
    is_using_blocklist,
    get_allowed_commands,
    get_disallowed_commands,
    DEFAULT_ALLOWED_COMMANDS,
)

# Check if a command is allowed
allowed, reason = is_command_allowed('migrate')
# (True, '')

allowed, reason = is_command_allowed('shell')
# (False, 'not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist')

# Check which mode is active
if is_using_blocklist():
    blocked = get_disallowed_commands()  # frozenset of command names
else:
    allowed = get_allowed_commands()  # frozenset of command names
"""

# Runs a snippet paragraph by paragraph; a paragraph ending in a comment
# such as "# (True, '')" records what `allowed, reason` hold at that point.
SNIPPET_RUNNER = """\
import json, sys
import django

django.setup()
namespace = {}
checks = []
for paragraph in sys.argv[1].split("\\n\\n"):
    exec(paragraph, namespace)
    last = paragraph.strip().splitlines()[-1]
    if last.startswith("# ("):
        checks.append([last[2:], [namespace["allowed"], namespace["reason"]]])
final = namespace["allowed"]
from djangocommand import DEFAULT_ALLOWED_COMMANDS
print(json.dumps({
    "checks": checks,
    "final_type": type(final).__name__,
    "final_is_default": final == frozenset(DEFAULT_ALLOWED_COMMANDS),
}))
"""

# The seed's "Optional" settings block, verbatim.
OPTIONAL_SNIPPET = """\
# Server URL (default: https://app.djangocommand.com)
DJANGOCOMMAND_SERVER_URL = "https://app.djangocommand.com"

# Runner heartbeat interval in seconds (default: 30, minimum: 5)
DJANGOCOMMAND_HEARTBEAT_INTERVAL = 30

# HTTP request timeout in seconds (default: 30)
DJANGOCOMMAND_REQUEST_TIMEOUT = 30

# Max retries for failed requests (default: 3)
DJANGOCOMMAND_MAX_RETRIES = 3

# Hosts allowed to use HTTP instead of HTTPS (default: localhost only)
DJANGOCOMMAND_ALLOW_HTTP_HOSTS = ['localhost', '127.0.0.1', '::1']
"""


# --- helpers -------------------------------------------------------------------


def child_env(pythonpath: bool = True, **extra: str) -> dict[str, str]:
    """This environment without anything that would steer the package or the
    supervisor, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(
            ("DJANGOCOMMAND_", "DCSUPERVISOR_", "DJANGO_SETTINGS_MODULE")
        )
        and name not in ("PYTHONPATH", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    }
    if pythonpath:
        env["PYTHONPATH"] = str(PACKAGE_SRC)
    env.update(extra)
    return env


def make_project(path: Path, settings_text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manage.py").write_text(MANAGE_PY)
    (path / "variant_settings.py").write_text(BASE_SETTINGS + settings_text)
    return path


def run(
    argv, cwd: Path, env: dict, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def manage(python, project: Path, *args, env: dict, timeout: float = TIMEOUT):
    return run([python, "manage.py", "djangocommand", *args], project, env, timeout)


def effective(policy: dict, kind: str) -> set[str]:
    """A vector's [policy] list as src/config.rs combines it: the replacement
    or the default, plus add_, minus remove_."""
    base = policy.get(f"{kind}_commands", DEFAULTS[kind])
    add = policy.get(f"add_{kind}_commands", [])
    remove = policy.get(f"remove_{kind}_commands", [])
    return {name for name in [*base, *add] if name not in remove}


def evaluate_variant(python, workdir: Path, case: dict, pythonpath: bool) -> dict:
    project = make_project(workdir, case["django_settings"])
    result = run(
        [python, "-c", PROBE, json.dumps(list(case["expect"]))],
        project,
        child_env(pythonpath, DJANGO_SETTINGS_MODULE="variant_settings"),
    )
    assert result.returncode == 0, f"{case['name']}:\n{result.stderr}"
    return json.loads(result.stdout)


def check_variant(report: dict, case: dict) -> None:
    """The helpers' answers and the generated [policy] both match the vector."""
    name = case["name"]
    assert report["verdicts"] == case["expect"], name
    assert report["verdict_types_ok"], name
    assert report["types"] == ["frozenset", "frozenset", "tuple", "tuple", "bool"], name
    assert report["is_using_blocklist"] == (case["policy"]["mode"] == "blocklist"), name
    table = report["policy_table"]
    assert table["mode"] == case["policy"]["mode"], name
    assert (
        table["configured_in"] == case["policy"]["configured_in"] == "django-settings"
    )
    for kind in ("allowed", "disallowed"):
        written = table[f"{kind}_commands"]
        # What the supervisor is told is what the helpers use, in full.
        assert len(written) == len(set(written)), name
        assert set(written) == effective(case["policy"], kind), (name, kind)
        assert report[kind] == sorted(written), (name, kind)


def seed_python_blocks() -> list[str]:
    if not SEED_README.exists():
        pytest.skip(f"{SEED_README} not present (it sits beside the repository)")
    return re.findall(r"```python\n(.*?)```", SEED_README.read_text(), flags=re.DOTALL)


# --- defaults and imports --------------------------------------------------------


def test_default_lists_are_the_shared_file_in_order_without_duplicates():
    import djangocommand

    assert djangocommand.DEFAULT_ALLOWED_COMMANDS == tuple(
        dict.fromkeys(DEFAULTS["allowed"])
    )
    assert djangocommand.DEFAULT_DISALLOWED_COMMANDS == tuple(
        dict.fromkeys(DEFAULTS["disallowed"])
    )
    for listed in (djangocommand.DEFAULT_ALLOWED_COMMANDS, DEFAULTS["allowed"]):
        assert len(set(listed)) == len(listed)
    # The seed's tables.
    for name in (
        "migrate",
        "dbrestore",
        "loaddata",
        "test",
        "clear_cache",
        "update_index",
    ):
        assert name in djangocommand.DEFAULT_ALLOWED_COMMANDS
    for name in ("flush", "shell", "createsuperuser", "makemigrations", "clean_pyc"):
        assert name in djangocommand.DEFAULT_DISALLOWED_COMMANDS
    assert DEFAULTS["runner_command"] == "djangocommand"


def test_package_imports_from_settings_without_django(tmp_path):
    code = (
        "import sys\n"
        "from djangocommand import DEFAULT_ALLOWED_COMMANDS, DEFAULT_DISALLOWED_COMMANDS, Runner\n"
        "import djangocommand\n"
        "extended = DEFAULT_ALLOWED_COMMANDS + ('x',)\n"
        "print(sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')))\n"
        "print(type(extended).__name__, extended[-1], callable(djangocommand.is_command_allowed))\n"
    )
    result = run([TEST_PYTHON, "-c", code], tmp_path, child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "tuple x True"]


# --- the settings variants (shared vectors) ----------------------------------------


def test_vectors_carry_the_seed_snippets_verbatim():
    blocks = "\n".join(seed_python_blocks())
    seed_cases = [case for case in VECTORS["cases"] if case["seed"]]
    assert len(seed_cases) == 7
    for case in seed_cases:
        assert case["django_settings"] in blocks, case["name"]
    assert PERMISSIONS_SNIPPET in blocks
    assert OPTIONAL_SNIPPET in blocks


@pytest.mark.parametrize(
    "case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]]
)
def test_settings_variant(case, tmp_path):
    check_variant(evaluate_variant(TEST_PYTHON, tmp_path, case, pythonpath=True), case)


def run_permissions_snippet(python, project: Path, pythonpath: bool) -> None:
    result = run(
        [python, "-c", SNIPPET_RUNNER, PERMISSIONS_SNIPPET],
        project,
        child_env(pythonpath, DJANGO_SETTINGS_MODULE="variant_settings"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["checks"]) == 2
    for comment, got in report["checks"]:
        assert tuple(got) == ast.literal_eval(comment)
    assert report["final_type"] == "frozenset"
    assert report["final_is_default"]


def test_seed_permission_snippet_returns_what_its_comments_say(tmp_path):
    run_permissions_snippet(TEST_PYTHON, make_project(tmp_path, ""), pythonpath=True)


@needs_tomllib
def test_seed_optional_settings_become_the_supervisor_config(tmp_path):
    project = make_project(
        tmp_path / "site", 'DJANGOCOMMAND_API_KEY = "dc_your_api_key_here"\n'
    )
    with (project / "variant_settings.py").open("a") as settings:
        settings.write(OPTIONAL_SNIPPET)
    code = (
        "import django; django.setup()\n"
        "from djangocommand import Runner\n"
        "print(Runner.from_settings().config_text())\n"
    )
    result = run(
        [TEST_PYTHON, "-c", code],
        project,
        child_env(DJANGO_SETTINGS_MODULE="variant_settings"),
    )
    assert result.returncode == 0, result.stderr
    assert "dc_your_api_key_here" not in result.stdout
    config = tomllib.loads(result.stdout)
    assert config["server"] == {
        "url": "https://app.djangocommand.com",
        "heartbeat_interval": 30,
        "request_timeout": 30,
        "max_retries": 3,
        "allow_http_hosts": ["localhost", "127.0.0.1", "::1"],
    }
    assert config["django"] == {
        "project_dir": str(project),
        "settings_module": "variant_settings",
        "python": TEST_PYTHON,
    }
    assert config["runner"] == {"state_dir": str(project / ".djangocommand")}
    assert config["policy"]["mode"] == "allowlist"
    assert config["policy"]["allowed_commands"] == list(
        dict.fromkeys(DEFAULTS["allowed"])
    )


@needs_tomllib
@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_the_ca_bundle_requests_would_use_is_trusted_too(tmp_path, variable):
    """A project that made the published runner (requests) trust a private
    CA with REQUESTS_CA_BUNDLE needs nothing more: it becomes server.ca_file.
    A directory (requests takes one too) cannot be a ca_file: left out."""
    project = make_project(tmp_path / "site", 'DJANGOCOMMAND_API_KEY = "dc_x"\n')
    bundle = tmp_path / "private-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    code = (
        "import django; django.setup()\n"
        "from djangocommand import Runner\n"
        "print(Runner.from_settings().config_text())\n"
    )
    for value, expected in ((bundle, str(bundle)), (tmp_path, None)):
        result = run(
            [TEST_PYTHON, "-c", code],
            project,
            child_env(
                DJANGO_SETTINGS_MODULE="variant_settings", **{variable: str(value)}
            ),
        )
        assert result.returncode == 0, result.stderr
        assert tomllib.loads(result.stdout)["server"].get("ca_file") == expected


# --- bad settings ------------------------------------------------------------------

BAD_SETTINGS = {
    "missing key": ("", "DJANGOCOMMAND_API_KEY is required in Django settings."),
    "no dc_ prefix": (
        'DJANGOCOMMAND_API_KEY = "sk_live_123"\n',
        'DJANGOCOMMAND_API_KEY must start with "dc_". Check your API key format.',
    ),
    "heartbeat 2": (
        'DJANGOCOMMAND_API_KEY = "dc_x"\nDJANGOCOMMAND_HEARTBEAT_INTERVAL = 2\n',
        "DJANGOCOMMAND_HEARTBEAT_INTERVAL must be at least 5 seconds. Got: 2",
    ),
    "allowlist as a string": (
        "DJANGOCOMMAND_API_KEY = \"dc_x\"\nDJANGOCOMMAND_ALLOWED_COMMANDS = ('migrate')\n",
        (
            "DJANGOCOMMAND_ALLOWED_COMMANDS must be a tuple or list, not a string. "
            "Use (\"command_name\",) with a trailing comma for single items. Got: 'migrate'"
        ),
    ),
    "metadata-only as a string": (
        'DJANGOCOMMAND_API_KEY = "dc_x"\nDJANGOCOMMAND_METADATAONLY_COMMANDS = "dumpdata"\n',
        "DJANGOCOMMAND_METADATAONLY_COMMANDS must be a tuple or list, not a string.",
    ),
    "plain HTTP to a remote host": (
        'DJANGOCOMMAND_API_KEY = "dc_x"\nDJANGOCOMMAND_SERVER_URL = "http://example.com"\n',
        (
            "DJANGOCOMMAND_SERVER_URL must use HTTPS. Got: http://example.com. "
            'To allow HTTP, add "example.com" to DJANGOCOMMAND_ALLOW_HTTP_HOSTS.'
        ),
    ),
    "blocklist switch as a string": (
        'DJANGOCOMMAND_API_KEY = "dc_x"\nDJANGOCOMMAND_USE_BLOCKLIST = "False"\n',
        "DJANGOCOMMAND_USE_BLOCKLIST must be True or False. Got: 'False'",
    ),
}


@pytest.mark.parametrize("variant", BAD_SETTINGS, ids=list(BAD_SETTINGS))
def test_bad_setting_stops_start_with_its_message(variant, tmp_path):
    settings_text, message = BAD_SETTINGS[variant]
    project = make_project(tmp_path / "site", settings_text)
    result = manage(TEST_PYTHON, project, "start", env=child_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"CommandError: Configuration error: {message}" in result.stderr
    # Refused before anything was written or started.
    assert not (project / ".djangocommand" / "dc.toml").exists()


def test_string_list_is_a_system_check_error_and_typos_a_warning(tmp_path):
    project = make_project(
        tmp_path / "site",
        "DJANGOCOMMAND_DISALLOWED_COMMANDS = 'shell'\nDJANGOCOMMAND_ALOWED_COMMANDS = ()\n",
    )
    result = run([TEST_PYTHON, "manage.py", "check"], project, child_env())
    assert result.returncode == 1
    assert "djangocommand.E001" in result.stderr
    assert (
        "DJANGOCOMMAND_DISALLOWED_COMMANDS must be a tuple or list, not a string"
        in (result.stderr)
    )
    assert "djangocommand.W001" in result.stderr
    assert (
        "DJANGOCOMMAND_ALOWED_COMMANDS is not a DjangoCommand setting" in result.stderr
    )
    # The helpers refuse to guess too (the published runner split it into letters).
    code = "import django; django.setup()\nfrom djangocommand import is_command_allowed\nis_command_allowed('s')\n"
    result = run(
        [TEST_PYTHON, "-c", code],
        project,
        child_env(DJANGO_SETTINGS_MODULE="variant_settings"),
    )
    assert result.returncode == 1
    assert (
        "ImproperlyConfigured: DJANGOCOMMAND_DISALLOWED_COMMANDS must be a tuple"
        in result.stderr
    )


# --- dc.toml and the environment ---------------------------------------------------


@needs_tomllib
@pytest.mark.parametrize(
    "text",
    [
        "plain",
        'quote " and backslash \\ and \\n literally',
        "newline\nand\ttab\rand\fform\bfeed",
        "control \x00\x01\x1f and \x7f",
        "unicode é ü 𝄞 日本",
        "/path/with spaces/and'single'quotes",
    ],
)
def test_toml_strings_read_back_exactly(text):
    document = supervisor_config.dump_toml({"t": {"s": text, "l": [text, "x"]}})
    assert tomllib.loads(document) == {"t": {"s": text, "l": [text, "x"]}}


@needs_tomllib
def test_toml_values_and_keys():
    values = {
        "int": 30,
        "negative": -1,
        "float": 1.5,
        "whole float": 2.0,
        "big": 1e20,
        "true": True,
        "false": False,
        "empty": [],
    }
    document = supervisor_config.dump_toml(
        {"server": values, "odd table.name": {"k": 1}}
    )
    assert tomllib.loads(document) == {"server": values, "odd table.name": {"k": 1}}
    assert "true = true" in document  # a bool is not written as 1
    with pytest.raises(ValueError):
        supervisor_config.toml_string("lone surrogate \udcff")
    with pytest.raises(TypeError):
        supervisor_config.toml_value([1, 2])


def test_config_file_and_state_dir_are_private(tmp_path):
    state = runner_module.StateDir(tmp_path / "state")
    (tmp_path / "state").mkdir(mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    path = state.write_config("[server]\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert [p.name for p in state.path.iterdir()] == ["dc.toml"]  # no temporary left


def test_environment_carries_the_key_and_drops_settings_owned_overrides(monkeypatch):
    monkeypatch.setenv("DJANGOCOMMAND_API_KEY", "dc_stale")
    monkeypatch.setenv("DCSUPERVISOR_POLICY__MODE", "blocklist")
    monkeypatch.setenv("DCSUPERVISOR_SERVER__URL", "http://elsewhere")
    monkeypatch.setenv("DCSUPERVISOR_RUNNER__STATE_DIR", "/tmp/elsewhere")
    monkeypatch.setenv("DCSUPERVISOR_WORKER__ISOLATION", "spawn")
    env = runner_module.supervisor_environment("dc_from_settings")
    assert env["DJANGOCOMMAND_API_KEY"] == "dc_from_settings"
    assert env["DCSUPERVISOR_WORKER__ISOLATION"] == "spawn"
    for name in ("DCSUPERVISOR_POLICY__MODE", "DCSUPERVISOR_SERVER__URL"):
        assert name not in env
    assert "DCSUPERVISOR_RUNNER__STATE_DIR" not in env


def test_state_dir_defaults_to_the_project_and_follows_the_setting(tmp_path):
    from types import SimpleNamespace

    state_dir_for = runner_module.state_dir_for
    assert (
        state_dir_for(SimpleNamespace(), tmp_path).path == tmp_path / ".djangocommand"
    )
    relative = SimpleNamespace(DJANGOCOMMAND_STATE_DIR="var/runner")
    assert state_dir_for(relative, tmp_path).path == tmp_path / "var" / "runner"
    absolute = SimpleNamespace(DJANGOCOMMAND_STATE_DIR=tmp_path / "elsewhere")
    assert state_dir_for(absolute, Path("/srv")).path == tmp_path / "elsewhere"


def test_verbosity_maps_to_supervisor_flags():
    assert [runner_module.verbosity_flags(v) for v in range(4)] == [
        ["-qq"],
        [],
        ["-v"],
        ["-vv"],
    ]


# --- process control against stand-in supervisors -----------------------------------

# Takes the lock like dcsupervisor (flock, then its pid and a newline), records
# how it was called, and runs until a signal ends it (or ignores SIGTERM).
FAKE_SUPERVISOR = """\
#!{python}
import fcntl, os, signal, sys, time
config = sys.argv[sys.argv.index("--config") + 1]
state = os.path.dirname(config)
with open(os.path.join(state, "fake-calls"), "a") as calls:
    calls.write(repr((sys.argv, os.environ.get("DJANGOCOMMAND_API_KEY"))) + "\\n")
if os.environ.get("FAKE_FAIL"):
    print("fake supervisor: cannot start", file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open(os.path.join(state, "dcsupervisor.lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{{os.getpid()}}\\n".encode())
while True:
    time.sleep(1)
"""


@pytest.fixture
def fake_site(tmp_path):
    """A project whose runner binary is the stand-in (DCSUPERVISOR_BIN wins
    over a real dcsupervisor next to the interpreter)."""
    fake = tmp_path / "fake-dcsupervisor"
    fake.write_text(FAKE_SUPERVISOR.format(python=TEST_PYTHON))
    fake.chmod(0o755)
    project = make_project(
        tmp_path / "site",
        f'DJANGOCOMMAND_API_KEY = "{API_KEY}"\nDJANGOCOMMAND_SERVER_URL = "http://127.0.0.1:9"\n',
    )
    # PATH without a real dcsupervisor, so the stand-in is the one found.
    env = child_env(DCSUPERVISOR_BIN=str(fake), PATH="/usr/bin:/bin")
    yield project, env
    status = json.loads(
        manage(TEST_PYTHON, project, "status", "--json", env=env).stdout
    )
    if status["pid"]:
        os.kill(status["pid"], signal.SIGKILL)


def status_of(project: Path, env: dict, python=TEST_PYTHON) -> dict:
    result = manage(python, project, "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def started_pid(result: subprocess.CompletedProcess) -> int:
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Runner started in background \(PID: (\d+)\)", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def test_start_detached_status_stop_with_a_stand_in(fake_site):
    project, env = fake_site
    state = project / ".djangocommand"
    assert status_of(project, env)["status"] == "stopped"

    pid = started_pid(manage(TEST_PYTHON, project, "start", "-d", "-v", "2", env=env))
    status = status_of(project, env)
    assert status["status"] == "running"
    assert status["pid"] == pid
    assert status["config"] == str(state / "dc.toml")
    assert status["log"] == str(state / "dcsupervisor.log")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "dc.toml").stat().st_mode) == 0o600

    # The key came through the environment only.
    (argv, key), *_ = [
        ast.literal_eval(line)
        for line in (state / "fake-calls").read_text().splitlines()
    ]
    assert key == API_KEY
    log = str(state / "dcsupervisor.log")
    rotation = ["--log-max-bytes", "10485760", "--log-keep", "5"]
    assert argv[1:] == [
        "--config",
        str(state / "dc.toml"),
        "-v",
        *["--log-file", log, *rotation],
        "run",
    ]
    assert API_KEY not in (state / "dc.toml").read_text()

    again = manage(TEST_PYTHON, project, "start", "-d", env=env)
    assert again.returncode == 1
    assert (
        f"Runner already running (PID: {pid}). Use 'stop' first or 'restart'."
        in again.stderr
    )

    text = manage(TEST_PYTHON, project, "status", env=env).stdout
    assert "Runner status: running" in text and f"PID: {pid}" in text

    stopped = manage(TEST_PYTHON, project, "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"Stopping runner (PID: {pid})..." in stopped.stdout
    assert "Runner stopped" in stopped.stdout
    status = status_of(project, env)
    assert (status["status"], status["pid"], status["started_at"]) == (
        "stopped",
        None,
        None,
    )
    assert (
        manage(TEST_PYTHON, project, "stop", env=env).stdout.strip()
        == "Runner not running"
    )
    # A stale lock file (its pid gone, nobody holding it) reads as stopped.
    assert (state / "dcsupervisor.lock").read_text() == f"{pid}\n"
    assert status_of(project, env)["status"] == "stopped"


def test_restart_gives_a_new_pid_with_a_stand_in(fake_site):
    project, env = fake_site
    first = started_pid(manage(TEST_PYTHON, project, "start", "-d", env=env))
    restarted = manage(TEST_PYTHON, project, "restart", "-d", env=env)
    second = started_pid(restarted)
    assert f"Stopping runner (PID: {first})..." in restarted.stdout
    assert second != first
    assert status_of(project, env)["pid"] == second


def test_stop_times_out_then_force_kills(fake_site):
    project, env = fake_site
    stubborn = {**env, "FAKE_IGNORE_TERM": "1"}
    pid = started_pid(manage(TEST_PYTHON, project, "start", "-d", env=stubborn))
    result = manage(TEST_PYTHON, project, "stop", "--timeout", "1", env=env)
    assert result.returncode == 1
    assert (
        "Runner did not stop within 1s. Use --force to send SIGKILL." in result.stderr
    )
    assert status_of(project, env)["pid"] == pid
    result = manage(TEST_PYTHON, project, "stop", "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert f"Force stopping runner (PID: {pid})..." in result.stdout
    assert status_of(project, env)["status"] == "stopped"


def test_detached_start_reports_a_supervisor_that_fails(fake_site):
    project, env = fake_site
    result = manage(TEST_PYTHON, project, "start", "-d", env={**env, "FAKE_FAIL": "1"})
    assert result.returncode == 1
    assert "exited with status 3 while starting" in result.stderr
    assert "fake supervisor: cannot start" in result.stderr  # the log's tail


def test_foreground_start_becomes_the_supervisor(fake_site):
    project, env = fake_site
    process = subprocess.Popen(
        [TEST_PYTHON, "manage.py", "djangocommand", "start"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # exec: the same process, so systemd's or Docker's signals reach it.
        wait_for(
            lambda: status_of(project, env)["pid"] == process.pid, TIMEOUT, "the lock"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()


# --- end to end: the wheel in a fresh venv ------------------------------------------


# Where scripts/test (fast profile) or scripts/wheels (release set) put the
# wheels to test; when unset, the fixture builds one itself (fast profile).
WHEEL_DIR_ENV = "DCSUPERVISOR_TEST_WHEEL_DIR"


def build_test_wheel(out: Path) -> Path:
    """The wheel, built like scripts/test does: maturin with cargo's dev
    profile (target/debug, shared with `cargo test`) and stripped, which costs
    seconds once the tests are built instead of minutes of fat LTO."""
    build_env = child_env(False)
    build_env["PATH"] = os.pathsep.join(
        [str(Path(TEST_PYTHON).parent), build_env["PATH"]]
    )
    build = [TEST_PYTHON, "-m", "maturin", "build", "--profile", "dev", "--strip"]
    result = run([*build, "--out", out], ROOT, build_env, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return out


def path_without_cargo() -> str:
    """This PATH minus every directory holding cargo or rustc: the install
    must not be able to fall back to building from source."""
    kept = [
        entry
        for entry in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if entry
        and not any((Path(entry) / tool).exists() for tool in ("cargo", "rustc"))
    ]
    return os.pathsep.join(kept)


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    """The folder holding the djangocommand wheel under test."""
    given = os.environ.get(WHEEL_DIR_ENV)
    if given:
        wheels = Path(given)
    else:
        wheels = build_test_wheel(tmp_path_factory.mktemp("wheels"))
    assert list(wheels.glob("djangocommand-*.whl")), f"no wheel in {wheels}"
    return wheels


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory, wheel_dir) -> Path:
    """A fresh venv with djangocommand installed from a wheel, offline
    (`--no-index`), with no Rust toolchain on PATH."""
    work = tmp_path_factory.mktemp("wheel")
    wheels = wheel_dir
    # Django and its dependencies, from the registry (or pip's cache), into a
    # folder of their own: the install itself then needs no network.
    deps = work / "deps"
    download = [TEST_PYTHON, "-m", "pip", "download", "--quiet", "--dest", deps]
    download += ["--only-binary", ":all:", "--disable-pip-version-check"]
    result = run([*download, "Django>=4.2"], work, child_env(False), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    venv = work / "venv"
    result = run([TEST_PYTHON, "-m", "venv", venv], work, child_env(False))
    assert result.returncode == 0, result.stderr
    env = child_env(False, PATH=path_without_cargo())
    assert shutil.which("cargo", path=env["PATH"]) is None
    install = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    install += ["--disable-pip-version-check", "--no-index"]
    install += ["--find-links", wheels, "--find-links", deps, "djangocommand"]
    started = time.monotonic()
    result = run(install, work, env, timeout=600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    # A figure, not an assertion (no timed assertions): the target is 15 s.
    FIGURES.append(f"pip install of the wheel: {seconds:.1f} s (target <= 15 s)")
    return venv


def start_control_plane(workdir: Path) -> ControlPlane:
    """`dccontrol serve` on a free loopback port, logging to
    workdir/dccontrol.log; built first if missing: the fast layers need no
    Rust build, so a plain pytest run may not have one."""
    if not DCCONTROL.exists():
        build = run(
            ["cargo", "build", "--bin", "dccontrol"], ROOT, child_env(False), 900
        )
        assert build.returncode == 0, build.stderr[-5000:]
    return ControlPlane(workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=TIMEOUT)


E2E_SETTINGS = f"""\
import os

from demo_project.settings import *  # noqa: F403

from djangocommand import DEFAULT_ALLOWED_COMMANDS

INSTALLED_APPS = [*INSTALLED_APPS, "djangocommand"]  # noqa: F405
DJANGOCOMMAND_API_KEY = "{API_KEY}"
DJANGOCOMMAND_SERVER_URL = os.environ["DJANGOCOMMAND_SERVER_URL"]
DJANGOCOMMAND_HEARTBEAT_INTERVAL = 5
DJANGOCOMMAND_ALLOWED_COMMANDS = DEFAULT_ALLOWED_COMMANDS + ("noop",)
"""


# In the installed venv: the commands the supervisor itself would sync under
# a variant's settings, next to those is_command_allowed() lets through.
SUPERVISOR_AGREES = """\
import json, subprocess
import django

django.setup()
from django.core.management import get_commands
from djangocommand import Runner, is_command_allowed

runner = Runner.from_settings()
runner.write_config()
listing = subprocess.run(
    [runner.binary, "--config", str(runner.state.config_path), "commands", "--json"],
    env=runner.environment(), capture_output=True, text=True, check=True,
)
print(json.dumps({
    "supervisor": sorted(c["name"] for c in json.loads(listing.stdout)["commands"]),
    "python": sorted(name for name in get_commands() if is_command_allowed(name)[0]),
}))
"""


def check_supervisor_agrees(venv_python, project: Path, env: dict) -> None:
    """Every vector's settings, applied to the demo project's real commands:
    the supervisor syncs exactly what is_command_allowed() allows."""
    for index, case in enumerate(VECTORS["cases"]):
        module = f"agree_settings_{index}"
        (project / f"{module}.py").write_text(
            "from e2e_settings import *  # noqa: F403\n"
            f"DJANGOCOMMAND_STATE_DIR = 'state-{index}'\n"
            # The variant's own policy, not e2e_settings' allowlist.
            "del DJANGOCOMMAND_ALLOWED_COMMANDS\n" + case["django_settings"]
        )
        result = run(
            [venv_python, "-c", SUPERVISOR_AGREES],
            project,
            {**env, "DJANGO_SETTINGS_MODULE": module},
        )
        assert result.returncode == 0, f"{case['name']}:\n{result.stderr}"
        report = json.loads(result.stdout)
        assert report["supervisor"] == report["python"], case["name"]
        assert "djangocommand" not in report["supervisor"]


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def assert_key_not_exposed(pid: int, state: Path) -> None:
    for member in process_tree(pid):
        try:
            cmdline = Path(f"/proc/{member}/cmdline").read_bytes()
        except OSError:
            continue
        assert API_KEY.encode() not in cmdline, member
    for path in state.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_installed_wheel_end_to_end(installed_venv, tmp_path, record_property):
    for figure in FIGURES:
        record_property("figure", figure)
    venv_python = installed_venv / "bin" / "python"
    binary = installed_venv / "bin" / "dcsupervisor"
    # Only the runner ships; dccontrol is a development tool.
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert not (installed_venv / "bin" / "dccontrol").exists()
    # One version for both, Cargo.toml's.
    cargo_version = re.search(
        r'^version = "(.+)"', (ROOT / "Cargo.toml").read_text(), re.MULTILINE
    )[1]
    version = run(
        [venv_python, "-c", "import djangocommand; print(djangocommand.__version__)"],
        tmp_path,
        child_env(False),
    )
    assert version.stdout.strip() == cargo_version, version.stderr
    assert (
        cargo_version in run([binary, "--version"], tmp_path, child_env(False)).stdout
    )

    # The seed's snippets against the installed package, not the source tree.
    for index, case in enumerate(VECTORS["cases"]):
        report = evaluate_variant(
            venv_python, tmp_path / f"variant{index}", case, False
        )
        assert "site-packages" in report["package"], report["package"]
        check_variant(report, case)
    run_permissions_snippet(venv_python, tmp_path / "variant0", pythonpath=False)

    project = tmp_path / "project"
    shutil.copytree(
        DEMO_DIR,
        project,
        ignore=shutil.ignore_patterns(
            "__pycache__", "*.sqlite3", "dc.toml", ".dcsupervisor", ".djangocommand"
        ),
    )
    (project / "e2e_settings.py").write_text(E2E_SETTINGS)
    state = project / ".djangocommand"
    plane = start_control_plane(tmp_path)
    env = child_env(
        False,
        DJANGO_SETTINGS_MODULE="e2e_settings",
        DJANGOCOMMAND_SERVER_URL=plane.url,
        DEMO_DB_PATH=str(tmp_path / "demo.sqlite3"),
    )
    try:
        check_supervisor_agrees(venv_python, project, env)
        assert status_of(project, env, venv_python)["status"] == "stopped"
        pid = started_pid(manage(venv_python, project, "start", "-d", env=env))
        status = status_of(project, env, venv_python)
        assert (status["status"], status["pid"]) == ("running", pid)
        assert Path(f"/proc/{pid}/exe").resolve() == binary.resolve()

        execution = plane.finished("noop")
        assert (execution["status"], execution["exit_code"]) == ("success", 0)
        refused = plane.finished("shell")
        assert refused["status"] == "failed"
        output = "".join(s["content"] for c in refused["chunks"] for s in c["segments"])
        assert "Reason: not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist" in output
        assert "in your Django settings" in output  # configured_in = "django-settings"
        assert_key_not_exposed(pid, state)

        once = (
            "import django; django.setup()\n"
            "from djangocommand import Runner\n"
            "runner = Runner.from_settings()\n"
            "print(runner.run_once(), runner.binary)\n"
        )
        result = run([venv_python, "-c", once], project, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", str(binary)]

        restarted = started_pid(manage(venv_python, project, "restart", "-d", env=env))
        assert restarted != pid
        assert status_of(project, env, venv_python)["pid"] == restarted
        assert plane.finished("noop")["status"] == "success"
        assert_key_not_exposed(restarted, state)

        result = manage(venv_python, project, "stop", env=env)
        assert result.returncode == 0, result.stderr
        assert "Runner stopped" in result.stdout
        assert status_of(project, env, venv_python)["status"] == "stopped"

        # runner.run() blocks until stopped; SIGTERM to it is passed on.
        blocking = (
            "import django; django.setup()\n"
            "from djangocommand import Runner\n"
            "Runner.from_settings().run()\n"
            "print('returned')\n"
        )
        process = subprocess.Popen(
            [venv_python, "-c", blocking],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            supervisor = wait_for(
                lambda: status_of(project, env, venv_python)["pid"],
                TIMEOUT,
                "run()'s supervisor",
            )
            assert supervisor in process_tree(process.pid)
            assert plane.finished("noop")["status"] == "success"
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=TIMEOUT)
            assert (process.returncode, out.strip()) == (0, "returned")
            assert status_of(project, env, venv_python)["status"] == "stopped"
        finally:
            process.kill()
            process.wait()
    finally:
        leftover = status_of(project, env, venv_python)["pid"]
        if leftover:
            os.kill(leftover, signal.SIGKILL)
        plane.close()


# --- finding the binary -------------------------------------------------------------

FIND_BINARY = "from djangocommand.runner import find_binary; print(find_binary())"


def test_missing_binary_error_says_where_it_looked(tmp_path):
    result = run(
        [TEST_PYTHON, "-c", FIND_BINARY], tmp_path, child_env(PATH="/usr/bin:/bin")
    )
    assert result.returncode == 1
    assert "RunnerError: cannot find the dcsupervisor executable. Looked in:" in (
        result.stderr
    )
    scripts = run(
        [TEST_PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"],
        tmp_path,
        child_env(),
    ).stdout.strip()
    for place in (
        f"{scripts} (the interpreter's scripts directory)",
        "(the user scripts directory)",
        f"{PACKAGE_SRC / 'bin'} (bin/ beside the package (pip --target))",
        f"{Path(TEST_PYTHON).parent} (beside the interpreter)",
        "PATH=/usr/bin:/bin",
        "DCSUPERVISOR_BIN is not set",
    ):
        assert place in result.stderr, place


def base_python() -> str | None:
    """The interpreter the test venv was made from, if it has pip: `--user`
    installs are refused inside a venv."""
    code = "import sys, os; print(os.path.join(sys.base_prefix, 'bin', 'python3'))"
    base = run([TEST_PYTHON, "-c", code], ROOT, child_env(False)).stdout.strip()
    has_pip = run([base, "-m", "pip", "--version"], ROOT, child_env(False))
    return base if has_pip.returncode == 0 else None


@pytest.mark.slow
def test_binary_found_after_target_and_user_installs(wheel_dir, tmp_path):
    """pip's --target and --user put the binary where no PATH or interpreter
    directory points; the package still finds its own."""
    pip = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pip += ["--no-index", "--no-deps", "--find-links", wheel_dir]
    target = tmp_path / "target"
    result = run(
        [TEST_PYTHON, *pip, "--target", target, "djangocommand"], tmp_path, child_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env = child_env(False, PYTHONPATH=str(target), PATH="/usr/bin:/bin")
    found = run([TEST_PYTHON, "-c", FIND_BINARY], tmp_path, env)
    assert found.stdout.strip() == str(target / "bin" / "dcsupervisor"), found.stderr

    base = base_python()
    if base is None:
        pytest.skip("the base interpreter has no pip: --user not tested")
    user_base = tmp_path / "userbase"
    env = child_env(False, PYTHONUSERBASE=str(user_base), PATH="/usr/bin:/bin")
    result = run([base, *pip, "--user", "djangocommand"], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    found = run([base, "-c", FIND_BINARY], tmp_path, env)
    assert found.stdout.strip() == str(user_base / "bin" / "dcsupervisor"), found.stderr
