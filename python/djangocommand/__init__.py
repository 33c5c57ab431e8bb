"""DjangoCommand client: run, schedule, and audit Django management commands
without SSH access.

1. ``pip install djangocommand``
2. Add ``'djangocommand'`` to ``INSTALLED_APPS``
3. ``DJANGOCOMMAND_API_KEY = "dc_..."`` in ``settings.py``
4. ``python manage.py djangocommand start``

The work is done by the ``dcsupervisor`` binary installed with this package.
Everything here can be imported from ``settings.py``: Django is only touched
when a function is called.
"""

from importlib import metadata as _metadata

from .constants import (
    DEFAULT_ALLOWED_COMMANDS,
    DEFAULT_DISALLOWED_COMMANDS,
    DEFAULT_SERVER_URL,
)
from .runner import Runner, RunnerError
from .security import (
    CommandDisallowedError,
    check_command_allowed,
    get_allowed_commands,
    get_disallowed_commands,
    is_command_allowed,
    is_using_blocklist,
)

try:
    # The wheel's version is Cargo.toml's (pyproject.toml: dynamic), so ask it.
    __version__ = _metadata.version("djangocommand")
except _metadata.PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_ALLOWED_COMMANDS",
    "DEFAULT_DISALLOWED_COMMANDS",
    "DEFAULT_SERVER_URL",
    "CommandDisallowedError",
    "Runner",
    "RunnerError",
    "check_command_allowed",
    "get_allowed_commands",
    "get_disallowed_commands",
    "is_command_allowed",
    "is_using_blocklist",
]
