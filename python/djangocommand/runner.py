"""Running the ``dcsupervisor`` binary for a Django project.

The supervisor does the work (heartbeats, command sync, executions through a
preloaded Django worker); this module turns the Django settings into its
``dc.toml``, finds the binary, and starts, inspects and stops it.

Where things are, for a project whose ``manage.py`` is in PROJECT:

* the state directory: ``PROJECT/.djangocommand`` (0700), or
  DJANGOCOMMAND_STATE_DIR;
* in it ``dc.toml`` (0600, rewritten at every start), ``dcsupervisor.log``
  (background mode's output) and ``dcsupervisor.lock``: the supervisor holds
  an exclusive flock on it while it runs and writes its pid into it, which is
  how ``status`` and ``stop`` find it, with no pid file to go stale.

Only the standard library is imported at the top: ``import djangocommand``
from ``settings.py`` reaches this module.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger("djangocommand")

BINARY_NAME = "dcsupervisor"
BINARY_ENV = "DCSUPERVISOR_BIN"
API_KEY_ENV = "DJANGOCOMMAND_API_KEY"
STATE_DIR_NAME = ".djangocommand"
LOCK_FILE = "dcsupervisor.lock"
CONFIG_FILE = "dc.toml"
LOG_FILE = "dcsupervisor.log"
#: Background mode's log is rotated by the supervisor past this size, keeping
#: this many old files (dcsupervisor.log.1 is the newest).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5

# DCSUPERVISOR_<SECTION>__<FIELD> variables override dc.toml. Those of the
# sections the Django settings own are dropped, so that an exported variable
# cannot quietly contradict the settings (and is_command_allowed); worker and
# runner tuning (DCSUPERVISOR_WORKER__ISOLATION, ...) still applies.
_SETTINGS_OWNED_ENV = (
    "DCSUPERVISOR_SERVER__",
    "DCSUPERVISOR_DJANGO__",
    "DCSUPERVISOR_POLICY__",
    "DCSUPERVISOR_RUNNER__STATE_DIR",
)

#: Seconds `start --detach` waits for the supervisor to take its lock.
START_TIMEOUT = 30.0
#: Seconds `stop` waits: the supervisor gives running executions
#: runner.shutdown_grace (30 s) and then worker.cancel_grace (5 s) to end.
STOP_TIMEOUT = 45.0
_POLL_INTERVAL = 0.05


class RunnerError(RuntimeError):
    """The supervisor could not be found, started or stopped."""


# --- where things are --------------------------------------------------------


def binary_candidates() -> list[tuple[str, Path]]:
    """Where a pip-installed dcsupervisor can be, in the order looked at, each
    with what it is: the scripts directory of the running interpreter's
    install scheme (a venv's or the system's bin/), the user scheme's (``pip
    install --user``), ``bin/`` beside the package (``pip install --target``),
    and the interpreter's own directory. The way ruff and uv find theirs."""
    places: list[tuple[str, Path]] = []
    scripts = sysconfig.get_path("scripts")
    if scripts:
        places.append(("the interpreter's scripts directory", Path(scripts)))
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        user_scripts = sysconfig.get_path("scripts", scheme=user_scheme)
        if user_scripts:
            places.append(("the user scripts directory", Path(user_scripts)))
    package_root = Path(__file__).resolve().parent.parent
    places.append(("bin/ beside the package (pip --target)", package_root / "bin"))
    if sys.executable:
        # Not resolved: a venv's bin/python is often a symlink to the base
        # interpreter, and the binary is in the venv's bin/.
        places.append(("beside the interpreter", Path(sys.executable).parent))
    return places


def find_binary() -> str:
    """The dcsupervisor executable: $DCSUPERVISOR_BIN when set (an explicit
    choice wins), else where pip installs it (binary_candidates), else on
    PATH. When it is nowhere, the error lists every place looked at."""
    from_env = os.environ.get(BINARY_ENV)
    if from_env:
        if _is_executable(Path(from_env)):
            return from_env
        raise RunnerError(f"{BINARY_ENV}={from_env} is not an executable file")
    places = binary_candidates()
    for _, directory in places:
        candidate = directory / BINARY_NAME
        if _is_executable(candidate):
            return str(candidate)
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return on_path
    looked = "".join(f"\n  {directory} ({what})" for what, directory in places)
    raise RunnerError(
        f"cannot find the {BINARY_NAME} executable. Looked in:{looked}\n"
        f"  PATH={os.environ.get('PATH', '')}\n"
        f"and {BINARY_ENV} is not set. It is installed with the djangocommand "
        "package (pip install djangocommand)."
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_project_dir(settings: Any) -> Path:
    """The directory holding manage.py: the one being run, BASE_DIR, or the
    nearest above the working directory."""
    candidates = []
    if sys.argv and sys.argv[0] and Path(sys.argv[0]).name == "manage.py":
        candidates.append(Path(sys.argv[0]).absolute().parent)
    base_dir = getattr(settings, "BASE_DIR", None)
    if base_dir:
        candidates.append(Path(base_dir))
    cwd = Path.cwd()
    candidates += [cwd, *cwd.parents]
    for candidate in candidates:
        if (candidate / "manage.py").is_file():
            return candidate.absolute()
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "Cannot find your project's manage.py: set BASE_DIR in your settings to the "
        "directory that holds it, or run from that directory."
    )


