"""The dcsupervisor worker: Django set up once, one fork per management command.

The supervisor runs this file as ``python - --project-dir DIR --settings MOD``
with the source on stdin, so the project needs nothing but Django: keep it a
single self-contained module that imports only the standard library at the
top (Django is imported inside functions, which also lets the codec be tested
without Django). It talks to the supervisor over the Unix socket inherited as
fd 3, with the frames described in ``docs/ipc.md``; ``SCHEMA`` below mirrors
``src/ipc/messages.rs`` and ``tests/ipc_vectors.json`` pins the bytes.

A job is a forked child that runs ``execute_from_command_line`` exactly as
``manage.py`` would, with the supervisor's pipes as its stdout and stderr.
Whatever a job does (crash, ``os._exit``, close its output) must never take
the worker down, and the worker must never outlive the supervisor.
"""

from __future__ import annotations

import argparse
import array
import atexit
import bisect
import collections
import contextlib
import fcntl
import gc
import io
import json
import logging
import os
import platform
import random
import runpy
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref

PROTOCOL_VERSION = 5
MAX_FRAME_LEN = 16 * 1024 * 1024
WORKER_FD_ENV = "DJANGOCOMMAND_WORKER_FD"

# ---------------------------------------------------------------------------
# Codec: bincode 2, little-endian, fixed-width integers (see docs/ipc.md).
# Values use serde_json's externally tagged shape so that the shared test
# vectors compare directly: a unit variant is its name, a struct variant a
# one-key dict, a struct a dict.
# ---------------------------------------------------------------------------


class ProtocolError(Exception):
    """A frame that does not follow the protocol, in either direction."""


# type name -> ("enum", ((variant, fields or None), ...)) | ("struct", fields)
# where fields is ((name, type), ...). Variant order is the bincode index.
SCHEMA = {
    "Request": (
        "enum",
        (
            ("Discover", None),
            (
                "Run",
                (
                    ("job", "u64"),
                    ("command", "String"),
                    ("args", "Vec<String>"),
                    ("limits", "JobLimits"),
                ),
            ),
            ("Signal", (("job", "u64"), ("signal", "i32"))),
            ("Shutdown", None),
            (
                "ParseArgs",
                (("request", "u64"), ("command", "String"), ("args", "Vec<String>")),
            ),
            ("ReadSettings", (("request", "u64"), ("names", "Vec<String>"))),
            ("InspectFork", (("request", "u64"),)),
        ),
    ),
    "Event": (
        "enum",
        (
            (
                "Hello",
                (
                    ("protocol", "u32"),
                    ("pid", "u32"),
                    ("python_version", "String"),
                    ("django_version", "String"),
                ),
            ),
            ("StartupFailed", (("protocol", "u32"), ("error", "String"))),
            ("Commands", (("commands", "Vec<CommandInfo>"),)),
            ("JobStarted", (("job", "u64"), ("pid", "u32"))),
            ("JobFailed", (("job", "u64"), ("error", "String"))),
            ("JobExited", (("job", "u64"), ("status", "ExitStatus"))),
            ("Log", (("level", "LogLevel"), ("message", "String"))),
            ("ParsedArgs", (("request", "u64"), ("result", "ParseOutcome"))),
            ("SettingValues", (("request", "u64"), ("values", "Vec<String>"))),
            ("ForkHazards", (("request", "u64"), ("hazards", "Vec<ForkHazard>"))),
        ),
    ),
    "ForkHazard": ("struct", (("kind", "HazardKind"), ("detail", "String"))),
    "HazardKind": (
        "enum",
        (
            ("Socket", None),
            ("Descriptor", None),
            ("Thread", None),
            ("SharedRandom", None),
        ),
    ),
    "ParseOutcome": (
        "enum",
        (
            ("Parsed", (("given", "Vec<GivenArg>"),)),
            ("Refused", (("message", "String"),)),
        ),
    ),
    "GivenArg": (
        "struct",
        (("dest", "String"), ("flags", "Vec<String>"), ("values", "Vec<String>")),
    ),
    "JobLimits": (
        "struct",
        (("cpu_seconds", "u64"), ("address_space_bytes", "u64"), ("nice", "i32")),
    ),
    "CommandInfo": (
        "struct",
        (("name", "String"), ("app_label", "String"), ("help_text", "String")),
    ),
    "ExitStatus": (
        "enum",
        (("Code", (("code", "i32"),)), ("Signal", (("signal", "i32"),))),
    ),
    "LogLevel": (
        "enum",
        (("Debug", None), ("Info", None), ("Warning", None), ("Error", None)),
    ),
}

_INTS = {
    "u32": struct.Struct("<I"),
    "i32": struct.Struct("<i"),
    "u64": struct.Struct("<Q"),
}
_U32 = _INTS["u32"]
_U64 = _INTS["u64"]
_VARIANT_INDEX = {
    name: {variant: index for index, (variant, _) in enumerate(spec)}
    for name, (kind, spec) in SCHEMA.items()
    if kind == "enum"
}


def encode(type_name: str, value: object) -> bytes:
    """The bincode payload (no length prefix) of ``value`` as ``type_name``."""
    out = bytearray()
    _encode_value(out, type_name, value)
    if len(out) > MAX_FRAME_LEN:
        raise ProtocolError(
            f"{type_name} payload of {len(out)} bytes exceeds the frame limit"
        )
    return bytes(out)


def decode(type_name: str, payload: bytes) -> object:
    """The value of a whole payload; leftover bytes are an error, not ignored."""
    if len(payload) > MAX_FRAME_LEN:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the frame limit")
    reader = _Reader(bytes(payload))
    value = _decode_value(reader, type_name)
    if reader.remaining():
        raise ProtocolError(
            f"{type_name} payload has {reader.remaining()} trailing bytes"
        )
    return value


def encode_frame(type_name: str, value: object) -> bytes:
    """A complete frame: u32 little-endian payload length, then the payload."""
    payload = encode(type_name, value)
    return _U32.pack(len(payload)) + payload


def send_frame(sock: socket.socket, type_name: str, value: object) -> None:
    sock.sendall(encode_frame(type_name, value))


class FrameDecoder:
    """Cuts a byte stream into payloads.

    An announced length is checked as soon as its 4 bytes are in, so a bogus
    one fails before the buffer grows towards it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Adds ``data`` and returns the payloads it completed, in order."""
        self._buffer += data
        payloads = []
        while len(self._buffer) >= _U32.size:
            (length,) = _U32.unpack_from(self._buffer)
            if length > MAX_FRAME_LEN:
                raise ProtocolError(
                    f"announced frame of {length} bytes exceeds the frame limit"
                )
            end = _U32.size + length
            if len(self._buffer) < end:
                break
            payloads.append(bytes(self._buffer[_U32.size : end]))
            del self._buffer[:end]
        return payloads


def _schema(type_name: str) -> tuple[str, tuple]:
    try:
        return SCHEMA[type_name]
    except KeyError:
        raise ProtocolError(f"unknown type {type_name!r}") from None


def _encode_value(out: bytearray, type_name: str, value: object) -> None:
    if type_name in _INTS:
        _encode_int(out, type_name, value)
    elif type_name == "String":
        _encode_str(out, value)
    elif type_name.startswith("Vec<"):
        _encode_vec(out, type_name[4:-1], value)
    else:
        kind, spec = _schema(type_name)
        if kind == "struct":
            _encode_fields(out, type_name, spec, value)
        else:
            _encode_enum(out, type_name, spec, value)


def _encode_int(out: bytearray, type_name: str, value: object) -> None:
    # bool is an int subclass; accepting it would hide a wrong field.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"expected {type_name}, got {value!r:.80}")
    try:
        out += _INTS[type_name].pack(value)
    except struct.error:
        raise ProtocolError(f"{value} does not fit in {type_name}") from None


def _encode_str(out: bytearray, value: object) -> None:
    if not isinstance(value, str):
        raise ProtocolError(f"expected String, got {value!r:.80}")
    data = _utf8(value)
    out += _U64.pack(len(data))
    out += data


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    # Lone surrogates come from os.fsdecode()d paths and the like: the original
    # bytes are best when they are UTF-8 after all, but the supervisor rejects
    # a frame holding anything else, so fall back to "?" rather than crash.
    try:
        data = text.encode("utf-8", "surrogateescape")
        data.decode("utf-8")
    except UnicodeError:
        return text.encode("utf-8", "replace")
    return data


def _encode_vec(out: bytearray, item_type: str, value: object) -> None:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"expected Vec<{item_type}>, got {value!r:.80}")
    out += _U64.pack(len(value))
    for item in value:
        _encode_value(out, item_type, item)


def _encode_fields(out: bytearray, where: str, fields: tuple, value: object) -> None:
    names = [name for name, _ in fields]
    if not isinstance(value, dict) or set(value) != set(names):
        raise ProtocolError(
            f"{where} needs exactly the fields {names}, got {value!r:.80}"
        )
    for name, field_type in fields:
        _encode_value(out, field_type, value[name])


