import os
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "What a command sees of its surroundings."

    def handle(self, *args, **options):
        self.stdout.write(f"cwd holds db.sqlite3: {os.path.exists('db.sqlite3')}")
        self.stdout.write(f"argv[0]: {os.path.basename(sys.argv[0])}")
        # `python manage.py` puts its directory first, never '' (the cwd).
        self.stdout.write(f"'' on sys.path: {'' in sys.path}")
        self.stdout.write(
            f"__main__: {os.path.basename(sys.modules['__main__'].__file__)}"
        )
        self.stdout.write(f"stdout: {sys.stdout.encoding}/{sys.stdout.errors}")
        self.stdout.write(f"stdin: {sys.stdin.encoding}/{sys.stdin.errors}")
