import gc

from django.apps import AppConfig
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "How many AppConfig objects gc.get_objects() sees (all of them, in a fresh interpreter)."

    def handle(self, *args, **options):
        configs = [o for o in gc.get_objects() if isinstance(o, AppConfig)]
        self.stdout.write(f"app configs on the heap: {len(configs)}")
