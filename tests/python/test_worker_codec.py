"""The worker's bincode codec against the bytes the Rust side pins.

``tests/ipc_vectors.json`` is written by the Rust tests, so passing here means
both sides agree on every message. The worker is loaded from its path, as the
supervisor ships it as a lone script; the codec needs no Django.
"""

import json
import struct

import pytest
from harness import ROOT, load_worker

VECTORS_PATH = ROOT / "tests" / "ipc_vectors.json"

worker = load_worker()


def _shared_vectors():
    if not VECTORS_PATH.exists():
        return [
            pytest.param(
                None,
                marks=pytest.mark.skip(reason=f"{VECTORS_PATH} not generated yet"),
            )
        ]
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    return [pytest.param(vector, id=vector["name"]) for vector in vectors]


@pytest.mark.parametrize("vector", _shared_vectors())
def test_shared_vector(vector):
    value, payload = vector["value"], bytes.fromhex(vector["hex"])
    assert worker.encode(vector["type"], value).hex() == vector["hex"]
    assert worker.decode(vector["type"], payload) == value


# Worked out by hand from docs/ipc.md, independently of both codecs; spaces
# separate the fields.
HAND_VECTORS = [
    ("Request", "Discover", "00000000"),
    ("Request", "Shutdown", "03000000"),
    (
        "Request",
        {"Signal": {"job": 7, "signal": -2}},
        "02000000 0700000000000000 feffffff",
    ),
    (
        "Request",
        {
            "Run": {
                "job": 1,
                "command": "x",
                "args": ["é"],
                "limits": {"cpu_seconds": 2, "address_space_bytes": 0, "nice": -1},
            }
        },
        (
            "01000000 0100000000000000 0100000000000000 78"
            " 0100000000000000 0200000000000000 c3a9"
            " 0200000000000000 0000000000000000 ffffffff"
        ),
    ),
    ("Event", {"Commands": {"commands": []}}, "02000000 0000000000000000"),
    (
        "Event",
        {"JobExited": {"job": 2, "status": {"Signal": {"signal": 11}}}},
        "05000000 0200000000000000 01000000 0b000000",
    ),
    (
        "Event",
        {"Log": {"level": "Error", "message": ""}},
        "06000000 03000000 0000000000000000",
    ),
    (
        "Request",
        {"ParseArgs": {"request": 2, "command": "m", "args": ["-x"]}},
        (
            "04000000 0200000000000000 0100000000000000 6d 0100000000000000"
            " 0200000000000000 2d78"
        ),
    ),
    (
        "Event",
        {
            "ParsedArgs": {
                "request": 2,
                "result": {
                    "Parsed": {"given": [{"dest": "x", "flags": [], "values": ["1"]}]}
                },
            }
        },
        (
            "07000000 0200000000000000 00000000 0100000000000000"
            " 0100000000000000 78 0000000000000000 0100000000000000"
            " 0100000000000000 31"
        ),
    ),
]


@pytest.mark.parametrize(("type_name", "value", "fields"), HAND_VECTORS)
def test_hand_vector(type_name, value, fields):
    payload = bytes.fromhex(fields)
    assert worker.encode(type_name, value) == payload
    assert worker.decode(type_name, payload) == value


NO_LIMITS = {"cpu_seconds": 0, "address_space_bytes": 0, "nice": 0}


def _run_payload(command: bytes) -> bytes:
    """A Run request with no args whose command is the raw bytes given."""
    return (
        struct.pack("<IQQ", 1, 5, len(command))
        + command
        + struct.pack("<Q", 0)  # no args
        + struct.pack("<QQi", 0, 0, 0)  # no limits
    )


def test_decode_rejects_truncated_payload():
    payload = _run_payload(b"migrate")
    for cut in range(len(payload)):
        with pytest.raises(worker.ProtocolError):
            worker.decode("Request", payload[:cut])


def test_decode_rejects_trailing_byte():
    with pytest.raises(worker.ProtocolError, match="trailing"):
        worker.decode("Request", _run_payload(b"noop") + b"\x00")


def test_decode_rejects_unknown_variant_index():
    with pytest.raises(worker.ProtocolError, match="variant index 7"):
        worker.decode("Request", struct.pack("<I", 7))
    with pytest.raises(worker.ProtocolError, match="variant index 10"):
        worker.decode("Event", struct.pack("<I", 10))
    exited_with_status_2 = struct.pack("<IQIi", 5, 1, 2, 0)
    with pytest.raises(worker.ProtocolError, match="ExitStatus"):
        worker.decode("Event", exited_with_status_2)


