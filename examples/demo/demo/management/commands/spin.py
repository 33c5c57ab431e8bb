from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Print "spinning" then busy-loop forever.'

    def handle(self, *args, **options):
        self.stdout.write("spinning")
        self.stdout.flush()
        while True:
            pass
