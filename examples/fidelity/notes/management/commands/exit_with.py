import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Print a line, then sys.exit(code)."

    def add_arguments(self, parser):
        parser.add_argument("code", type=int)

    def handle(self, *args, **options):
        self.stdout.write(f"exiting with {options['code']}")
        sys.exit(options["code"])
