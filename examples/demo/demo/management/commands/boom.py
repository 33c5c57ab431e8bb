from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = 'Raise an uncaught ValueError("kaboom") (traceback, exit status 1).'

    def handle(self, *args, **options):
        raise ValueError("kaboom")
