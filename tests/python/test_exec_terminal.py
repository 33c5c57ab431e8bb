"""`dcsupervisor exec` at a real terminal, and under a shell's or a service
manager's signals, behaves as `python manage.py` does.

Each test runs the same invocation three ways on the demo project (`python
manage.py`; `exec`, forked from the worker; `exec` of a command in
`worker.spawn_commands`, a fresh `manage.py` subprocess), each as a shell's
foreground job on a fresh pseudo-terminal, types at it or signals it, and
compares what the terminal showed and how the process ended (its raw wait
status: "killed by SIGINT" is not "exited 130" to a shell). The job `exec`
runs leads a session of its own, so these only pass if `exec` relays what
the terminal and the caller send (docs/fidelity.md, `exec`).
"""

import difflib
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from harness import DEMO_DIR, ROOT, target_binary

DCSUPERVISOR = target_binary("dcsupervisor")
PYTHON = Path(os.environ.get("DCSUPERVISOR_TEST_PYTHON") or ROOT / ".venv/bin/python")
LIMIT = 60  # seconds any one invocation may take

pytestmark = pytest.mark.skipif(
    not DCSUPERVISOR.exists(), reason="dcsupervisor missing: build it first"
)


# A minimal shell, the terminal's session leader: it runs the command as
# its foreground job (own process group, given the terminal) and reports on
# `events` what a shell's wait sees: the pid, stops, continues, the raw wait
# status. It keeps the session (and what the command wrote last) until
# `release` closes: the leader's exit hangs the terminal up.
LEADER = """
import os, signal, sys
events = os.fdopen(int(sys.argv[1]), "w", buffering=1)
release, argv = int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, os.getpid())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execvp(argv[0], argv)
print("pid", pid, file=events)
while True:
    _, status = os.waitpid(pid, os.WUNTRACED | os.WCONTINUED)
    if os.WIFSTOPPED(status):
        print("stopped", file=events)
    elif not os.WIFCONTINUED(status):
        print("ended", status, file=events)
        break
os.read(release, 1)
"""


class Terminal:
    """A command on a fresh pseudo-terminal, as a shell's foreground job:
    what the terminal's keys reach."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        self.master, slave = os.openpty()
        events, events_end = os.pipe()
        release_end, self.release = os.pipe()
        self.leader = subprocess.Popen(
            [sys.executable, "-c", LEADER, str(events_end), str(release_end), *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            pass_fds=(events_end, release_end),
            start_new_session=True,
            # The terminal becomes the new session's controlling terminal.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509
        )
        for fd in (slave, events_end, release_end):
            os.close(fd)
        self.events = os.fdopen(events, "r")
        self.shown = b""
        self.pid = int(self._next_event().split()[1])

    def _next_event(self) -> str:
        """The leader's next report; what the terminal shows is read meanwhile."""
        deadline = time.monotonic() + LIMIT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no news of the command: {self.shown!r}"
            ready, _, _ = select.select([self.master, self.events], [], [], left)
            if self.master in ready:
                self._read(0)
            if self.events in ready:
                return self.events.readline()

    def read_for(self, seconds: float) -> bytes:
        """What the terminal shows during `seconds`."""
        before = len(self.shown)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)
        return self.shown[before:]

    def read_until(self, text: bytes, times: int = 1) -> None:
        """Reads until the terminal has shown `text` `times` times in all."""
        deadline = time.monotonic() + LIMIT
        while self.shown.count(text) < times:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never shown: {self.shown!r}"
            self._read(left)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            self.shown += os.read(self.master, 65536)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def send_signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def resize(self, rows: int, columns: int) -> None:
        # The kernel sends SIGWINCH to the terminal's foreground group.
        fcntl.ioctl(
            self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0)
        )

    def wait_stopped(self) -> None:
        event = self._next_event()
        assert event == "stopped\n", f"not stopped: {event!r} {self.shown!r}"

    def wait(self) -> int:
        """The raw wait status, once the command ended; all it showed is read."""
        event = self._next_event()
        assert event.startswith("ended"), event
        self.read_for(0.2)
        os.close(self.release)
        self.leader.wait(LIMIT)
        self.events.close()
        os.close(self.master)
        return int(event.split()[1])


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.WEXITSTATUS(status)}"


