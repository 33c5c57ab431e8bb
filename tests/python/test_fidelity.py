"""Fidelity: a command run through dcsupervisor behaves as `python manage.py`.

Every case of CASES runs three ways on examples/fidelity (django-extensions
and django-reversion installed from PyPI by scripts/venv), each on a fresh
copy of the same SQLite database:

* `python manage.py <args>`, the reference, in a directory of its own;
* `dcsupervisor exec <args>`, in another directory of its own;
* the runner: the case queued on a real `dccontrol`, run by one
  `dcsupervisor` (one worker for every case), in its project directory.

stdout bytes, stderr bytes, the exit code, the database (an SQL dump, times
masked) and the files the command left in its directory are compared. A
difference fails the test unless docs/fidelity.md lists it, with its reason,
in its table of allowed differences; a listed difference that no longer
happens fails too, so the list stays true. The reference and `exec` run in
parallel; the runner's cases run one at a time (they share its project
directory) while those two go on.
"""

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
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
_TIMES = re.compile(rb"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?")


def sql_dump(path: Path) -> str:
    """The database as SQL, with times masked (migrations record when they
    were applied, revisions when they were made)."""
    if not path.exists():
        return "<no database>"
    with sqlite3.connect(path) as connection:
        text = "\n".join(connection.iterdump())
    connection.close()
    return _TIMES.sub(b"<time>", text.encode()).decode()


def left_files(directory: Path, before: set[str]) -> dict[str, str]:
    """What a command created in its directory: databases as SQL, the rest as text."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.name in before or path.name == "db.sqlite3":
            continue
        if path.suffix == ".sqlite3":
            found[path.name] = sql_dump(path)
        else:
            found[path.name] = path.read_bytes().decode(errors="backslashreplace")
    return found


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("DCSUPERVISOR_", "DJANGOCOMMAND_", "DJANGO_", "PYTHON", "LC_")
        )
    }
    env.update(LANG="C.UTF-8", NO_COLOR="1")
    return env


def fresh_dir(parent: Path, name: str, template_db: Path) -> Path:
    directory = parent / name
    directory.mkdir()
    shutil.copy(template_db, directory / "db.sqlite3")
    return directory


def run_local(argv: list[str], the_case: Case, directory: Path) -> Outcome:
    before = {p.name for p in directory.iterdir()}
    done = subprocess.run(
        argv + list(the_case.args),
        cwd=directory,
        input=the_case.stdin,
        capture_output=True,
        env=base_env() | dict(the_case.env),
        timeout=TIMEOUT,
        check=False,
    )
    db = sql_dump(directory / "db.sqlite3")
    return Outcome(
        done.stdout, done.stderr, done.returncode, db, left_files(directory, before)
    )


# --- the runner ------------------------------------------------------------


class Runner:
    """One dcsupervisor on a copy of the project, fed through dccontrol."""

    def __init__(self, workdir: Path, template_db: Path):
        self.workdir = workdir
        self.template_db = template_db
        self.project = workdir / "project"
        shutil.copytree(
            PROJECT, self.project, ignore=shutil.ignore_patterns("__pycache__")
        )
        self.project_files = {p.name for p in self.project.iterdir()}
        self.plane = ControlPlane(
            workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=TIMEOUT
        )
        config = runner_config(self.plane.url, self.project)
        self.process = start_supervisor(DCSUPERVISOR, workdir, config)
        wait_for(self._synced, TIMEOUT, "the runner's first sync")

    def _synced(self) -> bool:
        assert self.process.poll() is None, read_logs(self.workdir)
        return any(r["path"].endswith("/commands/sync/") for r in self.plane.requests())

    def run(self, the_case: Case) -> Outcome:
        for path in self.project.iterdir():
            if path.name not in self.project_files:
                path.unlink()
        shutil.copy(self.template_db, self.project / "db.sqlite3")
        execution_id = self.plane.queue(the_case.args[0], shlex.join(the_case.args[1:]))
        ended = wait_for(
            lambda: self.plane.ended(execution_id), TIMEOUT, the_case.name, 0.05
        )
        return Outcome(
            self._stream(ended, is_stderr=False),
            self._stream(ended, is_stderr=True),
            ended["exit_code"],
            sql_dump(self.project / "db.sqlite3"),
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
        stop_process(self.process)
        self.plane.close()


def runner_config(url: str, project: Path) -> str:
    return f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}

[django]
project_dir = {json.dumps(str(project))}
settings_module = {json.dumps(SETTINGS)}
python = {json.dumps(str(PYTHON))}

[policy]
mode = "blocklist"
disallowed_commands = []

[runner]
max_concurrent = 4
poll_interval = 0.05
output_flush_interval = 0.05
"""


