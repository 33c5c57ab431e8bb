import logging

from django.core.management.base import BaseCommand

logger = logging.getLogger("integrations")


class Command(BaseCommand):
    help = "logger.error(): sentry-sdk's logging integration reports it."

    def handle(self, *args, **options):
        logger.error("a logged error: %s", "disk full")
        self.stdout.write("logged")
