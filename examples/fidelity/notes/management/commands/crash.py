from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "An uncaught exception: a traceback through manage.py."

    def handle(self, *args, **options):
        {}["missing"]
