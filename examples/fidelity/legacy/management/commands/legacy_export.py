from django.core.management.base import BaseCommand

from legacy.exporters import export


class Command(BaseCommand):
    help = "A command built on a deprecated module."

    def handle(self, *args, **options):
        self.stdout.write(export())
