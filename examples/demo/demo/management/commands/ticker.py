import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        'Print "tick <i> <unix time>" every --interval seconds, flushed at once '
        "(sparse output, for bench/output.py's line latency)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--lines", type=int, default=10, help="Lines to print (default 10)."
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=0.2,
            help="Seconds between lines (default 0.2).",
        )

    def handle(self, *args, **options):
        for i in range(options["lines"]):
            if i:
                time.sleep(options["interval"])
            # The time is taken as the line is printed: the benchmark compares
            # it with when the control plane received the line.
            self.stdout.write(f"tick {i} {time.time():.6f}")
            self.stdout.flush()
