from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Do nothing and print nothing (exit status 0)."

    def handle(self, *args, **options):
        pass