def _encode_enum(
    out: bytearray, type_name: str, variants: tuple, value: object
) -> None:
    if isinstance(value, str):
        name, fields = value, None
    elif isinstance(value, dict) and len(value) == 1:
        ((name, fields),) = value.items()
    else:
        raise ProtocolError(
            f"{type_name}: expected a variant name or a one-key dict, got {value!r:.80}"
        )
    index = _VARIANT_INDEX[type_name].get(name)
    if index is None:
        raise ProtocolError(f"{type_name} has no variant {name!r}")
    spec = variants[index][1]
    if (spec is None) != isinstance(value, str):
        raise ProtocolError(
            f"{type_name}::{name} given in the wrong shape: {value!r:.80}"
        )
    out += _U32.pack(index)
    if spec is not None:
        _encode_fields(out, f"{type_name}::{name}", spec, fields)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int) -> bytes:
        if size > self.remaining():
            raise ProtocolError(
                f"truncated: {size} bytes needed at offset {self.pos}, {self.remaining()} left"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def int(self, fmt: struct.Struct) -> int:
        return fmt.unpack(self.take(fmt.size))[0]

    def length(self, what: str) -> int:
        """A u64 length, checked before anything is built from it.

        Every element of every type here takes at least one byte, so a count
        above what is left is a truncated payload whatever the element type.
        """
        size = self.int(_U64)
        if size > MAX_FRAME_LEN:
            raise ProtocolError(f"{what} length {size} exceeds the frame limit")
        if size > self.remaining():
            raise ProtocolError(
                f"truncated: {what} of length {size}, {self.remaining()} bytes left"
            )
        return size


def _decode_value(reader: _Reader, type_name: str) -> object:
    if type_name in _INTS:
        return reader.int(_INTS[type_name])
    if type_name == "String":
        try:
            return reader.take(reader.length("String")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"String is not valid UTF-8: {exc}") from None
    if type_name.startswith("Vec<"):
        item_type = type_name[4:-1]
        return [
            _decode_value(reader, item_type) for _ in range(reader.length(type_name))
        ]
    kind, spec = _schema(type_name)
    if kind == "struct":
        return _decode_fields(reader, spec)
    index = reader.int(_U32)
    if index >= len(spec):
        raise ProtocolError(f"{type_name} has no variant index {index}")
    name, fields = spec[index]
    return name if fields is None else {name: _decode_fields(reader, fields)}


def _decode_fields(reader: _Reader, fields: tuple) -> dict:
    return {name: _decode_value(reader, field_type) for name, field_type in fields}


# ---------------------------------------------------------------------------
# The job child. It is forked ahead of time (a "spare", the prefork
# technique): the worker keeps one waiting, so a job starts on a process that
# already exists and the fork's cost is paid between jobs. A spare first does
# everything that does not depend on the job (prefork time), then waits on its
# private channel for the job: a `Run` frame with the job's stdin, stdout and
# stderr (job time).
# Nothing here may return into the worker's loop: every path ends in os._exit.
# ---------------------------------------------------------------------------

# The worker's own std streams, kept referenced in the child so that their
# finalizers never run and write into the job's pipes.
_RETIRED_STREAMS: list = []


def _spare_main(
    channel: socket.socket, worker_fds: list[int], pages: _PagePlan
) -> None:
    """The whole life of a forked child: prefork set-up, wait, the job, exit."""
    status = 70  # EX_SOFTWARE, should anything below fail to set a status
    me = os.getpid()
    try:
        channel = _above_stdio(channel)
        _prefork_setup(worker_fds)
        regions = pages.before_job(channel)
        order = _await_order(channel)
        if order is None:
            status = 0  # discarded by the worker (reload, recycle, exit)
            return
        job, command, args, limits, stdio_fds = order
        _job_setup(stdio_fds, limits)
        sys.argv = ["manage.py", command, *args]
        status = _execute(sys.argv, limits)
        if _report_exit(channel, job, status, me):
            pages.after_job(channel, regions)
    except KeyboardInterrupt:
        # A SIGINT sent before the command started: die of it as asked.
        _die_by_sigint()
    except BaseException:  # noqa: BLE001 - the worker's loop must never see it
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


def _prefork_setup(worker_fds: list[int]) -> None:
    """Prefork time: what makes a fresh process of a fork, whatever the job.

    Every step here is the same for every job, so a spare does it before its
    job is known. Steps that depend on the job belong in ``_job_setup``.
    Prefork time: new session, signal dispositions, closing the worker's
    descriptors, reseeding ``random`` (each spare gets its own seed),
    forgetting the worker's exit handlers, and installing the hooks that
    give the job the whole heap, show the output and warnings the worker
    recorded and refuse other settings (and any other step that reads
    nothing of the job). Job time: the three stdio descriptors, the std
    streams built on them, the resource limits, ``sys.argv``.
    """
    os.setsid()
    _reset_signals()
    for fd in worker_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    random.seed()
    _stop_recording_exit_handlers()
    if not _ONE_JOB:
        # Exit handlers registered in the worker belong to the worker, but
        # for those that flush what this process itself holds.
        atexit._clear()
        _per_process_exit_handlers()
        _finalizers_at_exit()
    _restart_queue_listeners()
    _forget_the_workers_sentry_queue()
    _see_the_whole_heap()
    _show_warnings_where_manage_py_would()
    _refuse_other_settings()


def _above_stdio(channel: socket.socket) -> socket.socket:
    """The channel on a descriptor above 2, which the job's stdio will take
    (a worker started with fds 0-2 closed gets low numbers from socketpair)."""
    if channel.fileno() > 2:
        return channel
    moved = fcntl.fcntl(channel.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
    channel.close()
    return socket.socket(fileno=moved)


def _job_setup(stdio_fds: list[int], limits: dict) -> None:
    """Job time: the steps that depend on the job (its stdio, its limits,
    the log files as they are now)."""
    _install_stdio(*stdio_fds)
    _rebuild_std_streams()
    _rebind_std_stream_handlers()
    _reopen_log_files()
    _apply_limits(limits)


def _await_order(channel: socket.socket):
    """Blocks until the worker sends the job; None if it discards us instead.

    The order is a `Run` frame (the supervisor's own request, passed on) with
    the job's stdin, stdout and stderr as SCM_RIGHTS descriptors.
    """
    frames = FrameDecoder()
    fds: list[int] = []
    while True:
        data, ancdata, _, _ = channel.recvmsg(
            _RECV_SIZE, socket.CMSG_SPACE(_STDIO_FDS * _FD_SIZE), _CMSG_FLAGS
        )
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(received)
        if not data:
            return None
        payloads = frames.feed(data)
        if payloads:
            break
    request = decode("Request", payloads[0])
    run = request.get("Run") if isinstance(request, dict) else None
    if run is None or len(fds) != _STDIO_FDS:
        raise ProtocolError(
            f"a spare expects a Run with {_STDIO_FDS} descriptors, got {request!r:.80}"
        )
    return run["job"], run["command"], run["args"], run["limits"], fds


def _report_exit(channel: socket.socket, job: int, status: int, me: int) -> bool:
    """Tells the worker the job's exit status before exiting.

    The job's output is complete once the pipes are closed, and the exit
    itself (tearing down the address space, then the reap) takes
    milliseconds: the worker reports the job's end from this message and
    reaps us off that path. A process forked by the command runs this code
    too if it returns through it: only the job's own process reports.
    """
    if os.getpid() != me:
        return False
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.close(fd)
    exited = {"JobExited": {"job": job, "status": {"Code": {"code": status}}}}
    try:
        channel.sendall(encode_frame("Event", exited))
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# Copy-on-write, paid ahead. A job's first write to any page it shares with
# the worker (mostly reference counts of the objects every command touches:
# settings, apps, models, the management machinery) copies that page: about
# 1,400 page faults for `noop` on the demo project, which cost more CPU than
# the whole command in a warm process. Those pages are nearly the same for
# every job, so a spare copies them before its job arrives, off the job's
# path: every _SCOUT_EVERY-th spare does not, and after its job reports it
# lists the worker's pages the job wrote (/proc/self/pagemap: present and now
# exclusive to it) for the worker; the next spares prefault that list with
# madvise(MADV_POPULATE_WRITE), which copies a page without changing a byte.
# Memory is the same as before (the job would have copied those pages); an
# idle spare just holds them early. Linux only; elsewhere, or on a kernel
# without MADV_POPULATE_WRITE (< 5.14), nothing happens and jobs pay as before.
# ---------------------------------------------------------------------------

_SCOUT_EVERY = 16
_MADV_POPULATE_WRITE = 23
_MAX_HOT_PAGES = 8192  # 32 MiB with 4 KiB pages: a bound on a spare's copies
_PREFAULT_BATCH = 128  # runs between two looks for the job's order
_MAX_REGION = 1 << 30  # bytes; larger mappings are not scanned
_PM_PRESENT = 1 << 63
_PM_EXCLUSIVE = 1 << 56


class _PagePlan:
    """What a child does about copy-on-write: prefault ``runs`` (flat
    ``[start, length, ...]`` in bytes), scout for the next spares, or neither
    (a child forked on demand: its job is waiting, so nothing may delay it)."""

    __slots__ = ("runs", "scout")

    def __init__(self, runs: array.array | None, scout: bool) -> None:
        self.runs = runs
        self.scout = scout

    def before_job(self, channel: socket.socket) -> list[tuple[int, int]]:
        """Prefork time: prefaults the runs (until the job arrives: then it
        goes first); the regions a scout will report on."""
        if not (self.runs or self.scout):
            return []
        try:
            regions = _private_writable_regions()
            if self.runs:
                _prefault(self.runs, regions, channel)
        except (OSError, ValueError, AttributeError):
            return []
        return regions

    def after_job(self, channel: socket.socket, regions: list) -> None:
        """After the exit report, off the job's path: a scout's findings."""
        if not (self.scout and regions):
            return
        with contextlib.suppress(OSError, ValueError):
            runs = _pages_written(regions)
            channel.sendall(_U32.pack(len(runs) * 8) + runs.tobytes())


def _private_writable_regions() -> list[tuple[int, int]]:
    """(start, end) of every private writable mapping: what a fork shares
    copy-on-write (the heap, pymalloc's arenas, the data of shared libraries)."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            if perms == "rw-p":
                start, end = span.split("-")
                regions.append((int(start, 16), int(end, 16)))
    return regions


def _pages_written(regions: list[tuple[int, int]]) -> array.array:
    """Runs of pages in ``regions`` that are present and exclusive to us: the
    ones copied (or first written) since the fork."""
    page = os.sysconf("SC_PAGE_SIZE")
    runs = array.array("Q")
    pages = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for start, end in regions:
            if end - start > _MAX_REGION:
                continue  # a reservation, not Python's heap
            entries = array.array("Q")
            entries.frombytes(
                os.pread(fd, (end - start) // page * 8, start // page * 8)
            )
            for index, entry in enumerate(entries):
                if not (entry & _PM_PRESENT and entry & _PM_EXCLUSIVE):
                    continue
                address = start + index * page
                if runs and runs[-2] + runs[-1] == address:
                    runs[-1] += page
                else:
                    runs.extend((address, page))
                pages += 1
                if pages >= _MAX_HOT_PAGES:
                    return runs
    finally:
        os.close(fd)
    return runs


def _prefault(
    runs: array.array, regions: list[tuple[int, int]], channel: socket.socket
) -> None:
    """Copies the pages of ``runs`` that lie in ``regions`` now, without
    writing to them, stopping early once ``channel`` has the job's order.
    The runs come from an earlier child: whatever the worker has unmapped
    since is skipped, never touched."""
    if _madvise is None:
        return
    starts = [low for low, _ in regions]
    for i in range(0, len(runs) - 1, 2):
        if i % _PREFAULT_BATCH == 0 and select.select([channel], [], [], 0)[0]:
            return
        start, end = runs[i], runs[i] + runs[i + 1]
        # Regions are sorted and disjoint: from the last one starting at or
        # before `start`, on while they begin before `end`.
        at = max(bisect.bisect_right(starts, start) - 1, 0)
        while at < len(regions) and regions[at][0] < end:
            low, high = max(regions[at][0], start), min(regions[at][1], end)
            if low < high and _madvise(low, high - low, _MADV_POPULATE_WRITE) != 0:
                return  # EINVAL on a kernel without it: nothing more to gain
            at += 1


# madvise(2) through ctypes, loaded once in the worker (so no child pays
# for the import); None where it cannot be had.
_madvise = None


def _load_madvise() -> None:
    global _madvise
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (ImportError, OSError, AttributeError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    _madvise = madvise


# Seconds between RLIMIT_CPU's SIGXCPU (soft) and its SIGKILL (hard).
_CPU_HARD_MARGIN = 5


def _apply_limits(limits: dict) -> None:
    """The job's resource limits, set in the child before the command runs."""
    import resource

    cpu = limits.get("cpu_seconds", 0)
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + _CPU_HARD_MARGIN))
    address_space = limits.get("address_space_bytes", 0)
    if address_space:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    nice = limits.get("nice", 0)
    if nice > 0:
        os.nice(nice)


