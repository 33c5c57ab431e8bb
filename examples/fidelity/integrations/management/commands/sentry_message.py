import sentry_sdk
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "sentry_sdk.capture_message() from a command."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=1)

    def handle(self, *args, **options):
        for i in range(options["count"]):
            sentry_sdk.capture_message(f"message {i} from a command")
        self.stdout.write("captured")
