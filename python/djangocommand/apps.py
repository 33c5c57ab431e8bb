from django.apps import AppConfig


class DjangoCommandConfig(AppConfig):
    name = "djangocommand"
    verbose_name = "DjangoCommand"

    def ready(self):
        from django.core import checks

        from .checks import check_settings

        checks.register(check_settings)
