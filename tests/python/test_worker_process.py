"""The real worker process, driven from Python alone against the demo project.

The test plays the supervisor: it starts ``python -`` with the worker source
on stdin and its end of a socketpair as fd 3, then speaks the protocol.
"""

import os
import platform
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import DEMO_DIR, WORKER_PATH, load_worker

django = pytest.importorskip("django")

TIMEOUT = 20  # seconds; generous for a loaded CI machine

if not (DEMO_DIR / "manage.py").exists():
    pytest.skip(f"demo project {DEMO_DIR} not present", allow_module_level=True)

NO_LIMITS = {"cpu_seconds": 0, "address_space_bytes": 0, "nice": 0}
# Every Run carries stdin, stdout and stderr; the worker duplicates them.
NULL_STDIN = os.open(os.devnull, os.O_RDONLY)


codec = load_worker()

_EXEC_WITH_FD3 = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.execv(sys.argv[2], sys.argv[2:])
"""


class Supervisor:
    """Our end of the socket, with the worker process it talks to."""

    def __init__(self, tmp_path: Path, settings: str = "demo_project.settings"):
        self.sock, worker_end = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.logs: list[dict] = []
        self.stderr_path = tmp_path / "worker-stderr.txt"
        env = dict(
            os.environ,
            DJANGOCOMMAND_WORKER_FD="3",
            DEMO_DB_PATH=str(tmp_path / "db.sqlite3"),
        )
        # pass_fds keeps the number, and the worker wants fd 3: a first
        # interpreter moves it there and execs the worker in its place (same
        # pid, same stdin).
        fd = worker_end.fileno()
        argv = [sys.executable, "-c", _EXEC_WITH_FD3, str(fd), sys.executable]
        argv += ["-", "--project-dir", ".", "--settings", settings]
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                cwd=DEMO_DIR,
                env=env,
                stdin=subprocess.PIPE,
                stdout=stderr,
                stderr=stderr,
                pass_fds=[fd],
            )
        worker_end.close()
        self.proc.stdin.write(WORKER_PATH.read_bytes())
        self.proc.stdin.close()

    def send(self, request, fds=()) -> None:
        frame = codec.encode_frame("Request", request)
        if fds:
            socket.send_fds(self.sock, [frame], list(fds))
        else:
            self.sock.sendall(frame)

    def _recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"worker closed the socket; stderr:\n{self.stderr()}")
            data += chunk
        return data

    def event(self):
        """The next event that is not a Log (those are kept in self.logs)."""
        while True:
            (length,) = struct.unpack("<I", self._recv_exactly(4))
            event = codec.decode("Event", self._recv_exactly(length))
            if not (isinstance(event, dict) and "Log" in event):
                return event
            self.logs.append(event["Log"])

    def run(self, job: int, command: str, *args: str) -> tuple[dict, bytes, bytes]:
        """Runs a job to completion: (its exit status, stdout, stderr)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = {
            "Run": {
                "job": job,
                "command": command,
                "args": list(args),
                "limits": NO_LIMITS,
            }
        }
        self.send(request, fds=[NULL_STDIN, out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        started = self.event()
        assert started == {
            "JobStarted": {"job": job, "pid": started["JobStarted"]["pid"]}
        }
        exited = self.event()
        assert list(exited) == ["JobExited"] and exited["JobExited"]["job"] == job
        return exited["JobExited"]["status"], _read_all(out_r), _read_all(err_r)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path)
    hello = sup.event()
    assert hello == {
        "Hello": {
            "protocol": codec.PROTOCOL_VERSION,
            "pid": sup.proc.pid,
            "python_version": hello["Hello"]["python_version"],
            "django_version": django.get_version(),
        }
    }, sup.stderr()
    yield sup
    if sup.proc.poll() is None:
        sup.close()


def test_smoke_discover_run_crash_and_exit_on_eof(supervisor):
    supervisor.send("Discover")
    (commands,) = supervisor.event()["Commands"].values()
    by_name = {command["name"]: command for command in commands}
    assert by_name["noop"]["app_label"] == "demo"
    assert by_name["noop"]["help_text"].startswith("usage: manage.py noop")
    assert by_name["migrate"]["app_label"] == "django.core"

    status, out, err = supervisor.run(1, "noisy", "--lines", "3")
    assert (status, out, err) == (
        {"Code": {"code": 0}},
        b"out 0\nout 1\nout 2\n",
        b"err 0\nerr 1\nerr 2\n",
    )

    status, out, _ = supervisor.run(2, "segfault")
    assert status == {"Signal": {"signal": 11}}
    assert out == b"about to crash\n"

    assert supervisor.run(3, "noop") == ({"Code": {"code": 0}}, b"", b"")

    started = time.monotonic()
    supervisor.close()
    assert time.monotonic() - started < 5
    assert supervisor.proc.returncode == 0


def test_exit_statuses_match_manage_py(supervisor):
    status, _, err = supervisor.run(1, "fail", "--code", "3")
    assert status == {"Code": {"code": 3}}
    assert err == b"CommandError: demo failure\n"

    assert supervisor.run(2, "exit_with", "4")[0] == {"Code": {"code": 4}}
    assert supervisor.run(3, "hard_exit", "5")[:2] == (
        {"Code": {"code": 5}},
        b"hard exit\n",
    )

    status, _, err = supervisor.run(4, "boom")
    assert status == {"Code": {"code": 1}}
    assert err.startswith(b"Traceback (most recent call last):\n")
    assert err.endswith(b"ValueError: kaboom\n")

    status, _, err = supervisor.run(5, "no_such_command")
    assert status == {"Code": {"code": 1}}
    assert b"Unknown command: 'no_such_command'" in err

    status, out, _ = supervisor.run(6, "read_stdin")
    assert (status, out) == ({"Code": {"code": 0}}, b"stdin: ''\n")


def _start_grandchild_job(supervisor, job: int):
    """Starts the `grandchild` command: (job pid, its stdout, grandchild pid)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    run = {
        "Run": {"job": job, "command": "grandchild", "args": [], "limits": NO_LIMITS}
    }
    supervisor.send(run, fds=[NULL_STDIN, out_w, err_w])
    for fd in (out_w, err_w, err_r):
        os.close(fd)
    pid = supervisor.event()["JobStarted"]["pid"]
    out = os.fdopen(out_r, "rb")
    grandchild = int(out.readline().split()[1])
    return pid, out, grandchild


def test_signal_reaches_the_whole_job(supervisor):
    _, out, _ = _start_grandchild_job(supervisor, 9)
    with out:
        supervisor.send({"Signal": {"job": 9, "signal": 15}})
        exited = {"JobExited": {"job": 9, "status": {"Signal": {"signal": 15}}}}
        assert supervisor.event() == exited
        # The grandchild holds the pipe too: EOF means it is gone as well.
        assert out.read() == b""


def test_leftovers_of_a_dead_job_are_killed(supervisor):
    pid, out, _ = _start_grandchild_job(supervisor, 10)
    with out:
        os.kill(pid, 9)  # only the job's main process
        exited = {"JobExited": {"job": 10, "status": {"Signal": {"signal": 9}}}}
        assert supervisor.event() == exited
        assert out.read() == b""
    assert supervisor.run(11, "noop")[0] == {"Code": {"code": 0}}


def test_shutdown_waits_for_running_jobs_and_refuses_new_ones(supervisor):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sleep = {
        "Run": {"job": 1, "command": "sleep", "args": ["0.5"], "limits": NO_LIMITS}
    }
    supervisor.send(sleep, fds=[NULL_STDIN, out_w, err_w])
    assert "JobStarted" in supervisor.event()
    supervisor.send("Shutdown")
    late = {"Run": {"job": 2, "command": "noop", "args": [], "limits": NO_LIMITS}}
    supervisor.send(late, fds=[NULL_STDIN, out_w, err_w])
    assert supervisor.event() == {
        "JobFailed": {"job": 2, "error": "worker is shutting down"}
    }
    for fd in (out_w, err_w):
        os.close(fd)
    assert supervisor.event() == {
        "JobExited": {"job": 1, "status": {"Code": {"code": 0}}}
    }
    assert supervisor.proc.wait(timeout=TIMEOUT) == 0
    assert _read_all(out_r) == b"sleeping 0.5\ndone\n"
    os.close(err_r)


def test_run_without_descriptors_fails_the_job_only(supervisor):
    supervisor.send(
        {"Run": {"job": 1, "command": "noop", "args": [], "limits": NO_LIMITS}}
    )
    failed = supervisor.event()["JobFailed"]
    assert failed["job"] == 1 and "3 descriptors" in failed["error"]
    assert supervisor.run(2, "noop")[0] == {"Code": {"code": 0}}


def _parse(supervisor, request: int, command: str, *args: str) -> dict:
    supervisor.send(
        {"ParseArgs": {"request": request, "command": command, "args": list(args)}}
    )
    answer = supervisor.event()["ParsedArgs"]
    assert answer["request"] == request
    return answer["result"]


def test_parse_args_reports_what_the_commands_parser_read(supervisor):
    # Abbreviations resolve as in the job; defaults are not reported.
    assert _parse(supervisor, 1, "migrate", "--datab=default", "demo", "zero") == {
        "Parsed": {
            "given": [
                {"dest": "database", "flags": ["--database"], "values": ["default"]},
                {"dest": "app_label", "flags": [], "values": ["demo"]},
                {"dest": "migration_name", "flags": [], "values": ["zero"]},
            ]
        }
    }
    assert _parse(supervisor, 2, "noisy") == {"Parsed": {"given": []}}
    # Help and version are reported, not printed: nothing exits.
    assert _parse(supervisor, 3, "noisy", "-v2", "--flush", "--help") == {
        "Parsed": {
            "given": [
                {"dest": "verbosity", "flags": ["-v", "--verbosity"], "values": ["2"]},
                {"dest": "flush", "flags": ["--flush"], "values": []},
                {"dest": "help", "flags": ["-h", "--help"], "values": []},
            ]
        }
    }
    refusals = {
        ("noisy", "--lines", "x"): "Error: argument --lines: invalid int value: 'x'",
        ("noisy", "--bogus"): "Error: unrecognized arguments: --bogus",
        ("no_such_command",): "Unknown command: 'no_such_command'",
    }
    for request, (argv, message) in enumerate(refusals.items(), start=4):
        assert _parse(supervisor, request, *argv) == {"Refused": {"message": message}}
    # The worker is unharmed and still runs jobs.
    assert supervisor.run(9, "noop") == ({"Code": {"code": 0}}, b"", b"")


def test_startup_failure_is_reported_with_the_traceback(tmp_path):
    sup = Supervisor(tmp_path, settings="demo_project.settings_broken")
    failed = sup.event()["StartupFailed"]
    assert failed["protocol"] == codec.PROTOCOL_VERSION
    assert "No module named 'does_not_exist_module'" in failed["error"]
    assert sup.proc.wait(timeout=TIMEOUT) == 1
    sup.sock.close()


# --- prefork: the spare child forked ahead of time --------------------------


def _children_of(pid: int) -> set[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(predicate, what: str):
    """Polls ``predicate`` until it returns something truthy (no timing asserted)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def _the_spare(supervisor) -> int:
    """The worker's one idle child, waiting for its job."""

    def one_child():
        # A finished job may still be tearing down: wait until it is gone.
        children = _children_of(supervisor.proc.pid)
        return children if len(children) == 1 else None

    return _wait_for(one_child, "exactly one (spare) child").pop()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_job_starts_on_the_child_forked_ahead_of_time(supervisor):
    spare = _the_spare(supervisor)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    run = {"Run": {"job": 1, "command": "say", "args": ["hi"], "limits": NO_LIMITS}}
    supervisor.send(run, fds=[NULL_STDIN, out_w, err_w])
    os.close(out_w)
    os.close(err_w)
    assert supervisor.event() == {"JobStarted": {"job": 1, "pid": spare}}
    assert supervisor.event() == {
        "JobExited": {"job": 1, "status": {"Code": {"code": 0}}}
    }
    assert (_read_all(out_r), _read_all(err_r)) == (b"hi", b"")
    # A fresh spare waits for the next job, which starts on it in turn.
    _wait_for(lambda: _gone(spare), "the finished job to be reaped")
    second = _the_spare(supervisor)
    out_r, out_w = os.pipe()
    run = {"Run": {"job": 2, "command": "noop", "args": [], "limits": NO_LIMITS}}
    supervisor.send(run, fds=[NULL_STDIN, out_w, out_w])
    os.close(out_w)
    assert supervisor.event() == {"JobStarted": {"job": 2, "pid": second}}
    assert "JobExited" in supervisor.event()
    assert _read_all(out_r) == b""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_shutdown_discards_the_spare(supervisor):
    # Shutdown is how the supervisor retires a worker on reload, on a
    # settings change and on recycling: the spare has the old code and settings.
    spare = _the_spare(supervisor)
    supervisor.send("Shutdown")
    assert supervisor.proc.wait(timeout=TIMEOUT) == 0
    _wait_for(lambda: _gone(spare), "the spare to be discarded")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_the_spare_ends_with_the_worker(supervisor, how):
    spare = _the_spare(supervisor)
    if how == "eof":
        supervisor.close()
    else:
        supervisor.proc.send_signal(15)
        supervisor.proc.wait(timeout=TIMEOUT)
    _wait_for(lambda: _gone(spare), "the spare to end with the worker")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_spare_that_died_is_replaced_by_a_fork_on_demand(supervisor):
    spare = _the_spare(supervisor)
    os.kill(spare, 9)
    _wait_for(lambda: spare not in _children_of(supervisor.proc.pid), "the reap")
    status, out, _ = supervisor.run(1, "say", "again")
    assert (status, out) == ({"Code": {"code": 0}}, b"again")
    # Said once, whether the worker reaped it before the job came or found
    # it gone when handing the job over.
    spare_logs = [
        log for log in supervisor.logs if f"spare job process {spare}" in log["message"]
    ]
    assert len(spare_logs) == 1, supervisor.logs
    _the_spare(supervisor)


def _private_dirty_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty for {pid}")


def _kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _kernel_at_least(5, 14)),
    reason="MADV_POPULATE_WRITE needs Linux 5.14",
)
def test_spares_copy_the_pages_jobs_write_before_their_job_comes(supervisor):
    # The first spares scout: their jobs list the worker's pages they wrote.
    scout = _the_spare(supervisor)
    scout_dirty = _private_dirty_kib(scout)
    assert supervisor.run(1, "noop")[0] == {"Code": {"code": 0}}
    # It sends the list after its exit report: once it is reaped, the worker has it.
    _wait_for(lambda: not Path(f"/proc/{scout}").exists(), "the first job's reap")
    # The spare forked as job 2 starts copies those pages (a noop writes over a
    # MiB of them) while it waits, so its job does not fault on them.
    assert supervisor.run(2, "noop")[0] == {"Code": {"code": 0}}
    spare = _the_spare(supervisor)
    copied = _wait_for(
        lambda: (kib := _private_dirty_kib(spare)) > scout_dirty + 1024 and kib,
        "the spare to copy the pages jobs write",
    )
    assert copied > scout_dirty + 1024
    status, out, err = supervisor.run(3, "noisy", "--lines", "1")
    assert (status, out, err) == ({"Code": {"code": 0}}, b"out 0\n", b"err 0\n")


def test_an_order_taken_and_done_before_the_send_returns_is_not_resent():
    # Under load the child can read its whole order, run a short job and exit
    # before the worker's send returns: the send must still count as done
    # (a failure here made the worker run the job again on another child).
    ours, child = socket.socketpair()

    class FastChild(socket.socket):
        def sendmsg(self, *args):
            sent = super().sendmsg(*args)
            child.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            child.close()  # the job ran and the child exited
            return sent

    channel = FastChild(fileno=ours.detach())
    order = {"job": 1, "command": "noop", "args": [], "limits": NO_LIMITS}
    with channel:
        codec._send_order(channel, order, [NULL_STDIN])
