import os

from django.core.management.base import BaseCommand

from legacy import apps


class Command(BaseCommand):
    help = "Whether the scratch directory made at start-up is still there."

    def handle(self, *args, **options):
        self.stdout.write(f"scratch directory: {os.path.isdir(apps.SCRATCH.name)}")
