import reversion
from django.core.management.base import BaseCommand

from notes.models import Note


class Command(BaseCommand):
    help = "Add a note (with a reversion revision)."

    def add_arguments(self, parser):
        parser.add_argument("title")
        parser.add_argument("--body", default="")

    def handle(self, *args, **options):
        with reversion.create_revision():
            note = Note.objects.create(title=options["title"], body=options["body"])
            reversion.set_comment("added by note_add")
        self.stdout.write(f"added note {note.title!r}")
