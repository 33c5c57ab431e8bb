"""DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS: the Django-settings way to let
the control plane pass ``--settings``, ``--pythonpath`` and the like (refused
by default, see docs/security.md), carried into the generated ``[policy]``
table as ``allow_code_loading_options``, which src/config.rs reads."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

from djangocommand import conf, supervisor_config


def test_refused_by_default_and_allowed_when_true():
    default = conf.policy_settings(SimpleNamespace())
    assert (
        supervisor_config.policy_table(default)["allow_code_loading_options"] is False
    )
    allowed = conf.policy_settings(
        SimpleNamespace(DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS=True)
    )
    assert supervisor_config.policy_table(allowed)["allow_code_loading_options"] is True
    assert "DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS" in conf.KNOWN_SETTINGS


@pytest.mark.parametrize("value", ["True", 1, None])
def test_only_a_boolean_is_accepted(value):
    settings = SimpleNamespace(DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS=value)
    with pytest.raises(ImproperlyConfigured, match="must be True or False"):
        conf.policy_settings(settings)
