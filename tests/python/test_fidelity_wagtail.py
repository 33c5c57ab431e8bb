"""Fidelity on a Wagtail site: Wagtail's commands behave through dcsupervisor
as under `python manage.py`.

examples/wagtail is a site made by `wagtail start` (Wagtail from PyPI, in
requirements-dev.txt): the home app with its page model (whose body imports
its blocks from their old place, so that every run warns), the search app,
and Wagtail's default apps. Each case starts from a site an editor has used
(SEED): published pages and drafts, a page scheduled to go live and one due
to expire, an uploaded image with a rendition, an embed, an API token, a
redirects file to import, and a page tree with two faults for fixtree. How
each case runs three ways and is compared is fidelity.py's (see
test_fidelity.py); the site runs on SQLite (every case) and on PostgreSQL
(the cases that read or write the database), as production Wagtail sites do.
"""

import fidelity
import pytest
from fidelity import Case, case

pytestmark = fidelity.NEEDS_BINARIES

# What an editor would have left, made with `manage.py shell -c` once; every
# case gets a copy (the database, media/ and redirects.csv).
SEED = """\
import io
from datetime import timedelta
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.files.images import ImageFile
from django.utils import timezone
from PIL import Image as PILImage
from wagtail.embeds.models import Embed
from wagtail.images.models import Image
from wagtail.models import APIToken, Page
from wagtail.rich_text import RichText

from home.models import HomePage

# No password: hashing one would cost the test a second.
editor = get_user_model().objects.create_user("editor", "editor@example.com")
home = Page.objects.get(slug="home").specific
now = timezone.now()


def page(title, slug, **fields):
    return home.add_child(instance=HomePage(title=title, slug=slug, **fields))


about = page(
    "About",
    "about",
    body=[
        ("heading", "Who we are"),
        ("paragraph", RichText('<p>See the <a linktype="page" id="6">news</a>.</p>')),
    ],
)
about.save_revision(user=editor).publish()
about.title = "About us"
about.save_revision(user=editor)  # a draft on top of the live page
about.add_child(instance=HomePage(title="Team", slug="team"))
news = page("News", "news", live=False)
news.save_revision(user=editor, approved_go_live_at=now - timedelta(minutes=5))
offer = page("Offer", "offer", expire_at=now - timedelta(minutes=5))
offer.save_revision(user=editor).publish()
# Faults for fixtree: a wrong numchild, and a page whose parent is gone.
lost = page("Lost", "lost")
Page.objects.filter(pk=lost.pk).update(path="00010099" + lost.path[8:], depth=3)
Page.objects.filter(pk=home.pk).update(numchild=9)

data = io.BytesIO()
PILImage.new("RGB", (40, 30), "teal").save(data, "PNG")
image = Image.objects.create(title="Teal", file=ImageFile(data, name="teal.png"))
image.get_rendition("fill-20x20")
Embed.objects.create(
    url="https://video.example.com/1", max_width=None, type="video",
    html="<iframe></iframe>", title="A video", thumbnail_url="",
    width=640, height=360, provider_name="Example",
)
APIToken.create_token(user=editor, name="deploy")
Path("redirects.csv").write_text("from,to\\n/old-about,/about/\\n/old-news,/news/\\n")
"""

CASES: list[Case] = [
    # Django's commands, as a Wagtail site's deploy runs them.
    case("check", "check"),
    case("migrate-fresh", "migrate", "-v", "0", blank=True),
    case("showmigrations", "showmigrations"),
    case("collectstatic", "collectstatic", "--noinput"),
    case("createcachetable", "createcachetable"),
    case("dumpdata-pages", "dumpdata", "wagtailcore.page", "--indent", "2"),
    case("help", "help"),
    # Wagtail's own.
    case("fixtree", "fixtree", stdin=b"y\n"),
    case("fixtree-noinput", "fixtree", "--noinput"),
    case("rebuild-references-index", "rebuild_references_index"),
    case("show-references-index", "show_references_index"),
    case("update-index", "update_index"),
    case("purge-revisions", "purge_revisions"),
    case("publish-scheduled", "publish_scheduled"),
    case("publish-scheduled-dryrun", "publish_scheduled", "--dryrun"),
    case("purge-embeds", "purge_embeds"),
    case("set-url-paths", "set_url_paths"),
    case("image-renditions", "wagtail_update_image_renditions"),
    case("image-renditions-purge", "wagtail_update_image_renditions", "--purge-only"),
    case("import-redirects", "import_redirects", "--src", "redirects.csv"),
    case("api-tokens-list", "api_tokens", "list"),
    case("api-tokens-revoke", "api_tokens", "revoke", "--id", "1"),
    case("move-pages", "move_pages", "4", "6"),
    case("update-index-help", "update_index", "--help"),
    # Failing invocations.
    case("publish-scheduled-bad-option", "publish_scheduled", "--dry-run"),
    case("api-tokens-no-subcommand", "api_tokens"),
    case("move-pages-missing", "move_pages", "998", "999"),
]

# The cases run on PostgreSQL too: those that write the database (migrate on
# an empty one, fixtree, the index rebuilds, publishing, purging, renditions,
# redirects, tokens, moves) and dumpdata, which reads through a server-side
# cursor there. The others have nothing that depends on the engine, or read
# what a case kept here writes (showmigrations, show-references-index,
# publish-scheduled-dryrun, api-tokens-list, move-pages-missing,
# image-renditions-purge, purge-embeds: one DELETE): left out to keep the
# PostgreSQL run at some 25 s on two cores.
DATABASE_CASES = {
    "migrate-fresh",
    "dumpdata-pages",
    "fixtree",
    "fixtree-noinput",
    "rebuild-references-index",
    "update-index",
    "purge-revisions",
    "publish-scheduled",
    "set-url-paths",
    "image-renditions",
    "import-redirects",
    "api-tokens-revoke",
    "move-pages",
}

PROJECT = fidelity.Project(
    name="wagtail",
    settings="wagtail_site.settings.dev",
    cases=tuple(CASES),
    template_steps=(("migrate", "-v", "0"), ("shell", "-c", SEED)),
    database_cases=frozenset(DATABASE_CASES),
    # Python salts str hashes per interpreter, and forked jobs share the
    # worker's salt (docs/fidelity.md); update_index indexes pages in an
    # order that follows it. One salt for every way makes runs comparable.
    env=(("PYTHONHASHSEED", "0"),),
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    yield from fidelity.open_database(request.param, PROJECT, tmp_path_factory)


def test_cases_are_named_once():
    fidelity.check_cases_are_named_once(PROJECT)


def test_every_wagtail_invocation_matches_manage_py(tmp_path, database):
    fidelity.every_invocation_matches_manage_py(tmp_path, database)
