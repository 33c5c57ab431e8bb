"""Which commands may run remotely, as the Django settings say.

The same rules as the supervisor's (``src/supervisor/policy.rs``), which
enforces them whatever the server asks; these functions let the project ask
the question itself (and ``tests/policy_vectors.json`` holds both sides to the
same answers). Django is imported lazily so that ``settings.py`` can import
this package.
"""

from __future__ import annotations

from .constants import (
    REASON_BLOCKLISTED,
    REASON_NOT_ALLOWLISTED,
    REASON_RUNNER_COMMAND,
    RUNNER_COMMAND,
)


class CommandDisallowedError(Exception):
    """Raised by check_command_allowed() for a command the policy refuses."""

    def __init__(self, command: str, reason: str):
        self.command = command
        self.reason = reason
        super().__init__(f"Command '{command}' is not allowed: {reason}")


def _policy():
    from . import conf

    return conf.policy_settings()


def is_using_blocklist() -> bool:
    """True when DJANGOCOMMAND_USE_BLOCKLIST = True (blocklist mode)."""
    return _policy().use_blocklist


def get_allowed_commands() -> frozenset[str]:
    """DJANGOCOMMAND_ALLOWED_COMMANDS, or the default allowlist; whatever the mode."""
    return frozenset(_policy().allowed_commands)


def get_disallowed_commands() -> frozenset[str]:
    """DJANGOCOMMAND_DISALLOWED_COMMANDS, or the default blocklist; whatever the mode."""
    return frozenset(_policy().disallowed_commands)


def is_command_allowed(command: str) -> tuple[bool, str]:
    """``(True, '')`` if ``command`` may run remotely, else ``(False, reason)``."""
    if command == RUNNER_COMMAND:
        # Running the runner from the runner would start a second one.
        return False, REASON_RUNNER_COMMAND
    policy = _policy()
    if policy.use_blocklist:
        if command in policy.disallowed_commands:
            return False, REASON_BLOCKLISTED
        return True, ""
    if command in policy.allowed_commands:
        return True, ""
    return False, REASON_NOT_ALLOWLISTED


def check_command_allowed(command: str) -> None:
    """Raises CommandDisallowedError if the policy refuses ``command``."""
    allowed, reason = is_command_allowed(command)
    if not allowed:
        raise CommandDisallowedError(command, reason)
