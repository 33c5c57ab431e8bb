import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Copy stdin to stdout, as text and as the byte count."

    def handle(self, *args, **options):
        text = sys.stdin.read()
        sys.stdout.write(text)
        self.stdout.write(f"[{len(text)} characters]")
