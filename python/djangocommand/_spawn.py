"""Runs ``manage.py`` for the ``spawn`` isolation mode, keeping set-up secrets out.

``python -c <this> <manage.py> <command> <args>`` behaves like ``python
manage.py <command> <args>`` (same ``sys.argv``, ``sys.path[0]``, globals and
tracebacks), except that the variables meant for Django's set-up only (the
API key, which settings.py may read) arrive over an inherited pipe, as they
do for the worker, and leave ``os.environ`` as soon as ``django.setup()``
returns: the command itself never sees them, and they are never in
``/proc/<pid>/environ``. Used only when there are such variables.
"""

import json
import os
import sys


def _take_setup_env() -> list[str]:
    fd = os.environ.pop("DJANGOCOMMAND_SETUP_ENV_FD")
    with os.fdopen(int(fd), "rb") as pipe:
        variables = json.loads(pipe.read())
    os.environ.update(variables)
    return list(variables)


def _drop_after_setup(names: list[str]) -> None:
    import django

    setup = django.setup

    def setup_then_drop(*args, **kwargs):
        try:
            return setup(*args, **kwargs)
        finally:
            for name in names:
                os.environ.pop(name, None)

    django.setup = setup_then_drop


def _run_as_main(path: str) -> None:
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as file:
        code = compile(file.read(), path, "exec")
    sys.excepthook = _without_our_frames
    main = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    exec(code, main)  # noqa: S102 - manage.py, run as `python manage.py` would


def _without_our_frames(kind, value, tb) -> None:
    """Prints a traceback that starts at manage.py, as ``python manage.py``'s does."""
    for _ in range(2):  # this module's frame and _run_as_main's
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    # The printed traceback is the exception's own, not the argument.
    sys.__excepthook__(kind, value.with_traceback(tb), tb)


_drop_after_setup(_take_setup_env())
_run_as_main(sys.argv[1])