def settings_module_name(settings: Any) -> str:
    name = os.environ.get("DJANGO_SETTINGS_MODULE") or getattr(
        settings, "SETTINGS_MODULE", None
    )
    if not name:
        from django.core.exceptions import ImproperlyConfigured

        # The worker sets Django up in a fresh interpreter, from a module.
        raise ImproperlyConfigured(
            "DJANGO_SETTINGS_MODULE is not set: the runner needs your settings as a "
            "module (settings.configure() is not supported)."
        )
    return name


def state_dir_for(settings: Any, project_dir: Path) -> StateDir:
    configured = getattr(settings, "DJANGOCOMMAND_STATE_DIR", None)
    if configured is None:
        return StateDir(project_dir / STATE_DIR_NAME)
    if not isinstance(configured, (str, os.PathLike)) or not os.fspath(configured):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            f"DJANGOCOMMAND_STATE_DIR must be a directory path. Got: {configured!r}"
        )
    return StateDir(project_dir / Path(configured))  # an absolute path stays as it is


def verbosity_flags(verbosity: int) -> list[str]:
    """Django's -v 0..3 as dcsupervisor's -q/-v (1, the default, is its info level)."""
    return {0: ["-qq"], 1: [], 2: ["-v"]}.get(verbosity, ["-vv"])


def supervisor_environment(api_key: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(_SETTINGS_OWNED_ENV)
    }
    # The one way the key reaches the supervisor: never argv, never a file.
    env[API_KEY_ENV] = api_key
    return env


# --- the state directory -----------------------------------------------------


@dataclass(frozen=True)
class SupervisorStatus:
    running: bool
    pid: int | None = None
    #: Unix time the running supervisor took its lock.
    started_at: float | None = None


