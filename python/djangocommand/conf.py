"""Reading and validating the DJANGOCOMMAND_* settings.

The rules and messages are the published runner's (so a project moving over
sees the same errors), tightened where the old runner silently misbehaved:
a string where a tuple of commands belongs used to become a tuple of letters,
and a truthy string such as "False" used to switch on blocklist mode.

Every error is ``django.core.exceptions.ImproperlyConfigured``. Django is
imported inside the functions only, because this module is reachable from
``import djangocommand`` in ``settings.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .constants import (
    DEFAULT_ALLOW_HTTP_HOSTS,
    DEFAULT_ALLOWED_COMMANDS,
    DEFAULT_DISALLOWED_COMMANDS,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SERVER_URL,
    HEARTBEAT_INTERVAL_RANGE,
    MAX_RETRIES_RANGE,
    REQUEST_TIMEOUT_RANGE,
)

API_KEY_PREFIX = "dc_"

#: Every setting this package reads; anything else starting with
#: DJANGOCOMMAND_ is most likely a typo (see checks.py).
KNOWN_SETTINGS = frozenset(
    {
        "DJANGOCOMMAND_API_KEY",
        "DJANGOCOMMAND_SERVER_URL",
        "DJANGOCOMMAND_HEARTBEAT_INTERVAL",
        "DJANGOCOMMAND_REQUEST_TIMEOUT",
        "DJANGOCOMMAND_MAX_RETRIES",
        "DJANGOCOMMAND_ALLOW_HTTP_HOSTS",
        "DJANGOCOMMAND_ALLOWED_COMMANDS",
        "DJANGOCOMMAND_USE_BLOCKLIST",
        "DJANGOCOMMAND_DISALLOWED_COMMANDS",
        "DJANGOCOMMAND_METADATAONLY_COMMANDS",
        "DJANGOCOMMAND_STATE_DIR",
        "DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS",
    }
)


@dataclass(frozen=True)
class PolicySettings:
    """The command policy, with every list final (defaults already applied)."""

    use_blocklist: bool
    allowed_commands: tuple[str, ...]
    disallowed_commands: tuple[str, ...]
    metadata_only_commands: tuple[str, ...]
    # --settings, --pythonpath and the like from the control plane (refused
    # unless True; see docs/security.md).
    allow_code_loading_options: bool = False


@dataclass(frozen=True)
class RunnerSettings:
    """What the supervisor needs from the settings, validated."""

    # Kept out of repr() so that a logged or printed settings object never
    # shows the key.
    api_key: str = field(repr=False)
    server_url: str
    heartbeat_interval: int
    request_timeout: int
    max_retries: int
    allow_http_hosts: tuple[str, ...]
    policy: PolicySettings


def _error(message: str) -> Exception:
    from django.core.exceptions import ImproperlyConfigured

    return ImproperlyConfigured(message)


def _django_settings(settings: Any) -> Any:
    if settings is not None:
        return settings
    from django.conf import settings as django_settings

    return django_settings


def _names(
    settings: Any, name: str, default: tuple[str, ...], what: str
) -> tuple[str, ...]:
    """A tuple/list/set setting of names, in order, without duplicates."""
    value = getattr(settings, name, default)
    if isinstance(value, (str, bytes)):
        raise _error(
            f"{name} must be a tuple or list, not a string. "
            f'Use ("{what}",) with a trailing comma for single items. Got: {value!r}'
        )
    if isinstance(value, (set, frozenset)):
        # No order to keep; sorted so that the generated config is stable.
        items = sorted(value, key=str)
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise _error(f"{name} must be a tuple or list of {what}s. Got: {value!r}")
    for item in items:
        if not isinstance(item, str):
            raise _error(f"{name} must contain only strings. Got: {item!r}")
        if not item or item != item.strip() or any(c.isspace() for c in item):
            raise _error(f"{name} contains {item!r}, which is not a valid {what}.")
    return tuple(dict.fromkeys(items))


def _commands(settings: Any, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return _names(settings, name, default, "command_name")


def _whole_number(
    settings: Any, name: str, default: int, bounds: tuple[int, int], unit: str
) -> int:
    minimum, maximum = bounds
    value = getattr(settings, name, default)
    # bool is an int subclass; True seconds is a mistake, not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(f"{name} must be a whole number of {unit}. Got: {value!r}")
    if value < minimum:
        plural = unit if minimum != 1 else unit.rstrip("s")
        raise _error(f"{name} must be at least {minimum} {plural}. Got: {value}")
    if value > maximum:
        raise _error(f"{name} must be at most {maximum} {unit}. Got: {value}")
    return value


def policy_settings(settings: Any = None) -> PolicySettings:
    """The command policy from the settings (the API key is not needed)."""
    settings = _django_settings(settings)
    use_blocklist = _flag(settings, "DJANGOCOMMAND_USE_BLOCKLIST")
    return PolicySettings(
        use_blocklist=use_blocklist,
        allowed_commands=_commands(
            settings, "DJANGOCOMMAND_ALLOWED_COMMANDS", DEFAULT_ALLOWED_COMMANDS
        ),
        disallowed_commands=_commands(
            settings, "DJANGOCOMMAND_DISALLOWED_COMMANDS", DEFAULT_DISALLOWED_COMMANDS
        ),
        metadata_only_commands=_commands(
            settings, "DJANGOCOMMAND_METADATAONLY_COMMANDS", ()
        ),
        allow_code_loading_options=_flag(
            settings, "DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS"
        ),
    )


def _flag(settings: Any, name: str) -> bool:
    """A True/False setting (default False); a truthy string is a mistake."""
    value = getattr(settings, name, False)
    if not isinstance(value, bool):
        raise _error(f"{name} must be True or False. Got: {value!r}")
    return value


def _api_key(settings: Any) -> str:
    key = getattr(settings, "DJANGOCOMMAND_API_KEY", "")
    if key is None or key == "":
        raise _error("DJANGOCOMMAND_API_KEY is required in Django settings.")
    if not isinstance(key, str):
        raise _error(
            f"DJANGOCOMMAND_API_KEY must be a string. Got a {type(key).__name__}."
        )
    if not key.startswith(API_KEY_PREFIX):
        raise _error(
            'DJANGOCOMMAND_API_KEY must start with "dc_". Check your API key format.'
        )
    # The key travels in an HTTP header and an environment variable: a stray
    # newline from a secrets file would break both, far from its cause.
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise _error(
            "DJANGOCOMMAND_API_KEY contains whitespace or control characters. "
            "Check your API key format."
        )
    return key


def _server_url(settings: Any, allow_http_hosts: tuple[str, ...]) -> str:
    url = getattr(settings, "DJANGOCOMMAND_SERVER_URL", DEFAULT_SERVER_URL)
    if not isinstance(url, str):
        raise _error(f"DJANGOCOMMAND_SERVER_URL must be a valid URL. Got: {url!r}")
    try:
        parsed = urlsplit(url)
        hostname = parsed.hostname
        _ = parsed.port  # raises ValueError on a bad port
    except ValueError:
        raise _error(
            f"DJANGOCOMMAND_SERVER_URL must be a valid URL. Got: {url}"
        ) from None
    if parsed.scheme not in ("http", "https") or not parsed.netloc or not hostname:
        raise _error(f"DJANGOCOMMAND_SERVER_URL must be a valid URL. Got: {url}")
    if parsed.query or parsed.fragment:
        raise _error(
            f"DJANGOCOMMAND_SERVER_URL must not have a query string or fragment. Got: {url}"
        )
    if parsed.scheme != "https" and hostname not in allow_http_hosts:
        raise _error(
            f"DJANGOCOMMAND_SERVER_URL must use HTTPS. Got: {url}. "
            f'To allow HTTP, add "{hostname}" to DJANGOCOMMAND_ALLOW_HTTP_HOSTS.'
        )
    return url


def runner_settings(settings: Any = None) -> RunnerSettings:
    """Everything the supervisor needs, validated; raises ImproperlyConfigured."""
    settings = _django_settings(settings)
    api_key = _api_key(settings)
    allow_http_hosts = _names(
        settings, "DJANGOCOMMAND_ALLOW_HTTP_HOSTS", DEFAULT_ALLOW_HTTP_HOSTS, "hostname"
    )
    return RunnerSettings(
        api_key=api_key,
        server_url=_server_url(settings, allow_http_hosts),
        heartbeat_interval=_whole_number(
            settings,
            "DJANGOCOMMAND_HEARTBEAT_INTERVAL",
            DEFAULT_HEARTBEAT_INTERVAL,
            HEARTBEAT_INTERVAL_RANGE,
            "seconds",
        ),
        request_timeout=_whole_number(
            settings,
            "DJANGOCOMMAND_REQUEST_TIMEOUT",
            DEFAULT_REQUEST_TIMEOUT,
            REQUEST_TIMEOUT_RANGE,
            "seconds",
        ),
        max_retries=_whole_number(
            settings,
            "DJANGOCOMMAND_MAX_RETRIES",
            DEFAULT_MAX_RETRIES,
            MAX_RETRIES_RANGE,
            "retries",
        ),
        allow_http_hosts=allow_http_hosts,
        policy=policy_settings(settings),
    )