def _reset_signals() -> None:
    """Signal state of a fresh interpreter; the mask was blocked across fork."""
    fresh = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN}
    if hasattr(signal, "SIGXFSZ"):
        fresh[signal.SIGXFSZ] = signal.SIG_IGN
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        # Some real-time signals are reserved by libc and refuse a handler.
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, fresh.get(signum, signal.SIG_DFL))
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _finalizers_at_exit() -> None:
    """``weakref.finalize`` runs the pending finalizers marked ``atexit``
    (a ``TemporaryDirectory`` removing itself, say) from an exit handler it
    registers once per process, when the first finalizer is made: in the
    worker, whose exit handlers the job has just forgotten. The job gets
    that handler again, for its own finalizers; those it inherited stay the
    worker's (what they clean up, the worker and its later jobs still use)."""
    with contextlib.suppress(AttributeError):
        for info in list(weakref.finalize._registry.values()):
            info.atexit = False
        atexit.register(weakref.finalize._exitfunc)
        weakref.finalize._registered_with_atexit = True


# ---------------------------------------------------------------------------
# What integrations keep per process. A fresh `manage.py` starts the threads
# its import starts, opens its log files, and at exit runs the handlers that
# flush what it buffered. A fork has no thread but its own, log files as
# the worker opened them (maybe rotated or removed since), and the worker's
# exit handlers, which the job forgets. So a job restarts the logging
# queue listeners that ran in the worker (their thread writes the records
# a QueueHandler queues), reopens the files of the logging handlers, and runs
# at its end the exit handlers of its import that flush its own state:
# sentry-sdk's (its transport thread sends the queued events) and the queue
# listeners' stop. sentry-sdk restarts its own threads in a fork (it checks
# the pid), so nothing else is needed for it.
# ---------------------------------------------------------------------------

# Exit handlers registered while the worker imported the project, in order:
# (function, args, kwargs). atexit keeps no list one could read.
_IMPORT_EXIT_HANDLERS: list[tuple] = []
_ATEXIT_REGISTER = atexit.register
_ATEXIT_UNREGISTER = atexit.unregister
# The exit handlers that flush what the process itself holds, by
# "module.qualname": a job runs them at its end, as manage.py would.
_PER_PROCESS_EXIT_HANDLERS = frozenset(
    {
        # sentry_sdk.init()'s AtexitIntegration: client.close() waits (up to
        # shutdown_timeout) for the transport's thread to send the queue.
        "sentry_sdk.integrations.atexit.AtexitIntegration.setup_once.<locals>._shutdown",
    }
)
# The QueueListeners whose thread ran in the worker when it forked.
_LISTENERS_AT_FORK: list = []


def _record_exit_handlers() -> None:
    """Start-up: keeps a list of the exit handlers the project registers."""

    def register(func, *args, **kwargs):
        _IMPORT_EXIT_HANDLERS.append((func, args, kwargs))
        return _ATEXIT_REGISTER(func, *args, **kwargs)

    def unregister(func) -> None:
        _IMPORT_EXIT_HANDLERS[:] = [h for h in _IMPORT_EXIT_HANDLERS if h[0] != func]
        _ATEXIT_UNREGISTER(func)

    register.__doc__, unregister.__doc__ = (
        _ATEXIT_REGISTER.__doc__,
        _ATEXIT_UNREGISTER.__doc__,
    )
    atexit.register, atexit.unregister = register, unregister


def _stop_recording_exit_handlers() -> None:
    atexit.register, atexit.unregister = _ATEXIT_REGISTER, _ATEXIT_UNREGISTER


def _per_process_exit_handlers() -> None:
    """Registers again, in their order, the exit handlers of the import that
    flush what the job holds: sentry-sdk's, and the ``stop`` of the queue
    listeners the job restarts (which writes what is still queued)."""
    for func, args, kwargs in _IMPORT_EXIT_HANDLERS:
        if _flushes_own_state(func):
            atexit.register(func, *args, **kwargs)


def _flushes_own_state(func) -> bool:
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"
    if name in _PER_PROCESS_EXIT_HANDLERS:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "stop" and any(
        owner is listener for listener in _LISTENERS_AT_FORK
    )


def _running_queue_listeners() -> list:
    """The worker's logging QueueListeners whose thread is running."""
    import logging.handlers

    found = []
    for thread in threading.enumerate():
        owner = getattr(getattr(thread, "_target", None), "__self__", None)
        if (
            isinstance(owner, logging.handlers.QueueListener)
            and getattr(owner, "_thread", None) is thread
        ):
            found.append(owner)
    return found


def _restart_queue_listeners() -> None:
    """Each listener gets its thread again, as in a fresh process. What its
    queue held at the fork is the worker's to write, not the job's; its
    locks are made anew, since the worker's thread may have held one."""
    import queue as queue_module

    for listener in _LISTENERS_AT_FORK:
        pending = listener.queue
        if type(pending) in (
            queue_module.Queue,
            queue_module.LifoQueue,
            queue_module.PriorityQueue,
        ):
            pending.mutex = threading.Lock()
            pending.not_empty = threading.Condition(pending.mutex)
            pending.not_full = threading.Condition(pending.mutex)
            pending.all_tasks_done = threading.Condition(pending.mutex)
            pending.queue.clear()
            pending.unfinished_tasks = 0
        listener._thread = None
        with contextlib.suppress(Exception):
            listener.start()


def _sentry_transport():
    """sentry-sdk's transport, if the project initialised it (None else)."""
    sentry = sys.modules.get("sentry_sdk")
    if sentry is None:
        return None
    try:
        return sentry.get_client().transport
    except Exception:  # noqa: BLE001 - whatever its version has
        return None


def _forget_the_workers_sentry_queue() -> None:
    """A job's sentry-sdk transport as a fresh process has it. Its queue of
    events (which its thread, restarted by sentry-sdk in a fork, sends)
    starts empty: what the worker had queued when it forked (an error logged
    by the project's import) is the worker's to send, and the job would send
    it a second time. Its connections are its own: the worker's, should one
    be open, must not carry the job's requests."""
    transport = _sentry_transport()
    if transport is None:
        return
    with contextlib.suppress(Exception):
        worker = getattr(transport, "_worker", None)
        pending = getattr(worker, "_queue", None)
        if pending is not None and hasattr(pending, "maxsize"):
            worker._queue = type(pending)(pending.maxsize)
            worker._lock = threading.Lock()
    with contextlib.suppress(Exception):
        if getattr(transport, "_pool", None) is not None:
            transport._pool = transport._make_pool()


# How long the worker waits for its own events to reach Sentry before it
# looks for sockets (a job waits meanwhile; past it, the job is spawned).
_SENTRY_SEND_WAIT = 1.0  # seconds


def _close_idle_sentry_connections() -> None:
    """The worker's own connections to Sentry (open while it sends what the
    project's import reported, such as an error logged in a ready(), and
    kept alive after) are sockets, which keep jobs from being forked: the
    worker lets its transport's thread finish sending (for at most
    _SENTRY_SEND_WAIT), then closes the idle connections before it looks
    for sockets. One still sending after that is counted."""
    transport = _sentry_transport()
    with contextlib.suppress(Exception):
        worker = getattr(transport, "_worker", None)
        if getattr(worker, "is_alive", False):
            worker._timed_queue_join(_SENTRY_SEND_WAIT)
    with contextlib.suppress(Exception):
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "clear"):
            pool.clear()


# Logging as it was once the worker configured it (django.setup() does so
# before importing the apps): (each logger's state by name, the handlers).
_LOGGING_AT_CONFIGURATION: tuple[dict, list] | None = None


def _loggers() -> dict:
    manager = logging.root.manager
    found = {"": logging.root}
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            found[name] = logger
    return found


def _logging_state() -> dict:
    return {
        name: (logger.level, logger.propagate, logger.disabled, list(logger.handlers))
        for name, logger in _loggers().items()
    }


@contextlib.contextmanager
def _noting_the_logging_configuration():
    """Worker start-up: notes logging's state once Django configured it."""
    from django.utils import log

    configure = log.configure_logging

    def configure_and_note(*args, **kwargs):
        global _LOGGING_AT_CONFIGURATION
        configure(*args, **kwargs)
        handlers = [ref() for ref in list(getattr(logging, "_handlerList", ()))]
        _LOGGING_AT_CONFIGURATION = (
            _logging_state(),
            [h for h in handlers if h is not None],
        )

    log.configure_logging = configure_and_note
    try:
        yield
    finally:
        log.configure_logging = configure


