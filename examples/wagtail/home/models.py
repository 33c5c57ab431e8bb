"""The home app's page model, as `wagtail start` made it, with the body the
Wagtail tutorial adds. The blocks come from their old place,
`wagtail.admin.blocks`, as on a site written for an older Wagtail: Wagtail
still accepts it, with a UserWarning that every `manage.py` run prints."""

from wagtail.admin import blocks
from wagtail.fields import StreamField
from wagtail.models import Page


class HomePage(Page):
    body = StreamField(
        [("heading", blocks.CharBlock()), ("paragraph", blocks.RichTextBlock())],
        blank=True,
    )
