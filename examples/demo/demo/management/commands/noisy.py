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

    def handle(self, *args, **options):
        flush = options["flush"]
        for i in range(options["lines"]):
            self.stdout.write(f"out {i}")
            if flush:
                self.stdout.flush()
            self.stderr.write(f"err {i}")
            if flush:
                self.stderr.flush()