def test_decode_rejects_invalid_utf8():
    with pytest.raises(worker.ProtocolError, match="UTF-8"):
        worker.decode("Request", _run_payload(b"bad \xff name"))


def test_decode_rejects_huge_string_length_without_allocating():
    payload = struct.pack("<IQQ", 1, 5, 2**40) + b"noop"
    with pytest.raises(worker.ProtocolError, match="exceeds the frame limit"):
        worker.decode("Request", payload)


def test_decode_rejects_huge_vec_count():
    payload = struct.pack("<IQ", 2, 2**40)
    with pytest.raises(worker.ProtocolError, match="exceeds the frame limit"):
        worker.decode("Event", payload)


def test_decode_rejects_oversized_payload():
    with pytest.raises(worker.ProtocolError, match="frame limit"):
        worker.decode("Request", bytes(worker.MAX_FRAME_LEN + 1))


def test_encode_rejects_values_that_do_not_fit_the_schema():
    bad_values = [
        {"Run": {"job": 1, "command": "x"}},  # missing field
        {
            "Run": {
                "job": 1,
                "command": "x",
                "args": [],
                "limits": NO_LIMITS,
                "extra": 1,
            }
        },
        {
            "Run": {"job": -1, "command": "x", "args": [], "limits": NO_LIMITS}
        },  # unsigned
        {"Signal": {"job": 1, "signal": 2**31}},  # beyond i32
        {"Signal": {"job": True, "signal": 2}},  # bool is not an integer here
        {"Discover": {}},  # unit variant in struct shape
        "Run",  # struct variant without fields
        "Launch",
    ]
    for value in bad_values:
        with pytest.raises(worker.ProtocolError):
            worker.encode("Request", value)


def test_lone_surrogates_are_encoded_as_valid_utf8():
    def message(text):
        return {"Log": {"level": "Info", "message": text}}

    # An escaped byte sequence that is UTF-8 after all comes back as it was.
    payload = worker.encode("Event", message("caf\udcc3\udca9"))
    assert worker.decode("Event", payload) == message("café")
    # Anything else becomes "?" rather than an exception or invalid UTF-8.
    for text, expected in [("a\udcffb", "a?b"), ("\ud800", "?")]:
        payload = worker.encode("Event", message(text))
        assert worker.decode("Event", payload) == message(expected)


def test_frame_round_trip_in_pieces():
    frames = worker.encode_frame("Request", "Discover") + worker.encode_frame(
        "Request", {"Signal": {"job": 3, "signal": 15}}
    )
    decoder = worker.FrameDecoder()
    payloads = []
    for byte in frames:
        payloads += decoder.feed(bytes([byte]))
    assert [worker.decode("Request", p) for p in payloads] == [
        "Discover",
        {"Signal": {"job": 3, "signal": 15}},
    ]


def test_frame_decoder_refuses_oversized_length_before_buffering():
    prefix = struct.pack("<I", worker.MAX_FRAME_LEN + 1)
    decoder = worker.FrameDecoder()
    assert decoder.feed(prefix[:3]) == []
    with pytest.raises(worker.ProtocolError, match="frame limit"):
        decoder.feed(prefix[3:])


def test_schema_mirrors_every_message_variant():
    variants = {
        name: [variant for variant, _ in spec]
        for name, (kind, spec) in worker.SCHEMA.items()
        if kind == "enum"
    }
    assert variants == {
        "Request": [
            "Discover",
            "Run",
            "Signal",
            "Shutdown",
            "ParseArgs",
            "ReadSettings",
            "InspectFork",
        ],
        "Event": [
            "Hello",
            "StartupFailed",
            "Commands",
            "JobStarted",
            "JobFailed",
            "JobExited",
            "Log",
            "ParsedArgs",
            "SettingValues",
            "ForkHazards",
        ],
        "ParseOutcome": ["Parsed", "Refused"],
        "ExitStatus": ["Code", "Signal"],
        "LogLevel": ["Debug", "Info", "Warning", "Error"],
        "HazardKind": ["Socket", "Descriptor", "Thread", "SharedRandom"],
    }
