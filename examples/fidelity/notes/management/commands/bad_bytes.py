import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Invalid UTF-8: raw bytes, and a lone surrogate printed as text."

    def handle(self, *args, **options):
        print("héllo ✓")
        sys.stdout.flush()
        sys.stdout.buffer.write(b"raw \xff\xfe bytes\n")
        sys.stdout.buffer.flush()
        # A file name from os.listdir() on a non-UTF-8 name looks like this:
        # printable under surrogateescape (C/C.UTF-8 locale), an error otherwise.
        print("name-\udcff.txt")
        print("to stderr: \udcfe", file=sys.stderr)
