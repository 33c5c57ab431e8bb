import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Print "sleeping N", sleep N seconds, then print "done".'

    def add_arguments(self, parser):
        parser.add_argument("seconds", type=float, help="Seconds to sleep.")

    def handle(self, *args, **options):
        seconds = options["seconds"]
        self.stdout.write(f"sleeping {seconds:g}")
        self.stdout.flush()
        time.sleep(seconds)
        self.stdout.write("done")
