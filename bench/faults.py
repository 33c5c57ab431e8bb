"""Benchmark: copy-on-write page faults a job takes, with and without the
spare's prefault (python/djangocommand/_worker.py, "Copy-on-write, paid ahead").

Drives the real worker over its socket, as the supervisor does, on the demo
project. For each job (`sleep 0.05`) it reads the idle spare's minor-fault
count (/proc/<pid>/stat) just before handing it the job, and again when the
job prints "sleeping": by then the job has parsed its arguments, set Django
up again and run the system checks, which is where a fork's first writes
land. The difference is what the job paid on its own path.

Most spares prefault the pages jobs write; every 16th (a scout) does not, and
is recognised by how few faults it took while idle, so one run compares both.

Prints a Markdown table; `--doc` writes it into docs/benchmarks.md between
`<!-- faults:start -->` and `<!-- faults:end -->`.
"""

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import harness

ROOT = harness.ROOT
PYTHON = ROOT / ".venv" / "bin" / "python"
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- faults:start -->"
END_MARK = "<!-- faults:end -->"
NO_LIMITS = {"cpu_seconds": 0, "address_space_bytes": 0, "nice": 0}
TIMEOUT = 60
# An idle spare that took more faults than this has prefaulted (a scout
# takes about 500 setting itself up, a prefaulted one about 2,000).
PREFAULTED_IDLE = 1000

codec = harness.load_worker()


class Worker:
    """The worker process and our end of its socket (fd 3 on its side)."""

    def __init__(self, workdir: Path):
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        # The worker takes its socket's number from the environment.
        env = dict(
            os.environ,
            DJANGOCOMMAND_WORKER_FD=str(theirs.fileno()),
            DEMO_DB_PATH=str(workdir / "db.sqlite3"),
        )
        self.proc = subprocess.Popen(
            [
                str(PYTHON),
                "-",
                "--project-dir",
                ".",
                "--settings",
                "demo_project.settings",
            ],
            cwd=harness.DEMO_DIR,
            env=env,
            stdin=subprocess.PIPE,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.proc.stdin.write(harness.WORKER_PATH.read_bytes())
        self.proc.stdin.close()
        assert "Hello" in self.event()

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("the worker closed its socket")
            data += chunk
        return data

    def event(self):
        while True:
            (length,) = struct.unpack("<I", self._exactly(4))
            event = codec.decode("Event", self._exactly(length))
            if not (isinstance(event, dict) and "Log" in event):
                return event

    def spare(self) -> int:
        """The one idle child, once its prefault (if any) has settled."""
        deadline = time.monotonic() + TIMEOUT
        last = None
        while time.monotonic() < deadline:
            children = children_of(self.proc.pid)
            if len(children) == 1:
                pid = children.pop()
                faults = minor_faults(pid)
                if last == (pid, faults):
                    return pid
                last = (pid, faults)
            time.sleep(0.02)
        raise TimeoutError("no settled spare")

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=TIMEOUT)


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def minor_faults(pid: int) -> int:
    # Field 10 of /proc/<pid>/stat; fields[0] here is field 3 (state).
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def one_job(worker: Worker, job: int) -> tuple[int, int]:
    """(the spare's faults while idle, the job's faults until its command runs)."""
    spare = worker.spare()
    idle = minor_faults(spare)
    out_r, out_w = os.pipe()
    run = {
        "Run": {"job": job, "command": "sleep", "args": ["0.05"], "limits": NO_LIMITS}
    }
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdio = [stdin, out_w, out_w]
    socket.send_fds(worker.sock, [codec.encode_frame("Request", run)], stdio)
    os.close(stdin)
    os.close(out_w)
    assert worker.event()["JobStarted"]["pid"] == spare
    with os.fdopen(out_r, "rb") as out:
        assert out.readline().startswith(b"sleeping")
        running = minor_faults(spare)
        out.read()
    assert "JobExited" in worker.event()
    return idle, running - idle


def table(samples: list[tuple[int, int]]) -> str:
    groups = {
        "prefaulted spare": [s for s in samples if s[0] > PREFAULTED_IDLE],
        "scout (no prefault, as before)": [
            s for s in samples if s[0] <= PREFAULTED_IDLE
        ],
    }
    lines = [
        "| spare | jobs | faults while idle (median) | faults on the job's path (median) |",
        "|---|---:|---:|---:|",
    ]
    for label, group in groups.items():
        if group:
            idle = statistics.median(s[0] for s in group)
            job = statistics.median(s[1] for s in group)
            lines.append(f"| {label} | {len(group)} | {idle:.0f} | {job:.0f} |")
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text = DOC.read_text()
    if START_MARK not in text or END_MARK not in text:
        raise SystemExit(f"{DOC}: no {START_MARK} / {END_MARK} markers")
    head, rest = text.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    DOC.write_text(f"{head}{START_MARK}\n\n{block}\n\n{END_MARK}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48, help="jobs (default 48)")
    parser.add_argument("--doc", action="store_true", help=f"update {DOC.name}")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dc-bench-faults-") as workdir:
        worker = Worker(Path(workdir))
        try:
            samples = [one_job(worker, job) for job in range(1, options.jobs + 1)]
        finally:
            worker.close()
    block = (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} with "
        f"`.venv/bin/python bench/faults.py`: {options.jobs} `sleep 0.05` jobs on the "
        "demo project; minor faults from the hand-over to the command's first line.\n\n"
        + table(samples)
    )
    print(block)
    if options.doc:
        write_doc(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
