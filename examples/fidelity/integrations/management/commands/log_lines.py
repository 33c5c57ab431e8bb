import logging

from django.core.management.base import BaseCommand

from integrations import models

logger = logging.getLogger("integrations")
# Made when the command is loaded, after logging was configured; LOGGING
# names neither it nor its parents, and disables the loggers that existed.
module_logger = logging.getLogger("jobs.commands")


class Command(BaseCommand):
    help = "Logs numbered lines (to the files of the settings' LOGGING)."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int)

    def handle(self, *args, **options):
        for i in range(options["count"]):
            logger.info("line %d of %d", i + 1, options["count"])
        logger.debug("a debug line (the level a ready() set)")
        module_logger.info("from the command module's logger")
        models.logger.info("from the models module's logger")
        self.stdout.write("logged")