class StateDir:
    """The supervisor's state directory and the files in it."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def prepare(self) -> None:
        """Creates the directory, 0700: undelivered command output may sit in it."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, 0o700)
        except OSError as error:
            raise RunnerError(
                f"cannot use {self.path} as the runner's state directory ({error.strerror}); "
                "set DJANGOCOMMAND_STATE_DIR to a directory this user can write"
            ) from None

    def write_config(self, text: str) -> Path:
        """Writes dc.toml atomically, 0600 from the start (never briefly wider)."""
        self.prepare()
        temporary = self.path / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(temporary, flags, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, self.config_path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return self.config_path

    def lock_owner_text(self) -> str:
        try:
            return self.lock_path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return ""

    def status(self) -> SupervisorStatus:
        """Whether a supervisor holds the lock, and its pid."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return SupervisorStatus(running=False)
        try:
            pid = _parse_pid(os.pread(fd, 32, 0))
            # A dead pid settles it without touching the lock: taking it, even
            # for a moment, could make a supervisor starting right then refuse.
            if pid is not None and not _process_exists(pid):
                return SupervisorStatus(running=False)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held. The holder writes its pid right after locking.
                deadline = time.monotonic() + 1.0
                while pid is None and time.monotonic() < deadline:
                    time.sleep(_POLL_INTERVAL)
                    pid = _parse_pid(os.pread(fd, 32, 0))
                return SupervisorStatus(True, pid, os.fstat(fd).st_mtime)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return SupervisorStatus(running=False)
        finally:
            os.close(fd)

    def wait_stopped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.status().running:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def stop(
        self, *, force: bool = False, timeout: float = STOP_TIMEOUT
    ) -> tuple[int | None, bool]:
        """SIGTERM (SIGKILL if ``force``) to the running supervisor, then waits
        for its lock to be released. Returns (pid or None if none ran, stopped)."""
        status = self.status()
        if not status.running:
            return None, True
        if status.pid is None:
            raise RunnerError(
                f"a process holds {self.lock_path} but has not written its pid"
            )
        try:
            os.kill(status.pid, signal.SIGKILL if force else signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise RunnerError(
                f"not allowed to signal the runner (PID: {status.pid}); "
                "run this as the user the runner runs as"
            ) from None
        return status.pid, self.wait_stopped(timeout)


def _parse_pid(raw: bytes) -> int | None:
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- the runner ----------------------------------------------------------------


class Runner:
    """The DjangoCommand runner of this project: ``dcsupervisor`` with a
    ``dc.toml`` generated from the Django settings.

    ``Runner.from_settings()`` is the usual way to get one.
    """

    def __init__(
        self,
        settings,
        *,
        project_dir: Path,
        settings_module: str,
        state_dir: StateDir,
        python: str | None = None,
        binary: str | None = None,
        verbosity: int = 1,
    ):
        self.settings = settings
        self.project_dir = Path(project_dir).absolute()
        self.settings_module = settings_module
        self.state = state_dir
        self.python = python or sys.executable
        self._binary = binary
        self.verbosity = verbosity
        #: stderr of the last failed run_once(), for callers that want the reason.
        self.last_error = ""

    @classmethod
    def from_settings(cls, **options: Any) -> Runner:
        """A runner for the configured Django project; raises
        ImproperlyConfigured when a DJANGOCOMMAND_* setting is wrong."""
        from django.conf import settings

        from . import conf

        project_dir = find_project_dir(settings)
        options.setdefault("state_dir", state_dir_for(settings, project_dir))
        options.setdefault("settings_module", settings_module_name(settings))
        return cls(conf.runner_settings(settings), project_dir=project_dir, **options)

    @property
    def binary(self) -> str:
        if self._binary is None:
            self._binary = find_binary()
        return self._binary

    def config_text(self) -> str:
        from .supervisor_config import render

        return render(
            self.settings,
            project_dir=self.project_dir,
            settings_module=self.settings_module,
            python=self.python,
            state_dir=self.state.path,
        )

    def write_config(self) -> Path:
        return self.state.write_config(self.config_text())

    def command(self, subcommand: str, *options: str) -> list[str]:
        return [
            self.binary,
            "--config",
            str(self.state.config_path),
            *verbosity_flags(self.verbosity),
            *options,
            subcommand,
        ]

    def log_options(self) -> list[str]:
        """Background mode: the supervisor writes its log itself, rotating it
        by size, so it cannot grow forever."""
        return [
            "--log-file",
            str(self.state.log_path),
            "--log-max-bytes",
            str(LOG_MAX_BYTES),
            "--log-keep",
            str(LOG_BACKUPS),
        ]

    def environment(self) -> dict[str, str]:
        return supervisor_environment(self.settings.api_key)

    def status(self) -> SupervisorStatus:
        return self.state.status()

    def run(self) -> None:
        """Runs the supervisor until it stops; raises RunnerError if it fails.

        SIGTERM, SIGINT and SIGHUP sent to this process are passed on, once
        each, to the supervisor (stop, stop, reload). It runs in a session of
        its own so that a terminal's Ctrl-C reaches it only through us: the
        supervisor takes a second stop signal as "stop at once".
        """
        self.write_config()
        started: list[subprocess.Popen] = []
        pending: list[int] = []

        def forward(signum, _frame):
            if not started:
                pending.append(signum)  # arrived while the process was being created
                return
            try:
                started[0].send_signal(signum)
            except ProcessLookupError:
                pass

        previous = {}
        # Python only lets the main thread install handlers; elsewhere the
        # caller owns signals and stops the supervisor its own way.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                previous[signum] = signal.signal(signum, forward)
        try:
            process = subprocess.Popen(
                self.command("run"),
                env=self.environment(),
                cwd=self.project_dir,
                start_new_session=True,
            )
            started.append(process)
            for signum in pending:
                process.send_signal(signum)
            try:
                returncode = process.wait()
            finally:
                if process.poll() is None:
                    # Leaving early (an exception in this thread): never orphan it.
                    process.terminate()
                    process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if returncode != 0:
            raise RunnerError(f"{BINARY_NAME} exited with status {returncode}")

    def run_once(self) -> bool:
        """One heartbeat (and command sync if the server asks); True on success."""
        self.write_config()
        result = subprocess.run(
            self.command("once"),
            check=False,  # a failure is reported by the return value
            env=self.environment(),
            cwd=self.project_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
        if result.returncode == 0:
            self.last_error = ""
            logger.info("%s", result.stdout.strip())
            return True
        self.last_error = result.stderr.strip()
        logger.error(
            "%s once failed (exit status %s): %s",
            BINARY_NAME,
            result.returncode,
            self.last_error,
        )
        return False

    def exec_foreground(self) -> NoReturn:
        """Replaces this process with the supervisor, so that signals from
        systemd, supervisord or Docker reach it directly."""
        self.write_config()
        argv = self.command("run")
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(self.project_dir)
        os.execve(argv[0], argv, self.environment())

    def start_detached(self, timeout: float = START_TIMEOUT) -> int:
        """Starts the supervisor in the background (its own session, logging
        to the rotated log) and returns its pid once it holds the lock. Its
        stdout and stderr are appended to the log too, for what comes before
        logging is set up (an unusable dc.toml) or outside it (a crash)."""
        self.write_config()
        log_fd = os.open(
            self.state.log_path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            process = subprocess.Popen(
                self.command("run", *self.log_options()),
                env=self.environment(),
                cwd=self.project_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + timeout
        # The supervisor writes its pid into the lock file only once it holds
        # the lock; reading the file (never locking it) cannot get in its way.
        while self.state.lock_owner_text() != str(process.pid):
            returncode = process.poll()
            if returncode is not None:
                raise RunnerError(
                    f"{BINARY_NAME} exited with status {returncode} while starting; "
                    f"from {self.state.log_path}:\n{_log_tail(self.state.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise RunnerError(
                    f"{BINARY_NAME} (PID: {process.pid}) did not take its lock within "
                    f"{timeout:g}s; see {self.state.log_path}"
                )
            time.sleep(_POLL_INTERVAL)
        return process.pid
