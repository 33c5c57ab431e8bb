import os

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Close fd 1, then print: the flush at exit fails (status 120)."

    def handle(self, *args, **options):
        os.close(1)
        print("nobody reads this")
