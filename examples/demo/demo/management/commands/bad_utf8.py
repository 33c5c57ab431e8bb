import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Write UTF-8 text, then raw invalid UTF-8 bytes, then more text."

    def handle(self, *args, **options):
        self.stdout.write("héllo wörld ✓\n", ending="")
        self.stdout.flush()
        sys.stdout.flush()
        sys.stdout.buffer.write(b"bad \xff\xfe bytes\n")
        sys.stdout.buffer.flush()
        self.stdout.write("after\n", ending="")
        self.stdout.flush()
