from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = 'Raise CommandError("demo failure") with the given exit status.'

    def add_arguments(self, parser):
        parser.add_argument(
            "--code", type=int, default=1, help="Exit status to use (default 1)."
        )

    def handle(self, *args, **options):
        raise CommandError("demo failure", returncode=options["code"])
