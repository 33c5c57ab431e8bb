from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Raise CommandError (with --code, its returncode)."

    def add_arguments(self, parser):
        parser.add_argument("--code", type=int, default=1)

    def handle(self, *args, **options):
        self.stdout.write("about to fail")
        raise CommandError("the note store is read-only", returncode=options["code"])