@contextlib.contextmanager
def _configuring_logging_as_manage_py():
    """The job's ``django.setup()`` configures logging again, as
    ``manage.py``'s does, so LOGGING's handlers are the job's own (their
    files opened now, their threads running, their streams the job's). But
    ``manage.py`` configures it before importing the apps, and the worker
    made loggers and handlers since (a command's or a models.py's
    module-level ``getLogger(__name__)``, a handler a ready() made or
    attached): dictConfig would take those loggers for ones that existed
    before it (disable them, unless LOGGING says
    ``disable_existing_loggers: False``; reset those below a configured
    one) and close those handlers. So the configuration does not see the
    handlers made since, and what was made or changed since the worker's
    configuration is as it was once the configuration is done."""
    from django.utils import log

    configure = log.configure_logging

    def configure_as_manage_py(*args, **kwargs):
        if _LOGGING_AT_CONFIGURATION is None:
            return configure(*args, **kwargs)
        at_configuration, configured = _LOGGING_AT_CONFIGURATION
        before = _logging_state()
        refs = list(getattr(logging, "_handlerList", ()))
        since = [r for r in refs if r() is not None and not _among(r(), configured)]
        with logging._lock:
            logging._handlerList[:] = [r for r in refs if r not in since]
        try:
            return configure(*args, **kwargs)
        finally:
            with logging._lock:
                logging._handlerList.extend(since)
            made_since = [r() for r in since]
            _restore_what_was_made_since(before, at_configuration, made_since)

    log.configure_logging = configure_as_manage_py
    try:
        yield
    finally:
        log.configure_logging = configure


def _among(handler, handlers) -> bool:
    return any(handler is other for other in handlers)


def _restore_what_was_made_since(
    before: dict, at_configuration: dict, made_since: list
) -> None:
    """After the job's configuration: a logger made since the worker's is as
    it was (manage.py's configuration never saw it); one that existed gets
    back what was changed since (its level, say) and the handlers made since
    that it had. A handler of the configuration a logger made since had is
    replaced by the new one of the same name."""
    configured_now = getattr(logging, "_handlers", {})
    loggers = _loggers()
    for name, (level, propagate, disabled, handlers) in before.items():
        logger = loggers.get(name)
        if logger is None:
            continue
        then = at_configuration.get(name)
        if then is None:
            logger.level, logger.propagate, logger.disabled = level, propagate, disabled
            wanted = []
            for handler in handlers:
                if not _among(handler, made_since):
                    handler = configured_now.get(handler.name)
                if handler is not None and not _among(handler, wanted):
                    wanted.append(handler)
            logger.handlers = wanted
            continue
        if level != then[0]:
            logger.level = level
        if propagate != then[1]:
            logger.propagate = propagate
        if disabled != then[2]:
            logger.disabled = disabled
        for handler in handlers:
            if _among(handler, made_since) and not _among(handler, logger.handlers):
                logger.addHandler(handler)
    with contextlib.suppress(AttributeError):
        logging.root.manager._clear_cache()


def _rebind_std_stream_handlers() -> None:
    """Job time: a logging StreamHandler made in the worker on its stdout or
    stderr (Django's ``console``: ``StreamHandler()`` takes sys.stderr) writes
    to the job's, as the one ``manage.py`` made writes to its own."""
    retired = {}
    for stream in _RETIRED_STREAMS:
        with contextlib.suppress(Exception):
            fd = stream.fileno()
            if fd in (1, 2):
                retired[id(stream)] = "stdout" if fd == 1 else "stderr"
    for ref in list(getattr(logging, "_handlerList", ())):
        handler = ref()
        stream = getattr(handler, "stream", None)
        if not isinstance(handler, logging.StreamHandler) or stream is None:
            continue
        # Made while the worker recorded its set-up's output: the recorder.
        inner = getattr(stream, "_dcsupervisor_stream", stream)
        name = retired.get(id(inner))
        if name is not None and getattr(sys, name) is not None:
            handler.acquire()
            try:
                handler.stream = getattr(sys, name)
            finally:
                handler.release()


def _reopen_log_files() -> None:
    """Job time: the files of the logging handlers opened again, as a fresh
    process opens them now (a file rotated or removed since the worker
    opened it would otherwise keep the job's lines; one opened with mode
    "w" is emptied, as each run of manage.py empties it). A time-rotating
    handler computes its next rollover anew, from the file, as its
    constructor does. For the handlers made elsewhere than in LOGGING (in a
    ready(), say), and for all when the job never sets Django up (the
    job's django.setup() makes LOGGING's anew)."""
    import logging.handlers

    for ref in list(getattr(logging, "_handlerList", ())):
        handler = ref()
        if not isinstance(handler, logging.FileHandler) or handler.stream is None:
            continue
        handler.acquire()
        try:
            old, handler.stream = handler.stream, None
            with contextlib.suppress(Exception):
                old.close()  # the job's copy of the descriptor only
            with contextlib.suppress(Exception):
                handler.stream = handler._open()
                if isinstance(handler, logging.handlers.WatchedFileHandler):
                    handler._statstream()
                if isinstance(handler, logging.handlers.TimedRotatingFileHandler):
                    path = handler.baseFilename
                    since = os.stat(path).st_mtime if os.path.exists(path) else None
                    handler.rolloverAt = handler.computeRollover(
                        int(since if since is not None else time.time())
                    )
        finally:
            handler.release()


# The gc functions that walk the heap, which gc.freeze() hides from them.
_HEAP_WALKERS = ("get_objects", "get_referrers")


def _see_the_whole_heap() -> None:
    """Gives the job the heap a fresh interpreter has: ``gc.freeze()`` (kept
    by the worker so forks share its pages) hides the preloaded objects from
    ``gc.get_objects()`` and ``gc.get_referrers()``, which tools such as
    django-extensions' ``list_signals`` walk. The first call of either
    unfreezes the heap and then does its work; a job that never walks the
    heap keeps it frozen, since the full collection that follows an
    unfreeze copies most of the worker's pages (docs/benchmarks.md)."""
    originals = {name: getattr(gc, name) for name in _HEAP_WALKERS}

    def unfreezing(name: str):
        def walk(*args, **kwargs):
            for original_name, original in originals.items():
                setattr(gc, original_name, original)
            gc.unfreeze()
            return originals[name](*args, **kwargs)

        walk.__name__ = name
        walk.__doc__ = originals[name].__doc__
        return walk

    for name in _HEAP_WALKERS:
        setattr(gc, name, unfreezing(name))


# ---------------------------------------------------------------------------
# What importing the project prints. A fresh `manage.py` imports the
# settings and the apps in every run, so what that prints (a `print()` in
# settings.py, a log line in a ready()) and warns about (a deprecated import
# in models.py, say: Python's default filters show a warning once per
# place) appears in every run's output. The worker did that importing once,
# before any fork, so its jobs would show none of it. So the worker records
# it, by when (setting Django up: "setup"; loading a command: ("command",
# name); running the checks in warm-up: "checks"): what is written to
# sys.stdout and sys.stderr (still written to the worker's own streams, its
# log), and the warnings (shown by the jobs only). Each job shows the
# records where `manage.py` would: after its `django.setup()`, once it has
# loaded that command, when it first runs the checks. Python still counts
# the warnings as shown, so a job does not show them a second time.
# ---------------------------------------------------------------------------

# when -> [("stdout" | "stderr", text) | ("warning", WarningMessage, showwarning)]
_RECORDED: dict[object, list[tuple]] = {}


class _RecordingStream:
    """sys.stdout or sys.stderr while the worker records: writes go where
    they went and are recorded too. Whatever kept a reference meanwhile (a
    logging handler made in the settings) keeps writing, unrecorded, to the
    stream it replaced, as it would have."""

    def __init__(self, stream, name: str, when: object) -> None:
        self._dcsupervisor_stream = stream
        self._dcsupervisor_name = name
        self._dcsupervisor_when = when

    def write(self, text):
        when = self._dcsupervisor_when
        if when is not None and isinstance(text, str) and text:
            _RECORDED.setdefault(when, []).append((self._dcsupervisor_name, text))
        return self._dcsupervisor_stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._dcsupervisor_stream, name)


@contextlib.contextmanager
def _recording(when: object):
    """Records what the standard streams are given and the warnings Python
    shows (instead of showing them) meanwhile.

    ``warnings._showwarnmsg`` is what both the C and the Python
    implementation call once the filters have decided to show a warning.
    The ``showwarning`` in force is kept with each record: Django's logging
    set-up routes warnings shown after it through the ``py.warnings`` logger
    (``logging.captureWarnings``), those shown before it (the settings') are
    written as they are."""
    show = warnings._showwarnmsg

    def record(message) -> None:
        _RECORDED.setdefault(when, []).append(
            ("warning", message, warnings.showwarning)
        )

    warnings._showwarnmsg = record
    recorders = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None:
            recorders[name] = _RecordingStream(stream, name, when)
            setattr(sys, name, recorders[name])
    try:
        yield
    finally:
        for name, recorder in recorders.items():
            # Whoever still holds it (the project may have wrapped it) only
            # writes through it from now on.
            recorder._dcsupervisor_when = None
            if getattr(sys, name) is recorder:
                setattr(sys, name, recorder._dcsupervisor_stream)
        if warnings._showwarnmsg is record:
            warnings._showwarnmsg = show


def _show_recorded(when: object) -> None:
    """Shows, once, in order, what the worker recorded at ``when``: the
    text on the job's own streams, the warnings as Python would have shown
    them then (to the job's sys.stderr, or its logging)."""
    for kind, *record in _RECORDED.pop(when, ()):
        if kind != "warning":
            stream = getattr(sys, kind)
            if stream is not None:
                stream.write(record[0])
            continue
        message, showwarning = record
        current = warnings.showwarning
        warnings.showwarning = showwarning
        try:
            warnings._showwarnmsg(message)
        finally:
            warnings.showwarning = current


