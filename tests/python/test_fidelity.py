"""Fidelity: a command run through dcsupervisor behaves as `python manage.py`.

The cases here run on examples/fidelity, a project with real third-party apps
installed from PyPI by scripts/venv (django-extensions, and django-reversion
with its own models, migrations and commands), on SQLite (every case) and on
PostgreSQL (the database cases). How each case runs three ways and is
compared, and how docs/fidelity.md's list of allowed differences is read, is
fidelity.py's; test_fidelity_wagtail.py does the same on a Wagtail site.
"""

import concurrent.futures
import dataclasses
import json
import re

import fidelity
import pytest
from fidelity import Case, Outcome, case

pytestmark = fidelity.NEEDS_BINARIES

SETTINGS = "fidelity_site.settings"

FIXTURE = json.dumps(
    [{"model": "notes.note", "pk": 50, "fields": {"title": "loaded", "body": "-"}}]
).encode()


# What interpreter shutdown does after the command: wait for the threads it
# left (and an executor's queued work), run the finalizers of what it kept.
THREAD_AT_EXIT = (
    "import threading, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()\n"
    "print('main done')"
)
EXECUTOR_AT_EXIT = (
    "import time\n"
    "from concurrent.futures import ThreadPoolExecutor\n"
    "ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.2), print('task done')))\n"
    "print('main done')"
)
TEMPDIR_AT_EXIT = (
    "import builtins, pathlib, tempfile\n"
    "builtins.kept = tempfile.TemporaryDirectory(dir='.')\n"
    "pathlib.Path(builtins.kept.name, 'scratch').write_text('removed at exit')"
)

CASES: list[Case] = [
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
    case("thread-at-exit", "shell", "-c", THREAD_AT_EXIT),
    case("executor-at-exit", "shell", "-c", EXECUTOR_AT_EXIT),
    case("tempdir-at-exit", "shell", "-c", TEMPDIR_AT_EXIT),
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


PROJECT = fidelity.Project(
    name="fidelity",
    settings=SETTINGS,
    cases=tuple(CASES),
    # What every case starts from: a migrated database with a cache table,
    # two notes and their revisions.
    template_steps=(
        ("migrate", "-v", "0"),
        ("createcachetable",),
        ("note_add", "first", "--body", "the first note"),
        ("note_add", "second"),
    ),
    database_cases=frozenset(DATABASE_CASES),
)


# Warnings: examples/fidelity with its `legacy` app, whose modules warn when
# imported (one by a system check, one by a command) and whose settings
# warn. A fresh manage.py prints them in every run that imports them.
LEGACY = dataclasses.replace(
    PROJECT,
    cases=(
        case("legacy-check", "check"),
        case("legacy-export", "legacy_export"),
        case("legacy-export-skip-checks", "legacy_export", "--skip-checks"),
        case("legacy-help-export", "help", "legacy_export"),
        case("legacy-help", "help"),
        case("legacy-shell-import", "shell", "-c", "import legacy.formats"),
        # After the others: none of their jobs removed the worker's directory.
        case("legacy-scratch", "legacy_scratch"),
    ),
    template_steps=(("migrate", "-v", "0"),),
    database_cases=frozenset(),
    env=(("FIDELITY_LEGACY", "1"),),
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    yield from fidelity.open_database(request.param, PROJECT, tmp_path_factory)


def test_cases_are_many_and_named_once():
    assert len(PROJECT.cases) >= 40
    both = dataclasses.replace(PROJECT, cases=PROJECT.cases + LEGACY.cases)
    fidelity.check_cases_are_named_once(both)


def test_every_invocation_matches_manage_py(tmp_path, database):
    fidelity.every_invocation_matches_manage_py(tmp_path, database)


def test_warnings_are_shown_as_manage_py_shows_them(tmp_path):
    """What the worker's set-up and warm-up imported warned then; each job
    shows those warnings where a fresh manage.py would (docs/fidelity.md)."""
    (tmp_path / "sqlite").mkdir()
    # The workers' scratch directories are left behind when a worker is
    # killed rather than exiting: in the test's directory, not in /tmp.
    (tmp_path / "tmp").mkdir()
    project = dataclasses.replace(
        LEGACY, env=LEGACY.env + (("TMPDIR", str(tmp_path / "tmp")),)
    )
    database = fidelity.SQLite(tmp_path / "sqlite", project)
    fidelity.every_invocation_matches_manage_py(tmp_path, database)


def test_concurrent_jobs_against_one_database(tmp_path, database):
    """Four note_add at once on one database: the same notes, revisions and
    exit codes whichever way they run."""
    cases = [case("concurrent", "note_add", f"concurrent-{i}") for i in range(4)]
    seen = {}
    config = fidelity.exec_config(tmp_path, PROJECT)
    for way, argv in fidelity.local_ways(config, PROJECT).items():
        directory, env = fidelity.fresh_dir(tmp_path, way, database)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = [
                pool.submit(fidelity.run_local, argv, c, directory, env, database)
                for c in cases
            ]
        outcomes = [future.result() for future in futures]
        seen[way] = summary(outcomes, database.dump(directory, env))
    (tmp_path / "runner").mkdir()
    runner = fidelity.Runner(tmp_path / "runner", database)
    try:
        outcomes = runner.run_at_once(cases)
        seen["runner"] = summary(outcomes, database.dump(runner.directory, runner.env))
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


def test_exec_runs_the_exit_handlers_of_the_import_at_its_end(tmp_path):
    """manage.py runs at its end the exit handlers its import registered (the
    legacy app's scratch directory removes itself); so does `exec`, whose
    worker runs that one job: the handlers are the job's, and run once."""
    (tmp_path / "sqlite").mkdir()
    database = fidelity.SQLite(tmp_path / "sqlite", LEGACY)
    config = fidelity.exec_config(tmp_path, LEGACY)
    scratch = case("legacy-scratch", "legacy_scratch")
    for way, argv in fidelity.local_ways(config, LEGACY).items():
        temporary = tmp_path / f"tmp-{way}"
        temporary.mkdir()
        directory, env = fidelity.fresh_dir(tmp_path, way, database)
        env = env | {"TMPDIR": str(temporary)}
        outcome = fidelity.run_local(argv, scratch, directory, env, database)
        assert outcome.exit == 0, (way, outcome.stderr)
        assert b"scratch directory: True" in outcome.stdout, (way, outcome.stdout)
        # The worker is killed once exec is done: give it no time to matter.
        assert sorted(p.name for p in temporary.iterdir()) == [], way
