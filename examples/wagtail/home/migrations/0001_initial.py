from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [  # noqa: RUF012 (standard Django migration attribute)
        ("wagtailcore", "0040_page_draft_title"),
    ]

    operations = [  # noqa: RUF012 (standard Django migration attribute)
        migrations.CreateModel(
            name="HomePage",
            fields=[
                (
                    "page_ptr",
                    models.OneToOneField(
                        on_delete=models.CASCADE,
                        parent_link=True,
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        to="wagtailcore.Page",
                    ),
                ),
            ],
            options={
                "abstract": False,
            },
            bases=("wagtailcore.page",),
        ),
    ]
