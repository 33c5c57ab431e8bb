import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Print "exiting with N" then call sys.exit(N).'

    def add_arguments(self, parser):
        parser.add_argument("code", type=int, help="Exit status.")

    def handle(self, *args, **options):
        code = options["code"]
        self.stdout.write(f"exiting with {code}")
        sys.exit(code)
