import logging

# Made when the apps are imported, after Django configured logging: a fresh
# manage.py's dictConfig never saw it, so disable_existing_loggers spares it.
logger = logging.getLogger("jobs.models")
