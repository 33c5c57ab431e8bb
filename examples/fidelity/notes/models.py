import reversion
from django.db import models


@reversion.register()
class Note(models.Model):
    title = models.CharField(max_length=200, unique=True)
    body = models.TextField(blank=True)

    def __str__(self):
        return self.title
