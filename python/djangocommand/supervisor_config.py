"""Django settings -> the supervisor's ``dc.toml`` (schema: src/config.rs).

The Django settings stay the one place the project configures the runner:
the policy lists are written out in full (defaults already applied, exactly
as ``is_command_allowed`` sees them), with ``configured_in =
"django-settings"`` so that refusals tell the operator which setting to edit.
The API key is never written: it reaches the supervisor through the
DJANGOCOMMAND_API_KEY environment variable only.

The standard library can read TOML (3.11+) but not write it, hence the small
emitter below; it covers exactly the value types the schema uses.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .conf import RunnerSettings

TomlValue = str | int | float | bool | Sequence[str]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# TOML's short escapes; every other control character becomes \uXXXX.
_ESCAPES = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}

HEADER = (
    "# Written by `manage.py djangocommand` from the DJANGOCOMMAND_* Django settings:\n"
    "# edit the settings, not this file (it is rewritten at every start).\n"
    "# The API key is not here: it is passed in the DJANGOCOMMAND_API_KEY environment variable.\n"
)


def toml_string(value: str) -> str:
    """A TOML basic string that reads back as ``value``."""
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        elif 0xD800 <= ord(char) <= 0xDFFF:
            # A lone surrogate (from a surrogateescape'd path) is not a
            # Unicode scalar value: TOML cannot hold it, and guessing would
            # point the supervisor at another file.
            raise ValueError(f"cannot write {value!r} to TOML: it is not valid Unicode")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_value(value: TomlValue) -> str:
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        # TOML floats need a fraction or an exponent ("1e+20" and "2.0" are fine).
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Sequence):
        items = list(value)
        if not all(isinstance(item, str) for item in items):
            raise TypeError(f"only lists of strings are supported, got {value!r}")
        return "[" + ", ".join(toml_string(item) for item in items) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}: {value!r}")


def dump_toml(tables: Mapping[str, Mapping[str, TomlValue]], header: str = "") -> str:
    """``{table: {key: value}}`` as TOML text, in the mappings' order."""
    parts = [header] if header else []
    for table, values in tables.items():
        lines = [f"[{toml_key(table)}]"]
        lines += [
            f"{toml_key(key)} = {toml_value(value)}" for key, value in values.items()
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


#: Where the published runner's HTTP library (requests) finds the CAs it
#: verifies the control plane with, in its order.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def ca_bundle(environ: Mapping[str, str] = os.environ) -> str | None:
    """The CA bundle file the environment names for `requests`, if any.

    A project that made the published runner trust a private CA (a
    self-hosted control plane, a TLS-inspecting proxy) did it with these
    variables; the supervisor trusts that file too (``server.ca_file``, on
    top of the system's CAs), so nothing more is needed. A directory, which
    `requests` also takes, cannot be a ``ca_file`` and is left out.
    """
    for name in CA_BUNDLE_VARIABLES:
        value = environ.get(name, "")
        if value:
            return value if Path(value).is_file() else None
    return None


def config_tables(
    settings: RunnerSettings,
    *,
    project_dir: Path,
    settings_module: str,
    python: str,
    state_dir: Path,
) -> dict[str, dict[str, TomlValue]]:
    """The dc.toml content for these settings, as tables (without the key)."""
    policy = settings.policy
    server: dict[str, TomlValue] = {
        "url": settings.server_url,
        "heartbeat_interval": settings.heartbeat_interval,
        "request_timeout": settings.request_timeout,
        "max_retries": settings.max_retries,
        "allow_http_hosts": list(settings.allow_http_hosts),
    }
    if bundle := ca_bundle():
        server["ca_file"] = bundle
    return {
        "server": server,
        "django": {
            "project_dir": str(project_dir),
            "settings_module": settings_module,
            "python": python,
        },
        "policy": policy_table(policy),
        "runner": {
            "state_dir": str(state_dir),
        },
    }


def policy_table(policy) -> dict[str, TomlValue]:
    """The [policy] table: full final lists, so the defaults are applied once, here."""
    return {
        "mode": "blocklist" if policy.use_blocklist else "allowlist",
        "allowed_commands": list(policy.allowed_commands),
        "disallowed_commands": list(policy.disallowed_commands),
        "metadata_only_commands": list(policy.metadata_only_commands),
        "configured_in": "django-settings",
        "allow_code_loading_options": policy.allow_code_loading_options,
    }


def render(settings: RunnerSettings, **where) -> str:
    """The dc.toml text; ``where`` as for config_tables()."""
    return dump_toml(config_tables(settings, **where), header=HEADER)
