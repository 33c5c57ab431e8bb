import sys
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Write each part as it is (no newline added), flushing and pausing between parts."

    def add_arguments(self, parser):
        parser.add_argument("parts", nargs="+", help="Text to write, in order.")
        parser.add_argument(
            "--delay", type=float, default=0.0, help="Seconds to pause between parts."
        )
        parser.add_argument(
            "--stderr", action="store_true", help="Write to stderr instead of stdout."
        )

    def handle(self, *args, **options):
        stream = sys.stderr if options["stderr"] else sys.stdout
        for index, part in enumerate(options["parts"]):
            if index:
                time.sleep(options["delay"])
            stream.write(part.encode().decode("unicode_escape"))
            stream.flush()
