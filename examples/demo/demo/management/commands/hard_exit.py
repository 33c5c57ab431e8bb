import os
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Print "hard exit", flush, then call os._exit(N) (no cleanup).'

    def add_arguments(self, parser):
        parser.add_argument("code", type=int, help="Exit status.")

    def handle(self, *args, **options):
        self.stdout.write("hard exit")
        self.stdout.flush()
        sys.stdout.flush()
        os._exit(options["code"])