@pytest.fixture(scope="module")
def ways(tmp_path_factory):
    """argv prefixes for `python manage.py` and `dcsupervisor exec`, and
    their environment."""
    workdir = tmp_path_factory.mktemp("exec-terminal")
    config = workdir / "dc.toml"
    spawning = workdir / "dc-spawn.toml"
    text = f"""\
[django]
project_dir = {json.dumps(str(DEMO_DIR))}
settings_module = "demo_project.settings"
python = {json.dumps(str(PYTHON))}
env = {{ DEMO_DB_PATH = {json.dumps(str(workdir / "db.sqlite3"))} }}

[policy]
add_allowed_commands = ["sleep", "ticker", "shell"]
"""
    config.write_text(text)
    # The same commands as fresh `manage.py` subprocesses (spawn isolation).
    spawning.write_text(
        text + '\n[worker]\nspawn_commands = ["sleep", "ticker", "shell"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO")}
    env.update(DEMO_DB_PATH=str(workdir / "db.sqlite3"), TERM="dumb", NO_COLOR="1")
    return {
        "manage.py": [str(PYTHON), str(DEMO_DIR / "manage.py")],
        "exec": [str(DCSUPERVISOR), "--config", str(config), "-q", "exec"],
        "exec, spawned": [str(DCSUPERVISOR), "--config", str(spawning), "-q", "exec"],
    }, env


def every_way(ways, args: list[str], drive) -> dict[str, tuple[bytes, str]]:
    """Runs `args` every way, each driven by `drive(terminal)`; returns what
    each terminal showed and how each process ended."""
    prefixes, env = ways
    seen = {}
    for way, prefix in prefixes.items():
        terminal = Terminal(prefix + args, env, DEMO_DIR)
        drive(terminal)
        status = terminal.wait()
        seen[way] = (terminal.shown, describe(status))
    return seen


def assert_same(seen: dict[str, tuple[bytes, str]]) -> None:
    """Every way showed what `manage.py` showed, and ended as it ended."""
    shown, end = seen["manage.py"]
    for way, (other_shown, other_end) in seen.items():
        diff = "\n".join(
            difflib.unified_diff(
                shown.decode(errors="replace").splitlines(),
                other_shown.decode(errors="replace").splitlines(),
                "manage.py",
                way,
                lineterm="",
            )
        )
        assert (other_shown, other_end) == (shown, end), f"{end} / {other_end}\n{diff}"


def test_ctrl_c_kills_the_command_of_sigint_as_manage_py_dies(ways):
    def interrupt(terminal):
        terminal.read_until(b"sleeping 30\r\n")
        # A person's pause: the command is in its sleep, not still in the
        # write that printed the line (the traceback would say so).
        terminal.read_for(1.0)
        terminal.type(b"\x03")

    seen = every_way(ways, ["sleep", "30"], interrupt)
    assert seen["manage.py"][1] == "killed by SIGINT"
    assert_same(seen)
    assert b"KeyboardInterrupt" in seen["exec"][0]


def test_a_repl_survives_ctrl_c_pressed_twice(ways):
    def session(terminal):
        # After each prompt, a person's pause: readline sets the terminal
        # up again (typed ahead, keys are echoed before it does).
        terminal.read_until(b">>> ")
        terminal.read_for(0.5)
        for times in (1, 2):
            terminal.type(b"\x03")
            terminal.read_until(b">>> ", times + 1)
            terminal.read_for(0.5)
        terminal.type(b"print(6 * 7)\n")
        terminal.read_until(b"42\r\n>>> ")
        terminal.read_for(0.5)
        terminal.type(b"exit()\n")

    seen = every_way(ways, ["shell", "-i", "python"], session)
    assert seen["manage.py"][1] == "exited 0"
    assert_same(seen)
    assert seen["exec"][0].count(b"KeyboardInterrupt") == 2


GRACEFUL = (
    "import signal, sys, time\n"
    "def stop(number, frame):\n"
    "    print('stopping gracefully', flush=True)\n"
    "    sys.exit(3)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def test_sigterm_reaches_the_commands_own_handler(ways):
    """`timeout`, systemd or Kubernetes stopping `exec` stop the command the
    way it chose, as they would stop `manage.py`."""

    def terminate(terminal):
        terminal.read_until(b"ready\r\n")
        terminal.send_signal(signal.SIGTERM)

    seen = every_way(ways, ["shell", "-c", GRACEFUL], terminate)
    assert seen["manage.py"][0].endswith(b"ready\r\nstopping gracefully\r\n")
    assert seen["manage.py"][1] == "exited 3"
    assert_same(seen)


def test_sighup_when_the_terminal_goes_kills_the_command_of_sighup(ways):
    def hang_up(terminal):
        terminal.read_until(b"sleeping 30\r\n")
        terminal.send_signal(signal.SIGHUP)

    seen = every_way(ways, ["sleep", "30"], hang_up)
    assert seen["manage.py"][1] == "killed by SIGHUP"
    assert_same(seen)


WINCH = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGWINCH, lambda n, f: print('resized to', os.get_terminal_size(), flush=True))\n"
    "print('ready', flush=True)\n"
    "time.sleep(2)\n"
)


def test_a_resized_terminal_tells_the_command(ways):
    def resize(terminal):
        terminal.read_until(b"ready\r\n")
        terminal.resize(50, 132)
        terminal.read_until(b"resized")

    seen = every_way(ways, ["shell", "-c", WINCH], resize)
    assert b"columns=132, lines=50" in seen["manage.py"][0]
    assert_same(seen)


def test_ctrl_z_stops_the_command_until_it_is_continued(ways):
    def suspend(terminal):
        terminal.read_until(b"tick 2 ")
        terminal.type(b"\x1a")
        terminal.wait_stopped()
        # Stopped: the command prints nothing more (a tick is 0.1 s).
        terminal.read_for(0.3)
        held = len(terminal.shown)
        assert terminal.read_for(1.0) == b"", "the command went on while stopped"
        assert held > 0
        terminal.send_signal(signal.SIGCONT)  # what `fg` sends

    seen = every_way(ways, ["ticker", "--lines", "20", "--interval", "0.1"], suspend)
    for way, (shown, end) in seen.items():
        ticks = re.findall(rb"tick (\d+) ", shown)
        assert ticks == [str(i).encode() for i in range(20)], f"{way}: {shown!r}"
        assert end == "exited 0", way