def _show_warnings_where_manage_py_would() -> None:
    """Prefork time: hooks that show what the worker recorded (output and
    warnings) at the points of the job where `manage.py` would have shown
    it."""
    import django
    from django.core import checks, management

    setup = django.setup
    load_command_class = management.load_command_class
    run_checks = checks.run_checks

    def setup_then_warn(*args, **kwargs):
        django.setup = setup
        with _configuring_logging_as_manage_py():
            setup(*args, **kwargs)
        _show_recorded("setup")

    def load_command_class_then_warn(app_name, name):
        command = load_command_class(app_name, name)
        _show_recorded(("command", name))
        return command

    def warn_then_run_checks(*args, **kwargs):
        checks.run_checks = run_checks
        _show_recorded("checks")
        return run_checks(*args, **kwargs)

    django.setup = setup_then_warn
    # ManagementUtility and call_command look these up in their modules.
    management.load_command_class = load_command_class_then_warn
    checks.run_checks = warn_then_run_checks


class _OtherSettings(SystemExit):
    """A job asked for other settings than the worker's: it must not run."""


# Exit status of a job refused before it ran (as `exec` uses for the policy).
_REFUSED_STATUS = 126


def _refuse_other_settings() -> None:
    """Defence in depth: the worker is set up with one settings module, so a
    job whose ``--settings`` names another one, or that sets ``--pythonpath``
    (both read by Django's ``handle_default_options``), ends before anything
    runs instead of running on the wrong settings. The supervisor sends such
    jobs to a fresh ``manage.py`` (``exec``) or refuses them (the runner)."""
    from django.conf import settings
    from django.core import management
    from django.core.management import base

    ours = settings.SETTINGS_MODULE
    original = base.handle_default_options

    def handle_default_options(options) -> None:
        asked = getattr(options, "settings", None)
        pythonpath = getattr(options, "pythonpath", None)
        if (asked and asked != ours) or pythonpath:
            given = f"--settings={asked}" if asked and asked != ours else ""
            given = given or f"--pythonpath={pythonpath}"
            sys.stderr.write(
                f"dcsupervisor: {given} asks for another setup than the preloaded "
                f"worker's ({ours}); the command was not run. Run it with "
                '`python manage.py`, or with worker.isolation = "spawn".\n'
            )
            raise _OtherSettings(_REFUSED_STATUS)
        original(options)

    # execute_from_command_line imported its own reference to the function.
    base.handle_default_options = handle_default_options
    management.handle_default_options = handle_default_options


def _install_stdio(stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
    # Moving everything above 2 first keeps this right even when the worker
    # had fds 0-2 closed and received the descriptors under those numbers.
    sources = [stdin_fd, stdout_fd, stderr_fd]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in sources]
    for fd in sources:
        os.close(fd)
    for target, fd in enumerate(moved):
        os.dup2(fd, target)
        os.close(fd)


# Set by main(): how a fresh interpreter started like the worker would set up
# its standard streams (encoding and errors follow the locale,
# PYTHONIOENCODING and UTF-8 mode), and whether jobs get buffered streams
# (``exec``: as `manage.py` in the caller's terminal) or unbuffered ones (the
# runner, like `python -u`, so output reaches the control plane live).
_STDIO_CODECS: dict[str, tuple[str, str]] = {}
_BUFFERED_STDIO = False
# `exec`: the worker runs one job, so what the project's import registered to
# run at exit (exit handlers, finalizers) is that job's, as in manage.py.
_ONE_JOB = False
# The project's manage.py, run as __main__ by each job when it exists.
_MANAGE_PY: str | None = None


def _configure_job_stdio(caller_mode: bool) -> None:
    """Called at start-up, before anything can replace the worker's streams."""
    global _BUFFERED_STDIO
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, f"__{name}__", None)
        encoding = getattr(stream, "encoding", None) or "utf-8"
        errors = getattr(stream, "errors", None) or "strict"
        _STDIO_CODECS[name] = (encoding, errors)
    # PYTHONUNBUFFERED (there is no sys.flags field for it) shows here.
    unbuffered = getattr(sys.__stdout__, "write_through", False)
    _BUFFERED_STDIO = caller_mode and not unbuffered


def _rebuild_std_streams() -> None:
    """The standard streams CPython's ``create_stdio`` makes for a fresh
    interpreter on fds 0-2: buffered stdin; stdout line-buffered on a
    terminal and block-buffered otherwise; stderr line-buffered; all three
    write-through and unbuffered under ``python -u``."""
    _RETIRED_STREAMS.extend(
        [
            sys.stdin,
            sys.stdout,
            sys.stderr,
            sys.__stdin__,
            sys.__stdout__,
            sys.__stderr__,
        ]
    )
    sys.stdin = sys.__stdin__ = _std_stream(0, "stdin")
    sys.stdout = sys.__stdout__ = _std_stream(1, "stdout")
    sys.stderr = sys.__stderr__ = _std_stream(2, "stderr")


def _std_stream(fd: int, name: str) -> io.TextIOWrapper:
    writing = fd != 0
    # stdin is always buffered: TextIOWrapper reads through read1().
    buffered = _BUFFERED_STDIO or not writing
    mode, buffering = ("wb" if writing else "rb"), (-1 if buffered else 0)
    binary = open(fd, mode, buffering=buffering, closefd=False)  # noqa: SIM115
    raw = binary.raw if buffered else binary
    raw.name = f"<{name}>"
    encoding, errors = _STDIO_CODECS.get(name, ("utf-8", "strict"))
    stream = io.TextIOWrapper(
        binary,
        encoding=encoding,
        errors=errors,
        newline="\n",
        line_buffering=_BUFFERED_STDIO and (raw.isatty() or fd == 2),
        write_through=not _BUFFERED_STDIO,
    )
    stream.mode = "w" if writing else "r"
    return stream


def _execute(argv: list[str], limits: dict | None = None) -> int:
    """Runs the command and finishes like the interpreter: the exit status."""
    interrupted = False
    try:
        _run_manage_py(argv)
        status = 0
    except SystemExit as exc:
        status = _system_exit_status(exc)
    except KeyboardInterrupt as exc:
        _print_exception(exc)
        interrupted, status = True, 128 + signal.SIGINT
    except BaseException as exc:  # noqa: BLE001 - what the interpreter does at top level
        _print_exception(exc)
        if isinstance(exc, MemoryError) and (limits or {}).get("address_space_bytes"):
            mib = limits["address_space_bytes"] // (1024 * 1024)
            sys.stderr.write(
                f"[dcsupervisor] the command reached its memory limit ({mib} MiB)\n"
            )
        status = 1
    status = _finalize(status)
    if interrupted:
        _die_by_sigint()
    return status


def _run_manage_py(argv: list[str]) -> None:
    """Runs the project's own manage.py as ``__main__``, as ``python
    manage.py`` does (whatever it does around ``execute_from_command_line``
    happens, and tracebacks show its frames); Django itself is set up
    already, so this costs microseconds."""
    sys.argv = argv
    if _MANAGE_PY is None:
        from django.core.management import execute_from_command_line

        execute_from_command_line(argv)
        return
    runpy.run_path(_MANAGE_PY, run_name="__main__")


def _system_exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _print_exception(exc: BaseException) -> None:
    """What CPython does with an uncaught exception (``PyErr_Print``): it
    sets ``sys.last_*`` and hands the exception to ``sys.excepthook``,
    which error trackers replace (sentry-sdk's reports it, then prints it
    through the hook it replaced); the default hook prints the traceback.
    A hook that fails is reported as CPython reports it."""
    # As under manage.py, the exception's traceback starts in manage.py (the
    # default hook prints the exception's own, not the one it is given).
    tb = _from_manage_py(exc.__traceback__)
    exc.__traceback__ = tb
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    hook = getattr(sys, "excepthook", None)
    with contextlib.suppress(Exception):
        if hook is None:
            sys.stderr.write("sys.excepthook is missing\n")
            traceback.print_exception(type(exc), exc, tb)
            return
        try:
            hook(type(exc), exc, tb)
        except BaseException as failed:  # noqa: BLE001 - reported, as CPython does
            sys.stderr.write("Error in sys.excepthook:\n")
            traceback.print_exception(type(failed), failed, failed.__traceback__)
            sys.stderr.write("\nOriginal exception was:\n")
            traceback.print_exception(type(exc), exc, tb)


def _from_manage_py(tb):
    """The traceback from manage.py's first frame on, as ``python manage.py``
    prints it, without this file's and runpy's frames; from the frame after
    ours when there is no manage.py frame."""
    first = tb
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _MANAGE_PY:
            return tb
        tb = tb.tb_next
    return first.tb_next if first is not None else None


def _finalize(status: int) -> int:
    """What interpreter shutdown would do before exiting with ``status``:
    wait for the threads (after threading's own exit hooks, such as the one
    that lets a ThreadPoolExecutor finish its work), run the exit handlers,
    shut logging down, flush the standard streams."""
    _wait_for_threads()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        logging.shutdown()
    if not _flush(sys.stdout, report=True):
        status = 120  # as CPython does when flushing stdout fails at exit
    _flush(sys.stderr)
    return status


