from django.core.management.base import BaseCommand

from demo.models import Note


class Command(BaseCommand):
    help = 'Create a Note through the ORM, then print "notes: <count>".'

    def add_arguments(self, parser):
        parser.add_argument(
            "--text", default="hello", help='Text of the new note (default "hello").'
        )

    def handle(self, *args, **options):
        Note.objects.create(text=options["text"])
        self.stdout.write(f"notes: {Note.objects.count()}")
