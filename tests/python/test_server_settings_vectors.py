"""The shared server-settings vectors (``tests/server_settings_vectors.json``).

``djangocommand.conf.runner_settings`` must accept or refuse each case
exactly as the Rust supervisor's ``[server]`` validation does
(``tests/server_settings_vectors.rs`` holds the Rust side to the same file),
and a refusal must name the setting of the same field.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

from djangocommand import conf

VECTORS = json.loads((ROOT / "tests" / "server_settings_vectors.json").read_text())
SETTING_OF_FIELD = {
    "api_key": "DJANGOCOMMAND_API_KEY",
    "url": "DJANGOCOMMAND_SERVER_URL",
    "heartbeat_interval": "DJANGOCOMMAND_HEARTBEAT_INTERVAL",
    "request_timeout": "DJANGOCOMMAND_REQUEST_TIMEOUT",
    "max_retries": "DJANGOCOMMAND_MAX_RETRIES",
    "allow_http_hosts": "DJANGOCOMMAND_ALLOW_HTTP_HOSTS",
}


def django_settings(server: dict) -> SimpleNamespace:
    values = {SETTING_OF_FIELD[field]: value for field, value in server.items()}
    if "DJANGOCOMMAND_ALLOW_HTTP_HOSTS" in values:
        values["DJANGOCOMMAND_ALLOW_HTTP_HOSTS"] = tuple(
            values["DJANGOCOMMAND_ALLOW_HTTP_HOSTS"]
        )
    return SimpleNamespace(**values)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda case: case["name"])
def test_the_package_agrees_with_the_supervisor(case):
    settings = django_settings(case["server"])
    if case["valid"]:
        conf.runner_settings(settings)
        return
    with pytest.raises(ImproperlyConfigured) as refused:
        conf.runner_settings(settings)
    setting = SETTING_OF_FIELD[case["field"].removeprefix("server.")]
    assert str(refused.value).startswith(setting), str(refused.value)
