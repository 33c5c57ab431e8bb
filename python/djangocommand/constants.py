"""The default command lists and the policy's refusal reasons.

Only the standard library is imported here, so that ``settings.py`` can do
``from djangocommand import DEFAULT_ALLOWED_COMMANDS`` before Django is
configured. The lists come from ``default_commands.json``, the file the Rust
supervisor embeds too, so the two sides cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

_DEFAULTS_FILE = Path(__file__).with_name("default_commands.json")


def _load_defaults() -> dict:
    with _DEFAULTS_FILE.open(encoding="utf-8") as file:
        return json.load(file)


def _unique(names: list[str]) -> tuple[str, ...]:
    # dict keeps the first occurrence's position: the README's table order.
    return tuple(dict.fromkeys(names))


_DEFAULTS = _load_defaults()

#: Commands that may run remotely unless DJANGOCOMMAND_ALLOWED_COMMANDS says otherwise.
DEFAULT_ALLOWED_COMMANDS: tuple[str, ...] = _unique(_DEFAULTS["allowed"])

#: Commands refused in blocklist mode unless DJANGOCOMMAND_DISALLOWED_COMMANDS says otherwise.
DEFAULT_DISALLOWED_COMMANDS: tuple[str, ...] = _unique(_DEFAULTS["disallowed"])

#: The runner's own management command: never synced, never run remotely.
RUNNER_COMMAND: str = _DEFAULTS["runner_command"]

# The reasons is_command_allowed() returns; the Rust supervisor's Refusal
# (src/supervisor/policy.rs) displays the same texts, and
# tests/policy_vectors.json holds both sides to them.
REASON_NOT_ALLOWLISTED = "not in DJANGOCOMMAND_ALLOWED_COMMANDS allowlist"
REASON_BLOCKLISTED = "in DJANGOCOMMAND_DISALLOWED_COMMANDS blocklist"
REASON_RUNNER_COMMAND = "the runner's own command is never run remotely"

DEFAULT_SERVER_URL = "https://app.djangocommand.com"
DEFAULT_ALLOW_HTTP_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_HEARTBEAT_INTERVAL = 30
MIN_HEARTBEAT_INTERVAL = 5
DEFAULT_REQUEST_TIMEOUT = 30
DEFAULT_MAX_RETRIES = 3
# Inclusive ranges; src/config.rs (`ranges`) has the same, and
# tests/server_settings_vectors.json holds both sides to them.
HEARTBEAT_INTERVAL_RANGE = (MIN_HEARTBEAT_INTERVAL, 3600)
REQUEST_TIMEOUT_RANGE = (1, 600)
MAX_RETRIES_RANGE = (0, 20)

del _DEFAULTS