def _wait_for_threads() -> None:
    """What CPython's ``Py_FinalizeEx`` does first: ``threading._shutdown()``,
    which runs the hooks registered with ``threading._register_atexit`` and
    joins every non-daemon thread the command started. An exception there
    (a Ctrl-C while waiting) is reported as CPython reports it, and the exit
    goes on."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:
        return
    try:
        shutdown()
    except BaseException as exc:  # noqa: BLE001 - reported, as CPython does
        with contextlib.suppress(Exception):
            text = "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)
            )
            sys.stderr.write(f"Exception ignored in: {threading!r}\n{text}")


def _flush(stream, report: bool = False) -> bool:
    if stream is None or getattr(stream, "closed", True):
        return True
    try:
        stream.flush()
    except Exception as exc:  # noqa: BLE001 - the stream may be anything the command set
        if report:
            _report_unraisable(exc, stream)
        return False
    return True


def _report_unraisable(exc: BaseException, where: object) -> None:
    """What CPython's default ``sys.unraisablehook`` prints when flushing
    stdout at exit fails (the hook itself only takes arguments CPython
    builds); the flush is C code, so there is no traceback."""
    with contextlib.suppress(Exception):
        only = "".join(traceback.format_exception_only(type(exc), exc))
        sys.stderr.write(f"Exception ignored in: {where!r}\n{only}")


def _die_by_sigint() -> None:
    # Like CPython after an uncaught KeyboardInterrupt, so the parent sees
    # death by SIGINT and a shell would stop a loop calling us.
    with contextlib.suppress(BaseException):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------
# ParseArgs: a command's arguments as the command's own parser reads them, so
# the supervisor's argument rules see what the job would see (an abbreviated
# `--datab=x` is `--database`). Nothing runs, prints or exits.
# ---------------------------------------------------------------------------

# The default of an optional positional (nargs="?"), so that "absent" can be
# told from "given the default". Not a str: argparse would convert one.
_NOT_GIVEN = object()
_RECORDING_CLASSES: dict[type, type] = {}


def setting_values(names: list[str]) -> list[str]:
    """The non-empty string (or number) values at the named dotted paths of
    Django's settings; ``*`` matches every key of a dict or item of a list."""
    from django.conf import settings

    values: list[str] = []
    for name in names:
        head, *rest = name.split(".")
        found = [getattr(settings, head, None)]
        for part in rest:
            found = [child for node in found for child in _children(node, part)]
        values.extend(str(v) for v in found if isinstance(v, (str, int)) and str(v))
    return values


def _children(node: object, part: str) -> list:
    if isinstance(node, dict):
        return (
            list(node.values()) if part == "*" else [node[part]] if part in node else []
        )
    if isinstance(node, (list, tuple)) and part == "*":
        return list(node)
    return []


def parse_command_args(name: str, args: list[str]) -> dict:
    """A ``ParseOutcome``: every argument ``args`` actually gives ``name``.

    The parser is built exactly as for a job
    (``create_parser("manage.py", name)``); a command not called from the
    command line makes Django's parser raise ``CommandError`` instead of
    printing usage and exiting, which gives the message to report.
    """
    from django.core.management import BaseCommand, get_commands, load_command_class
    from django.core.management.base import CommandError

    given: list[dict] = []
    captured = io.StringIO()
    try:
        app = get_commands().get(name)
        if app is None:
            return _refused(f"Unknown command: {name!r}")
        with _recording(("command", name)):
            command = (
                app if isinstance(app, BaseCommand) else load_command_class(app, name)
            )
            parser = command.create_parser("manage.py", name)
        _record_given(parser, given)
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            parser.parse_args(list(args))
    except CommandError as exc:
        return _refused(str(exc))
    except SystemExit as exc:
        text = captured.getvalue().strip()
        return _refused(text or f"the parser of {name!r} exited with status {exc.code}")
    except Exception as exc:  # noqa: BLE001 - a project's parser may raise anything
        return _refused(
            "".join(traceback.format_exception_only(type(exc), exc)).strip()
        )
    return {"Parsed": {"given": given}}


def _refused(message: str) -> dict:
    return {"Refused": {"message": _clip(message)}}


def _record_given(parser: argparse.ArgumentParser, given: list) -> None:
    """Makes every action of ``parser`` (and its subparsers) append to ``given``
    when the command line invokes it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in {id(p): p for p in action.choices.values()}.values():
                _record_given(subparser, given)
        if not action.option_strings and action.nargs == argparse.OPTIONAL:
            action.default = _NOT_GIVEN
        action._dcsupervisor_given = given
        action.__class__ = _recording_class(type(action))


def _recording_class(cls: type) -> type:
    recording = _RECORDING_CLASSES.get(cls)
    if recording is None:
        # Help and version would print and exit: they are only recorded.
        silent = issubclass(cls, (argparse._HelpAction, argparse._VersionAction))

        def __call__(self, parser, namespace, values, option_string=None):
            arg = _given_arg(self, values)
            if arg is not None:
                self._dcsupervisor_given.append(arg)
            if not silent:
                cls.__call__(self, parser, namespace, values, option_string)

        recording = type(cls.__name__, (cls,), {"__call__": __call__})
        _RECORDING_CLASSES[cls] = recording
    return recording


def _given_arg(action: argparse.Action, values: object) -> dict | None:
    """A ``GivenArg``, or None for a positional left out (argparse still
    invokes it, with its default)."""
    if values is _NOT_GIVEN:
        return None
    if not action.option_strings and (
        values is action.default or (isinstance(values, list) and not values)
    ):
        return None
    if isinstance(action, argparse._SubParsersAction):
        values = values[:1]  # the rest is the subparser's, recorded by it
    dest = action.dest
    if dest == argparse.SUPPRESS:
        longest = max(action.option_strings, key=len, default="subcommand")
        dest = longest.lstrip("-").replace("-", "_")
    return {
        "dest": dest,
        "flags": list(action.option_strings),
        "values": _strings(values),
    }


def _strings(values: object) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (list, tuple)):
        return [text for value in values for text in _strings(value)]
    return [str(values)]


# ---------------------------------------------------------------------------
# InspectFork: what a forked job would share with the worker and its other
# jobs, or lose (docs/fidelity.md). A fresh `manage.py` has none of this.
# ---------------------------------------------------------------------------


# Descriptors the worker was started with (before the project's code ran):
# a fresh `manage.py` started by the same parent inherits them as well.
_STARTUP_FDS: set[int] = set()


def fork_hazards(own_fds: set[int], shared_randoms: list[str]) -> list[dict]:
    """``ForkHazard`` values for the worker as it is now."""
    _close_idle_sentry_connections()
    hazards = _descriptor_hazards(own_fds) + _thread_hazards()
    hazards += [_hazard("SharedRandom", where) for where in shared_randoms]
    return hazards


def _hazard(kind: str, detail: str) -> dict:
    return {"kind": kind, "detail": _clip(detail, 1000)}


def _open_fds() -> list[int]:
    """The process's open descriptors (not the one used to list them)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            listed = sorted(int(name) for name in os.listdir(listing) if name.isdigit())
            return [fd for fd in listed if _is_open(fd)]
    return []


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _descriptor_hazards(own_fds: set[int]) -> list[dict]:
    hazards = []
    for fd in _open_fds():
        if fd <= 2 or fd in own_fds or fd in _STARTUP_FDS:
            continue
        try:
            mode = os.fstat(fd).st_mode
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue  # the listing's own descriptor, closed since
        if stat.S_ISSOCK(mode):
            hazards.append(_hazard("Socket", f"fd {fd}: {_describe_socket(fd)}"))
        elif not (stat.S_ISREG(mode) and flags & os.O_APPEND):
            # Appending (log files) is safe to share; offsets and locks are not.
            hazards.append(_hazard("Descriptor", f"fd {fd}: {_describe_fd(fd)}"))
    return hazards


def _describe_socket(fd: int) -> str:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "socket"
    with sock:
        peer = None
        with contextlib.suppress(OSError):
            peer = sock.getpeername()
        connected = f" connected to {peer!r}" if peer else ""
        return f"{sock.family.name} socket{connected}"


def _describe_fd(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return "open descriptor"


def _thread_hazards() -> list[dict]:
    threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
    hazards = [
        _hazard(
            "Thread", f"thread {t.name!r} ({type(t).__module__}.{type(t).__name__})"
        )
        for t in threads
        if not _restarted_in_a_fork(t)
    ]
    with contextlib.suppress(OSError):
        native = len(os.listdir("/proc/self/task")) - 1 - len(threads)
        if native > 0:
            hazards.append(
                _hazard("Thread", f"{native} thread(s) started outside Python")
            )
    return hazards


def _restarted_in_a_fork(thread: threading.Thread) -> bool:
    """Threads a job gets again: a logging QueueListener's (the job restarts
    it) and sentry-sdk's (it restarts them itself, by pid)."""
    if any(thread is listener._thread for listener in _running_queue_listeners()):
        return True
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or ""
    return module.startswith("sentry_sdk.")


def shared_random_generators() -> list[str]:
    """Where the ``random.Random`` instances besides ``random``'s own live:
    a fork copies their state, so every job draws the same numbers. Walks
    the whole heap, so it runs once, at warm-up."""
    found = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, random.Random)
        and not isinstance(obj, random.SystemRandom)
        and obj is not getattr(random, "_inst", None)
    ]
    if not found:
        return []
    names = _module_names_of({id(obj) for obj in found})
    return [
        names.get(id(obj), f"a {type(obj).__module__}.{type(obj).__name__} instance")
        for obj in found
    ]


def _module_names_of(ids: set[int]) -> dict[int, str]:
    names: dict[int, str] = {}
    for module_name, module in list(sys.modules.items()):
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in ids:
                names.setdefault(id(value), f"{module_name}.{attr}")
    return names


# ---------------------------------------------------------------------------
# The worker.
# ---------------------------------------------------------------------------

_REAP_INTERVAL = 1.0  # seconds; a safety net should a SIGCHLD wakeup be lost
_RECV_SIZE = 64 * 1024
_STDIO_FDS = 3  # a Run carries the job's stdin, stdout and stderr
_MAX_FDS_PER_RECV = 16  # the supervisor sends 3 per Run; room for a bad peer
_FD_SIZE = array.array("i").itemsize
_CMSG_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_LOG_LIMIT = 256 * 1024  # characters; keeps any Log far below the frame limit


