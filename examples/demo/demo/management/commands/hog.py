from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Allocate memory without bound (run it only under a memory limit)."

    def handle(self, *args, **options):
        hoard = []
        while True:
            hoard.append(bytearray(10 * 1024 * 1024))
            if len(hoard) % 10 == 0:
                self.stdout.write(f"holding {len(hoard) * 10} MiB")