def exec_config(directory: Path) -> Path:
    path = directory / "dc.toml"
    path.write_text(
        f"[django]\nproject_dir = {json.dumps(str(PROJECT))}\n"
        f"settings_module = {json.dumps(SETTINGS)}\npython = {json.dumps(str(PYTHON))}\n\n"
        '[policy]\nmode = "blocklist"\ndisallowed_commands = []\n'
    )
    return path


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


# --- the test ----------------------------------------------------------------


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated database with a cache table, two notes and their revisions."""
    directory = tmp_path_factory.mktemp("template")
    for args in (
        ["migrate", "-v", "0"],
        ["createcachetable"],
        ["note_add", "first", "--body", "the first note"],
        ["note_add", "second"],
    ):
        subprocess.run(
            [str(PYTHON), str(PROJECT / "manage.py"), *args],
            cwd=directory,
            env=base_env(),
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
    return directory / "db.sqlite3"


def test_cases_are_many_and_named_once():
    names = [c.name for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)
    known = {c.name for c in CASES} | {"concurrent"}
    unknown = {key[0] for key in allowed_differences()} - known
    assert not unknown, f"docs/fidelity.md lists unknown cases: {unknown}"


def test_every_invocation_matches_manage_py(tmp_path, template_db):
    config = exec_config(tmp_path)
    dcsupervisor_exec = [str(DCSUPERVISOR), "--config", str(config), "exec"]
    manage_py = [str(PYTHON), str(PROJECT / "manage.py")]
    (tmp_path / "runner").mkdir()
    runner = Runner(tmp_path / "runner", template_db)
    results: dict[tuple[str, str], Outcome] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            futures = {}
            for c in CASES:
                for way, argv in (
                    ("manage.py", manage_py),
                    ("exec", dcsupervisor_exec),
                ):
                    directory = fresh_dir(tmp_path, f"{c.name}.{way}", template_db)
                    futures[(c.name, way)] = pool.submit(run_local, argv, c, directory)
            for c in CASES:
                if c.runner:
                    results[(c.name, "runner")] = runner.run(c)
            for key, future in futures.items():
                results[key] = future.result()
    except BaseException:
        print(read_logs(tmp_path / "runner", tail=5000), file=sys.stderr)
        raise
    finally:
        runner.close()
    check_against_the_list(results, allowed_differences())


def check_against_the_list(results, allowed) -> None:
    problems = []
    for c in CASES:
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


def test_concurrent_jobs_against_one_database(tmp_path, template_db):
    """Four note_add at once on one database: the same notes and exit codes
    whichever way they run (SQLite serialises the writers)."""
    titles = [f"concurrent-{i}" for i in range(4)]
    config = exec_config(tmp_path)
    ways = {
        "manage.py": [str(PYTHON), str(PROJECT / "manage.py")],
        "exec": [str(DCSUPERVISOR), "--config", str(config), "exec"],
    }
    seen = {}
    for way, argv in ways.items():
        directory = fresh_dir(tmp_path, way, template_db)
        cases = [case("concurrent", "note_add", title) for title in titles]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            outcomes = list(
                pool.map(lambda c, d=directory, a=argv: run_local(a, c, d), cases)
            )
        with sqlite3.connect(directory / "db.sqlite3") as connection:
            notes = connection.execute(
                "SELECT title FROM notes_note ORDER BY title"
            ).fetchall()
            versions = connection.execute(
                "SELECT count(*) FROM reversion_version"
            ).fetchone()
        connection.close()
        seen[way] = (
            sorted(o.exit for o in outcomes),
            sorted(o.stdout for o in outcomes),
            notes,
            versions,
        )
    assert seen["exec"] == seen["manage.py"]
    assert seen["manage.py"][0] == [0, 0, 0, 0]
