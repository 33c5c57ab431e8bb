import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Read all of stdin and print it as "stdin: <repr>".'

    def handle(self, *args, **options):
        data = sys.stdin.read()
        self.stdout.write(f"stdin: {data!r}")
