"""Settings of the fidelity project: a project as a new user has one, with
real third-party apps from PyPI (django-extensions, django-reversion), run
both as `python manage.py` and through dcsupervisor by
tests/python/test_fidelity.py.

The database is `db.sqlite3` in the *current* directory, so each run of the
test gets its own copy by running in its own directory, or, with
FIDELITY_PG_HOST set, the PostgreSQL database FIDELITY_PG_DB on that server. Not for production:
the secret key is public.
"""

import os
import warnings
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "django-insecure-fidelity-test-only-0123456789abcdef"
DEBUG = False
ALLOWED_HOSTS = ["localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_extensions",
    "reversion",
    "notes",
]
# The fork-hazard test's app (a socket, a thread and a random generator made
# in ready()), only when asked for.
if os.environ.get("FIDELITY_HAZARDS"):
    INSTALLED_APPS.append("hazards")
# Old code that warns when imported, and what the settings themselves say
# (a print, a warning before Django sets up logging), only when asked for.
if os.environ.get("FIDELITY_LEGACY"):
    INSTALLED_APPS.append("legacy")
    print("settings: legacy code is installed")
    warnings.warn("FIDELITY_LEGACY is set: legacy code is installed", UserWarning)

# What production projects run beside their commands (the integrations
# test): sentry-sdk, reporting to FIDELITY_SENTRY_DSN, and logging to files in
# the current directory (plain, rotating, and through a queue whose listener
# the integrations app starts).
if os.environ.get("FIDELITY_INTEGRATIONS"):
    import sentry_sdk
    from sentry_sdk.integrations.atexit import AtexitIntegration

    INSTALLED_APPS.append("integrations")
    sentry_sdk.init(
        dsn=os.environ["FIDELITY_SENTRY_DSN"],
        # Not the default callback: it prints "Sentry is attempting to send
        # 1 pending events" when a flush takes more than 0.1 s, which a
        # loaded machine would make differ between two runs of manage.py.
        integrations=[AtexitIntegration(callback=lambda pending, timeout: None)],
    )
    # whitenoise's storage: collectstatic writes hashed names, a manifest,
    # and compressed copies, into the current directory.
    STATIC_ROOT = "collected"
    STORAGES = {
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
        "staticfiles": {
            "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        },
    }
    LOGGING = {
        "version": 1,
        # dictConfig's default: the loggers that exist when it runs are
        # disabled (not those made later, when the apps are imported).
        "disable_existing_loggers": True,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": "integrations.log",
                "formatter": "plain",
            },
            "rotating": {
                "class": "logging.handlers.RotatingFileHandler",
                "filename": "rotating.log",
                "maxBytes": 400,
                "backupCount": 3,
                "formatter": "plain",
            },
            "queue": {
                "class": "logging.handlers.QueueHandler",
                "queue": "ext://integrations.logqueue.QUEUE",
            },
            # Ships from a thread its constructor starts.
            "shipping": {
                "()": "integrations.shipping.ShippingHandler",
                "filename": "shipped.log",
                "formatter": "plain",
            },
        },
        "root": {"handlers": ["file"], "level": "INFO"},
        "loggers": {
            "integrations": {
                "handlers": ["file", "rotating", "queue", "shipping"],
                "level": "INFO",
                "propagate": False,
            }
        },
    }

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "fidelity_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("FIDELITY_DB_NAME", "db.sqlite3"),
    }
}
# The fidelity test's PostgreSQL run: a server on a Unix socket directory.
if os.environ.get("FIDELITY_PG_HOST"):
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["FIDELITY_PG_HOST"],
        "NAME": os.environ.get("FIDELITY_PG_DB", "fidelity"),
        "USER": "postgres",
    }

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "fidelity_cache",
    }
}

# Mail is printed, recipients only, so a run's output is deterministic.
EMAIL_BACKEND = "notes.mail.RecipientsBackend"
ADMINS = [("Admin", "admin@example.com")]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
