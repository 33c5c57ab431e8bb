import logging

from django.core.management.base import BaseCommand

logger = logging.getLogger("integrations")


class Command(BaseCommand):
    help = "Logs numbered lines (to the files of the settings' LOGGING)."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int)

    def handle(self, *args, **options):
        for i in range(options["count"]):
            logger.info("line %d of %d", i + 1, options["count"])
        self.stdout.write("logged")