class Worker:
    """One supervisor connection: requests in, events out, jobs forked and reaped."""

    def __init__(
        self, sock: socket.socket, warm_up: bool = True, prefork: bool = True
    ) -> None:
        self.sock = sock
        # Worth it for a worker that forks many jobs; `exec` forks one.
        self.warm_up = warm_up
        self.prefork = prefork  # keep a spare (False: fork each job on demand)
        self.frames = FrameDecoder()
        self.fds: collections.deque[int] = collections.deque()
        self.jobs: dict[int, int] = {}  # job id -> pid (also its process group)
        # pid -> job id, until reaped; a job whose end its child already
        # reported has left self.jobs but stays here (and in self.reported).
        self.pids: dict[int, int] = {}
        self.reported: set[int] = set()
        self.children: dict[int, _Child] = {}  # pid -> channel, spare or job
        self.spare: _Child | None = None
        # Copy-on-write prefault: the pages a scout's job wrote, and spares so far.
        self.hot_runs: array.array | None = None
        self.spares_forked = 0
        self.shutting_down = False
        self.wake_r, self.wake_w = os.pipe()
        self.selector = selectors.DefaultSelector()
        self.commands: list[dict] | None = None
        self.shared_randoms: list[str] = []

    # --- sending ---------------------------------------------------------

    def send(self, variant: str, **fields) -> None:
        send_frame(self.sock, "Event", {variant: fields})

    def log(self, level: str, message: str) -> None:
        self.send("Log", level=level, message=_clip(message))

    # --- main loop -------------------------------------------------------

    def serve(self) -> int:
        """Runs until EOF, SIGTERM, a finished Shutdown or a protocol error."""
        try:
            if self.warm_up:
                self._warm_up()
            self._install_signals()
            self.selector.register(self.sock, selectors.EVENT_READ)
            self.selector.register(self.wake_r, selectors.EVENT_READ)
            self._refill_spare()
            return self._loop()
        except ProtocolError as exc:
            print(
                f"dcsupervisor worker: protocol error: {exc}",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(Exception):
                self.log("Error", f"protocol error: {exc}")
            return 2
        except ConnectionError:
            return 0  # the supervisor is gone
        finally:
            self._kill_all_jobs()
            self._discard_spare()

    def _install_signals(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        # Python-level handlers that do nothing: the C handler still writes
        # the signal number to the wakeup pipe, which the loop acts on, and
        # no exception can surface in the middle of a sendall.
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, _ignore_signal)

    def _loop(self) -> int:
        # Reported jobs count until reaped: their leftovers are killed then.
        while not (self.shutting_down and not self.pids):
            for key, _ in self.selector.select(timeout=_REAP_INTERVAL):
                if key.fd == self.wake_r:
                    if signal.SIGTERM in self._drain_wakeups():
                        return 128 + signal.SIGTERM
                elif key.data is not None:
                    self._child_says(key.data)
                elif not self._receive():
                    return 0  # EOF: the supervisor is gone
            self._reap()
        return 0

    def _drain_wakeups(self) -> set[int]:
        signals = set()
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.wake_r, 512):
                signals.update(data)
        return signals

    def _receive(self) -> bool:
        """Reads what the socket has; False at end of stream."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(
                _RECV_SIZE, socket.CMSG_SPACE(_MAX_FDS_PER_RECV * _FD_SIZE), _CMSG_FLAGS
            )
        except ConnectionResetError:
            return False
        self._queue_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("ancillary data truncated: descriptors were lost")
        if not data:
            return False
        for payload in self.frames.feed(data):
            self._handle(decode("Request", payload))
        return True

    def _queue_fds(self, ancdata: list) -> None:
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                self.fds.extend(fds)

    def _handle(self, request: object) -> None:
        match request:
            case "Discover":
                self._discover()
            case "Shutdown":
                self.shutting_down = True
                self._discard_spare()
            case {
                "Run": {"job": job, "command": command, "args": args, "limits": limits}
            }:
                self._run(job, command, args, limits)
            case {"Signal": {"job": job, "signal": signum}}:
                self._signal(job, signum)
            case {"ParseArgs": {"request": request, "command": command, "args": args}}:
                result = parse_command_args(command, args)
                self.send("ParsedArgs", request=request, result=result)
            case {"InspectFork": {"request": request}}:
                hazards = fork_hazards(self._own_fds(), self.shared_randoms)
                self.send("ForkHazards", request=request, hazards=hazards)
            case {"ReadSettings": {"request": request, "names": names}}:
                self.send(
                    "SettingValues", request=request, values=setting_values(names)
                )

    # --- Discover --------------------------------------------------------

    def _warm_up(self) -> None:
        """Does once, before any fork, the work every job would redo.

        Loading every command (and building its parser) and running the
        system checks import modules and fill caches that `manage.py` would
        load in each process; done here, the children inherit them warm.
        The checks' results are ignored: each job runs them again and reports
        them exactly as `manage.py` would.
        """
        from django.core import checks
        from django.db import connections

        self.commands = self._describe_all()
        _prime_command_line_parser()
        _load_madvise()
        try:
            with _recording("checks"):
                checks.run_checks()
        except Exception:  # noqa: BLE001 - a job will report it properly
            self.log(
                "Debug", "system checks failed in warm-up:\n" + traceback.format_exc()
            )
        # Loading commands or checks may have connected; forks must not share that.
        connections.close_all()
        # The objects frozen after django.setup() are invisible until unfrozen.
        gc.unfreeze()
        self.shared_randoms = shared_random_generators()
        gc.freeze()

    def _describe_all(self) -> list[dict]:
        from django.core.management import get_commands

        return [
            self._describe(name, app) for name, app in sorted(get_commands().items())
        ]

    def _discover(self) -> None:
        # The worker's code never changes after start-up, so neither do its commands.
        if self.commands is None:
            self.commands = self._describe_all()
        self.send("Commands", commands=self.commands)

    def _describe(self, name: str, app: object) -> dict:
        from django.core.management import BaseCommand, load_command_class

        # Tests sometimes register a command instance instead of an app name.
        app_label = app if isinstance(app, str) else type(app).__module__
        try:
            with _recording(("command", name)):
                command = (
                    app
                    if isinstance(app, BaseCommand)
                    else load_command_class(app, name)
                )
                help_text = command.create_parser("manage.py", name).format_help()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any project bug
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.log(
                "Warning", f"command {name!r} ({app_label}) failed to load: {error}"
            )
            self.log("Debug", traceback.format_exc())
            help_text = ""
        return {"name": name, "app_label": app_label, "help_text": help_text}

    # --- Run -------------------------------------------------------------

    def _run(self, job: int, command: str, args: list[str], limits: dict) -> None:
        fds = [self.fds.popleft() for _ in range(min(_STDIO_FDS, len(self.fds)))]
        error = None
        if len(fds) < _STDIO_FDS:
            error = f"Run needs 3 descriptors (stdin, stdout, stderr), got {len(fds)}"
        elif self.shutting_down:
            error = "worker is shutting down"
        elif job in self.jobs:
            error = f"job {job} is already running"
        if error is None:
            order = {"job": job, "command": command, "args": args, "limits": limits}
            try:
                pid = self._start_on_a_child(order, fds)
            except OSError as exc:
                error = f"fork failed: {exc}"
        # The child has its copies; ours would keep the pipes open past its death.
        _close_quietly(fds)
        if error is not None:
            self.send("JobFailed", job=job, error=error)
            return
        self.jobs[job] = pid
        self.pids[pid] = job
        self.send("JobStarted", job=job, pid=pid)
        # The next job's process is forked now, while this one runs.
        self._refill_spare()

    # --- prefork ---------------------------------------------------------

    def _start_on_a_child(self, order: dict, fds: list[int]) -> int:
        """Hands the job to the spare (or to a fresh fork); the child's pid."""
        child = self.spare or self._fork_child(fds)
        self.spare = None
        try:
            _send_order(child.channel, order, fds)
        except OSError as exc:
            # The spare died while waiting (or cannot be reached): one fresh try.
            self.log("Warning", f"spare job process {child.pid} is gone ({exc})")
            self._abandon(child)
            child = self._fork_child(fds)
            try:
                _send_order(child.channel, order, fds)
            except OSError:
                self._abandon(child)
                raise
        return child.pid

    def _refill_spare(self) -> None:
        if self.spare is not None or self.shutting_down or not self.prefork:
            return
        try:
            self.spare = self._fork_child()
        except OSError as exc:
            # Not fatal: the next job forks on demand.
            self.log("Warning", f"could not fork a spare job process: {exc}")

    def _discard_spare(self) -> None:
        """Reload, settings change and recycle all end this worker: its spare
        (forked from this worker's code and settings) must not run a job."""
        spare, self.spare = self.spare, None
        if spare is not None:
            self._abandon(spare)

    def _abandon(self, child: _Child) -> None:
        with contextlib.suppress(OSError):
            _kill_group(child.pid, signal.SIGKILL)
        self._forget_channel(child.pid)

    def _fork_child(self, job_fds: tuple[int, ...] | list[int] = ()) -> _Child:
        """Forks a child that sets itself up and waits for its job.

        ``job_fds`` are the stdio descriptors of a job about to be handed
        over: the child gets its own copies with the order, and must not keep
        these.
        """
        from django.db import connections

        connections.close_all()
        threads = threading.active_count()
        if threads > 1:
            # Reported with the other fork hazards at start-up and by `check`.
            message = f"{threads} threads alive at fork; only this one"
            self.log("Debug", message + " carries on in the job")
        # Anything still buffered would otherwise be written again by the child.
        _flush(sys.stdout)
        _flush(sys.stderr)
        plan = self._page_plan(on_demand=bool(job_fds))
        _LISTENERS_AT_FORK[:] = _running_queue_listeners()
        gc.freeze()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocked until the child has reset its handlers: a signal meant for
        # the job must not run the worker's handlers (and wake the worker
        # through the shared wakeup pipe) in the child.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    worker_fds = [*self._fds_to_close_in_child(), *job_fds]
                    ours.close()
                    _spare_main(theirs, worker_fds, plan)
                finally:
                    os._exit(70)
        except OSError:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            theirs.close()
        child = _Child(pid, ours)
        self.children[pid] = child
        self.selector.register(ours, selectors.EVENT_READ, data=pid)
        return child

    def _page_plan(self, on_demand: bool) -> _PagePlan:
        if on_demand:
            return _PagePlan(None, scout=False)  # its job is already waiting
        self.spares_forked += 1
        scout = self.hot_runs is None or self.spares_forked % _SCOUT_EVERY == 0
        return _PagePlan(None if scout else self.hot_runs, scout)

    def _own_fds(self) -> set[int]:
        """The worker's own descriptors: never a hazard, closed in every job."""
        return {
            self.sock.fileno(),
            self.selector.fileno(),
            self.wake_r,
            self.wake_w,
            *self.fds,
            # The private channels to the spare and the running jobs.
            *(child.channel.fileno() for child in self.children.values()),
        }

    def _fds_to_close_in_child(self) -> list[int]:
        # Closing the socket and selector objects (not just their numbers)
        # keeps them from closing a reused fd later. Neither close() touches
        # the state the parent shares: no shutdown(), no epoll_ctl().
        fds = [self.wake_r, self.wake_w, *self.fds]
        self.sock.close()
        self.selector.close()
        for child in self.children.values():
            child.channel.close()
        self.fds.clear()
        return fds

    def _child_says(self, pid: int) -> bool:
        """A child's channel is readable: its exit status, or its end.
        True if something was read.

        Whatever arrives, the reap still follows and has the last word for a
        job that did not report; a channel that misbehaves is only closed.
        """
        child = self.children.get(pid)
        if child is None:
            return False
        try:
            data = child.channel.recv(_RECV_SIZE)
            payloads = child.frames.feed(data)
        except BlockingIOError:
            return False
        except (OSError, ProtocolError):
            data, payloads = b"", []
        for payload in payloads:
            if child.reported:
                self._learn_pages(payload)
                continue
            child.reported = True
            with contextlib.suppress(ProtocolError):
                self._job_reported(pid, decode("Event", payload))
        if not data:
            self._forget_channel(pid)
        return bool(data)

    def _drain_channel(self, pid: int) -> None:
        """Reads what a reaped child sent before it died, then closes its
        channel: it may have reported (and a scout listed its pages) after
        the last time the loop looked."""
        child = self.children.get(pid)
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.channel.setblocking(False)
        # Until EOF, or nothing more for now (a process it forked holds it open).
        while self._child_says(pid):
            pass
        self._forget_channel(pid)

    def _learn_pages(self, payload: bytes) -> None:
        """A scout's list of the pages its job wrote, for the next spares."""
        if not payload or len(payload) % 16 or len(payload) > _MAX_HOT_PAGES * 16:
            return
        runs = array.array("Q")
        runs.frombytes(payload)
        self.hot_runs = runs

    def _job_reported(self, pid: int, event: object) -> None:
        match event:
            case {"JobExited": {"job": job, "status": {"Code": {"code": code}}}}:
                if self.jobs.get(job) == pid and pid not in self.reported:
                    del self.jobs[job]
                    self.reported.add(pid)
                    self.send("JobExited", job=job, status={"Code": {"code": code}})

    def _forget_channel(self, pid: int) -> None:
        child = self.children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.channel)
            child.channel.close()

    # --- Signal ----------------------------------------------------------

    def _signal(self, job: int, signum: int) -> None:
        pid = self.jobs.get(job)
        if pid is None:
            return  # already reaped, or never ours
        try:
            _kill_group(pid, signum)
        except OSError as exc:
            self.log("Warning", f"cannot send signal {signum} to job {job}: {exc}")

    def _kill_all_jobs(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(OSError):
                _kill_group(pid, signal.SIGKILL)

    # --- reaping ---------------------------------------------------------

    def _reap(self) -> None:
        while (reaped := self._reap_one()) is not None:
            pid, status = reaped
            self._drain_channel(pid)
            if self.spare is not None and self.spare.pid == pid:
                # Died waiting (OOM killer, a stray signal). Not replaced here,
                # so a spare that cannot start does not fork in a loop: the
                # next job forks on demand and refills it.
                self.spare = None
                self.log("Warning", f"spare job process {pid} died: {status:#x}")
            job = self.pids.pop(pid, None)
            if pid in self.reported:
                self.reported.discard(pid)
            elif job is not None:
                del self.jobs[job]
                self.send("JobExited", job=job, status=_exit_status(status))

    def _reap_one(self) -> tuple[int, int] | None:
        """Reaps one exited child, first killing what is left of a job's group."""
        if not hasattr(os, "waitid"):  # macOS before Python 3.13
            return self._reap_one_without_waitid()
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is None:
            return None
        pid = info.si_pid
        if pid in self.pids:
            # Still a zombie, so its pid (and group id) cannot be reused yet.
            with contextlib.suppress(OSError):
                _kill_group(pid, signal.SIGKILL)
        try:
            return os.waitpid(pid, 0)
        except ChildProcessError:
            return None

    def _reap_one_without_waitid(self) -> tuple[int, int] | None:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0:
            return None
        if pid in self.pids:
            # The kernel does not hand out a pid still used as a group id, so
            # while the group has members this reaches only them.
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        return pid, status


def _ignore_signal(signum, frame) -> None:
    pass


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        # The child has not reached setsid() yet; its signals are blocked
        # until it has its default handlers, so a direct kill is right.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _prime_command_line_parser() -> None:
    """Parses once with a parser built like ``ManagementUtility.execute``'s.

    argparse compiles a regular expression for its catch-all positional on
    first use; compiled here, it is in the ``re`` cache every child inherits
    instead of being compiled again in each job (measured as the only Python
    work a job's first run does beyond a warm second run).
    """
    from django.core.management.base import CommandParser

    parser = CommandParser(usage="%(prog)s subcommand", add_help=False)
    parser.add_argument("--settings")
    parser.add_argument("--pythonpath")
    parser.add_argument("args", nargs="*")
    with contextlib.suppress(Exception, SystemExit):
        parser.parse_known_args(["help"])


class _Child:
    """A forked child and the worker's end of its private channel."""

    __slots__ = ("channel", "frames", "pid", "reported")

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        self.frames = FrameDecoder()
        self.reported = False  # its first frame (the exit report) has come


# Seconds a child has to take its order; only a stopped child takes longer.
_ORDER_TIMEOUT = 10.0


def _send_order(channel: socket.socket, order: dict, fds: list[int]) -> None:
    """The job for a child: the `Run` frame with its stdio descriptors attached."""
    frame = encode_frame("Request", {"Run": order})
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    channel.settimeout(_ORDER_TIMEOUT)
    try:
        sent = channel.sendmsg([frame], rights)
        # Only the rest, if any: the child may have run its job and exited
        # already, and even an empty send to a closed peer fails (EPIPE),
        # which would have the job run again on another child.
        if sent < len(frame):
            channel.sendall(frame[sent:])
    finally:
        channel.setblocking(True)


def _exit_status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"Signal": {"signal": os.WTERMSIG(status)}}
    return {"Code": {"code": os.WEXITSTATUS(status)}}


