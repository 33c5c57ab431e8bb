import sys
import time

from django.core.management.base import BaseCommand

TEXTS = {
    "ascii": lambda i: f"line {i} abcdefghij\n".encode(),
    "unicode": lambda i: f"línea {i} ✓ 日本語 ü\n".encode(),
    "invalid": lambda i: f"bad {i} ".encode() + b"\xff\xfe" + b" end\n",
}


class Command(BaseCommand):
    help = (
        "The chaos test's workload: numbered lines (ASCII, non-ASCII or with "
        "invalid UTF-8), every third one on stderr, optional pauses, an exit code."
    )

    def add_arguments(self, parser):
        parser.add_argument("--lines", type=int, default=10)
        parser.add_argument("--text", choices=sorted(TEXTS), default="ascii")
        parser.add_argument(
            "--pause",
            type=float,
            default=0.0,
            help="Seconds to sleep after every tenth line.",
        )
        parser.add_argument("--exit", type=int, default=0, help="Exit code.")

    def handle(self, *args, **options):
        text = TEXTS[options["text"]]
        for i in range(options["lines"]):
            stream = sys.stderr.buffer if i % 3 == 2 else sys.stdout.buffer
            stream.write(text(i))
            stream.flush()
            if options["pause"] and i % 10 == 9:
                time.sleep(options["pause"])
        if options["exit"]:
            sys.exit(options["exit"])
