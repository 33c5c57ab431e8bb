"""``python manage.py djangocommand``: run the DjangoCommand runner.

python manage.py djangocommand                  # status
python manage.py djangocommand start            # foreground: this process becomes dcsupervisor
python manage.py djangocommand start -d         # background; logs in the state directory (rotated)
python manage.py djangocommand start -v 2       # more logging (-v 0: errors only)
python manage.py djangocommand stop [--force]   # SIGTERM (SIGKILL) to the running runner
python manage.py djangocommand restart [-d]
python manage.py djangocommand status [--json]
"""

import argparse
import json
import time
from datetime import datetime, timezone

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from djangocommand.runner import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Runner,
    RunnerError,
    StateDir,
    find_project_dir,
    state_dir_for,
)


class Command(BaseCommand):
    help = (
        "Run the DjangoCommand runner (dcsupervisor): start, stop, restart or status."
    )

    # Checks run before `start` only: a settings mistake must not keep
    # `stop` or `status` from reaching a runner that is already running.
    requires_system_checks = ()

    def add_arguments(self, parser):
        subcommands = parser.add_subparsers(dest="subcommand", title="subcommands")

        start = subcommands.add_parser("start", help="Start the runner")
        self._add_start_arguments(start)

        stop = subcommands.add_parser("stop", help="Stop the runner")
        self._add_stop_arguments(stop)

        restart = subcommands.add_parser(
            "restart", help="Stop the runner, then start it"
        )
        self._add_stop_arguments(restart)
        self._add_start_arguments(restart)

        status = subcommands.add_parser(
            "status", help="Show whether the runner is running"
        )
        status.add_argument("--json", action="store_true", help="Output status as JSON")

    @staticmethod
    def _add_start_arguments(parser):
        parser.add_argument(
            "-d",
            "--detach",
            action="store_true",
            help="Run in the background; logs go to dcsupervisor.log in the state directory, rotated at 10 MB, 5 old files kept",
        )
        parser.add_argument(
            "-v",
            "--verbosity",
            type=int,
            choices=[0, 1, 2, 3],
            # Unset unless given here, so `djangocommand -v 2 start` works too.
            default=argparse.SUPPRESS,
            help="Verbosity level; 0=errors only, 1=normal, 2=debug, 3=trace",
        )
        parser.add_argument(
            "--no-reload",
            action="store_true",
            help="Accepted for compatibility with the published runner; dcsupervisor never auto-reloads",
        )
        parser.add_argument(
            "--start-timeout",
            type=float,
            default=START_TIMEOUT,
            help=f"With --detach: seconds to wait for the runner to start (default {START_TIMEOUT:g})",
        )

    @staticmethod
    def _add_stop_arguments(parser):
        parser.add_argument(
            "--force",
            action="store_true",
            help="Stop with SIGKILL (immediate: running commands get no chance to finish)",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=STOP_TIMEOUT,
            help=f"Seconds to wait for the runner to stop (default {STOP_TIMEOUT:g})",
        )

    def handle(self, *args, **options):
        subcommand = options.get("subcommand") or "status"
        try:
            getattr(self, f"handle_{subcommand}")(**options)
        except ImproperlyConfigured as error:
            raise CommandError(f"Configuration error: {error}") from None
        except RunnerError as error:
            raise CommandError(str(error)) from None

    def _state(self) -> StateDir:
        return state_dir_for(settings, find_project_dir(settings))

    # --- subcommands ---------------------------------------------------------

    def handle_status(self, **options):
        state = self._state()
        status = state.status()
        report = {
            "status": "running" if status.running else "stopped",
            "pid": status.pid,
            "started_at": None,
            "uptime_seconds": None,
            "state_dir": str(state.path),
            "config": str(state.config_path),
            "log": str(state.log_path),
        }
        if status.running and status.started_at is not None:
            started = datetime.fromtimestamp(status.started_at, tz=timezone.utc)
            report["started_at"] = started.isoformat().replace("+00:00", "Z")
            report["uptime_seconds"] = max(0.0, time.time() - status.started_at)
        if options.get("json"):
            self.stdout.write(json.dumps(report, indent=2))
            return
        if not status.running:
            self.stdout.write("Runner status: " + self.style.WARNING("stopped"))
        else:
            self.stdout.write("Runner status: " + self.style.SUCCESS("running"))
            self.stdout.write(f"PID: {status.pid}")
            if report["started_at"]:
                self.stdout.write(f"Started: {report['started_at']}")
                self.stdout.write(f"Uptime: {_duration(report['uptime_seconds'])}")
        self.stdout.write(f"Config: {state.config_path}")
        self.stdout.write(f"Logs: {state.log_path}")

    def handle_start(self, **options):
        state = self._state()
        status = state.status()
        if status.running:
            raise CommandError(
                f"Runner already running (PID: {status.pid}). Use 'stop' first or 'restart'."
            )
        # Settings first: their messages say which DJANGOCOMMAND_* to fix.
        runner = Runner.from_settings(state_dir=state, verbosity=options["verbosity"])
        self.check()
        if options["detach"]:
            pid = runner.start_detached(timeout=options["start_timeout"])
            self.stdout.write(
                self.style.SUCCESS(f"Runner started in background (PID: {pid})")
            )
            self.stdout.write(f"Logs: {state.log_path}")
            return
        _ = runner.binary  # a missing binary fails here, before the banner
        if options["verbosity"] > 0:
            self.stdout.write(
                self.style.SUCCESS(
                    "Starting DjangoCommand runner...\nPress Ctrl+C to stop."
                )
            )
        runner.exec_foreground()

    def handle_stop(self, **options):
        self._stop(self._state(), options, not_running="Runner not running")

    def handle_restart(self, **options):
        self._stop(
            self._state(), options, not_running="Runner not running, starting fresh..."
        )
        self.handle_start(**options)

    def _stop(self, state: StateDir, options, not_running: str) -> None:
        status = state.status()
        if not status.running:
            self.stdout.write(not_running)
            return
        force = options["force"]
        self.stdout.write(
            f"{'Force stopping' if force else 'Stopping'} runner (PID: {status.pid})..."
        )
        _, stopped = state.stop(force=force, timeout=options["timeout"])
        if not stopped:
            raise CommandError(
                f"Runner did not stop within {options['timeout']:g}s. "
                "Use --force to send SIGKILL."
            )
        self.stdout.write(self.style.SUCCESS("Runner stopped"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"
