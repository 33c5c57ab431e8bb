"""The same project on another database (`alt.sqlite3`): what
`--settings=fidelity_site.settings_alt` must act on, never the default one."""

from fidelity_site.settings import *

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "alt.sqlite3"}}
