from django.contrib import admin
from reversion.admin import VersionAdmin

from notes.models import Note


@admin.register(Note)
class NoteAdmin(VersionAdmin):
    pass
