"""System checks: a wrong DJANGOCOMMAND_* policy setting shows up in
``manage.py check`` (and before ``runserver``/``migrate``), not only when the
runner starts.

The API key is not checked here: development machines often run without one,
and ``djangocommand start`` reports it anyway.
"""

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import conf


def check_settings(app_configs=None, **kwargs):
    errors = []
    try:
        conf.policy_settings(settings)
    except ImproperlyConfigured as error:
        errors.append(checks.Error(str(error), id="djangocommand.E001"))
    for name in sorted(dir(settings)):
        if name.startswith("DJANGOCOMMAND_") and name not in conf.KNOWN_SETTINGS:
            # A typo'd policy setting silently leaves the default in force.
            errors.append(
                checks.Warning(
                    f"{name} is not a DjangoCommand setting and is ignored.",
                    hint="Known settings: " + ", ".join(sorted(conf.KNOWN_SETTINGS)),
                    id="djangocommand.W001",
                )
            )
    return errors