def _close_quietly(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _clip(text: str, limit: int = _LOG_LIMIT) -> str:
    if len(text) <= limit:
        return text
    # Both ends: a traceback's last lines name the error.
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


# ---------------------------------------------------------------------------
# Start-up.
# ---------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dcsupervisor-worker",
        description="Django set up once, one fork per management command.",
    )
    parser.add_argument(
        "--project-dir", default=".", help="the Django project (put first on sys.path)"
    )
    parser.add_argument(
        "--settings", help="settings module (default: $DJANGO_SETTINGS_MODULE)"
    )
    parser.add_argument(
        "--caller-mode",
        action="store_true",
        help="jobs for `exec`: buffered streams as a fresh interpreter has them"
        " (and no spare: `exec` runs one job)",
    )
    parser.add_argument(
        "--no-prefork",
        dest="prefork",
        action="store_false",
        help="fork each job's process when its job comes, not ahead of time",
    )
    return parser.parse_args(argv)


SETUP_ENV_FD_ENV = "DJANGOCOMMAND_SETUP_ENV_FD"


def _take_setup_env() -> list[str]:
    """Puts the variables meant for Django's set-up only (the API key, which
    settings.py may read) into the environment; returns their names.

    The supervisor sends them as JSON over an inherited pipe rather than in
    the environment, so they are not in /proc/<pid>/environ of this process
    or of any job forked from it; :func:`_drop_setup_env` removes them again
    once Django is set up, so no job's ``os.environ`` has them either.
    """
    fd = os.environ.pop(SETUP_ENV_FD_ENV, None)
    if fd is None:
        return []
    with os.fdopen(int(fd), "rb") as pipe:
        variables = json.loads(pipe.read())
    os.environ.update(variables)
    return list(variables)


def _drop_setup_env(names: list[str]) -> None:
    for name in names:
        os.environ.pop(name, None)


def _setup_django(project_dir: str, settings: str | None):
    global _MANAGE_PY
    project = os.path.abspath(project_dir)
    # `python manage.py` puts the project first on sys.path and not the
    # current directory (which `python -` put there as '').
    sys.path[:] = [project, *(p for p in sys.path if p)]
    manage_py = os.path.join(project, "manage.py")
    _MANAGE_PY = manage_py if os.path.isfile(manage_py) else None
    if settings:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings
    with _recording("setup"):
        # Importing Django may warn too (about the interpreter, say).
        import django
        from django.db import connections

        with _noting_the_logging_configuration():
            django.setup()
    # Nothing set up here should be shared with the children through a fork.
    connections.close_all()
    gc.freeze()
    return django


def main(argv: list[str] | None = None) -> int:
    global _ONE_JOB
    args = _parse_args(argv)
    _ONE_JOB = args.caller_mode
    _configure_job_stdio(args.caller_mode)
    _STARTUP_FDS.update(_open_fds())
    # The supervisor owns the terminal and decides what a Ctrl-C does to jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Jobs should see the environment manage.py would, not our plumbing.
    sock = socket.socket(fileno=int(os.environ.pop(WORKER_FD_ENV, "3")))
    sock.set_inheritable(False)
    setup_only = _take_setup_env()
    _record_exit_handlers()
    try:
        django = _setup_django(args.project_dir, args.settings)
    except BaseException:  # noqa: BLE001 - the supervisor must hear why
        error = _clip(traceback.format_exc())
        with contextlib.suppress(OSError):
            send_frame(
                sock,
                "Event",
                {"StartupFailed": {"protocol": PROTOCOL_VERSION, "error": error}},
            )
        return 1
    finally:
        _drop_setup_env(setup_only)
    # `exec` runs one job: neither warm-up nor a spare would pay for itself.
    worker = Worker(
        sock,
        warm_up=not args.caller_mode,
        prefork=args.prefork and not args.caller_mode,
    )
    hello = {
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python_version": platform.python_version(),
        "django_version": django.get_version(),
    }
    try:
        worker.send("Hello", **hello)
    except OSError:
        return 0  # the supervisor is gone already
    status = worker.serve()
    if _ONE_JOB:
        # Its job ran the exit handlers: they must not run twice.
        _flush(sys.stdout)
        _flush(sys.stderr)
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
