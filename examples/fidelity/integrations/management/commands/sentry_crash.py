from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "An uncaught exception: sentry-sdk's excepthook reports it."

    def handle(self, *args, **options):
        raise RuntimeError("boom from a command")
