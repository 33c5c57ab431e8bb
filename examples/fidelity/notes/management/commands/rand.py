from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "A number from the hazards app's module-level random.Random()."

    def handle(self, *args, **options):
        from hazards import apps

        self.stdout.write(str(apps.RNG.random()))
