from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "A request/answer over the hazards app's connection, opened in ready()."

    def handle(self, *args, **options):
        from hazards import apps

        self.stdout.write(apps.ping())
