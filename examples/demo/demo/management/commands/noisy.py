import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Write "out {i}" to stdout and "err {i}" to stderr, alternating.'

    def add_arguments(self, parser):
        parser.add_argument(
            "--lines", type=int, default=10, help="Number of line pairs (default 10)."
        )
        parser.add_argument(
            "--flush",
            action="store_true",
            help="Flush both streams after every line (preserves interleaving).",
        )
        parser.add_argument(
            "--delay",
            type=float,
            default=0.0,
            help="Seconds to wait before writing anything.",
        )

    def handle(self, *args, **options):
        flush = options["flush"]
        time.sleep(options["delay"])
        for i in range(options["lines"]):
            self.stdout.write(f"out {i}")
            if flush:
                self.stdout.flush()
            self.stderr.write(f"err {i}")
            if flush:
                self.stderr.flush()
