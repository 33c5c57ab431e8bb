import atexit
import logging
import logging.handlers
import os

from django.apps import AppConfig

from .logqueue import QUEUE

# The logging cookbook's recipe: the listener's thread writes what the
# QueueHandler queued to the file, and an exit handler stops it, which
# writes what is still queued.
LISTENER = None


class IntegrationsConfig(AppConfig):
    name = "integrations"

    def ready(self) -> None:
        global LISTENER
        handler = logging.FileHandler("queued.log")
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        LISTENER = logging.handlers.QueueListener(QUEUE, handler)
        LISTENER.start()
        atexit.register(LISTENER.stop)
        # Changed after Django configured logging, as ready()s do: a handler
        # added to a configured logger, and its level lowered.
        configured = logging.getLogger("integrations")
        added = logging.FileHandler("added.log")
        added.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        configured.addHandler(added)
        configured.setLevel(logging.DEBUG)
        if os.environ.get("FIDELITY_TIMED_LOG"):
            # Rotated every FIDELITY_TIMED_LOG seconds (the runner's test of
            # a rollover made by one job: the next must not make it again).
            timed = logging.handlers.TimedRotatingFileHandler(
                "timed.log", when="S", interval=int(os.environ["FIDELITY_TIMED_LOG"])
            )
            timed.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
            configured.addHandler(timed)
        if os.environ.get("FIDELITY_READY_ERROR"):
            # What the import sends: under manage.py, every run sends it.
            logging.getLogger("fidelity.startup").error("an error at start-up")
