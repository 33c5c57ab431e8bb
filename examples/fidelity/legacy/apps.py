import logging
import tempfile

from django.apps import AppConfig

# A scratch directory made at start-up and removed at exit, as some
# libraries make one: a job forked from the worker uses the worker's.
SCRATCH = None


class LegacyConfig(AppConfig):
    name = "legacy"

    def ready(self) -> None:
        global SCRATCH
        from . import checks  # noqa: F401 - registers the check

        SCRATCH = tempfile.TemporaryDirectory(prefix="legacy-scratch-")
        # No handler is configured for it: logging's last resort writes it
        # to stderr.
        logging.getLogger("legacy").warning("legacy app ready")
