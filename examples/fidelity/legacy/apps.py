from django.apps import AppConfig


class LegacyConfig(AppConfig):
    name = "legacy"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the check
