from django.core.checks import register


@register()
def old_formats(app_configs, **kwargs):
    # Imported here, as checks often do, so that loading the app does not.
    from legacy.formats import problems

    return problems()
